"""The blockstore: durable puts, verified reads, nothing half-written ever visible, exact accounting."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.errors import NotFoundError, StorageError
from storage import CID, DAG_PB, RAW, Blockstore
from storage._blockstore import TEMP_PREFIX
from tests.storage.conftest import ROOT, random_bytes


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMP_PREFIX}*")]


def test_put_get_has_and_size(store: Blockstore) -> None:
    data = b"hello blocks"
    cid = store.put(data)
    assert cid == CID.for_block(RAW, data)
    assert store.has(cid)
    assert store.get(cid) == data
    assert store.size(cid) == len(data)
    assert store.stats().blocks == 1 and store.stats().bytes == len(data)


def test_block_is_filed_under_its_cidv1_in_a_shard(store: Blockstore) -> None:
    cid = store.put(b"where am I", DAG_PB)
    path = store.root / cid.digest[:1].hex() / str(cid)
    assert path.read_bytes() == b"where am I"
    v0 = CID(DAG_PB, cid.digest, version=0)
    assert str(v0).startswith("Qm") and store.get(v0) == b"where am I"


def test_put_of_a_stored_block_is_a_no_op(store: Blockstore) -> None:
    cid = store.put(b"once")
    path = store.root / cid.digest[:1].hex() / str(cid)
    before = path.stat()
    assert store.put(b"once") == cid
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert store.stats() == type(store.stats())(1, 4)


def test_unknown_block_is_not_found(store: Blockstore) -> None:
    missing = CID.for_block(RAW, b"never stored")
    assert not store.has(missing)
    assert store.size(missing) is None
    with pytest.raises(NotFoundError) as info:
        store.get(missing)
    assert info.value.code == "block_not_found"


def test_corrupted_block_is_detected_on_read(store: Blockstore) -> None:
    cid = store.put(b"pristine bytes")
    path = store.root / cid.digest[:1].hex() / str(cid)
    path.chmod(0o644)
    path.write_bytes(b"Pristine bytes")
    with pytest.raises(StorageError) as info:
        store.get(cid)
    assert info.value.code == "block_corrupt"
    assert store.get(cid, verify=False) == b"Pristine bytes"


def test_batch_is_invisible_until_commit_and_abort_leaves_nothing(store: Blockstore) -> None:
    blocks = [random_bytes(100_000, seed=i) for i in range(8)]
    cids = [CID.for_block(RAW, b) for b in blocks]
    batch = store.batch()
    for cid, block in zip(cids, blocks, strict=True):
        batch.put(cid, block)
    batch.flush()
    assert not any(store.has(c) for c in cids)
    assert len(_temp_files(store.root)) == len(blocks)
    batch.abort()
    assert not any(store.has(c) for c in cids)
    assert _temp_files(store.root) == []

    with store.batch() as committed:
        for cid, block in zip(cids, blocks, strict=True):
            committed.put(cid, block)
    assert all(store.get(c) == b for c, b in zip(cids, blocks, strict=True))
    assert _temp_files(store.root) == []


def test_exception_inside_batch_aborts_it(store: Blockstore) -> None:
    cid = CID.for_block(RAW, b"doomed")
    with pytest.raises(RuntimeError), store.batch() as batch:
        batch.put(cid, b"doomed")
        raise RuntimeError("upload failed")
    assert not store.has(cid)
    assert _temp_files(store.root) == []


def test_leftover_temp_file_is_invisible_and_swept(store: Blockstore) -> None:
    data = b"half a block"
    cid = CID.for_block(RAW, data)
    shard = store.root / cid.digest[:1].hex()
    leftover = shard / f"{TEMP_PREFIX}deadbeef0000-0"  # what a crashed earlier process leaves
    leftover.write_bytes(data[:4])
    reopened = Blockstore.open(store.root)
    assert not reopened.has(cid)
    assert reopened.stats().blocks == 0  # the scan sweeps it
    assert not leftover.exists()
    assert reopened.put(data) == cid and reopened.get(cid) == data


def test_concurrent_puts_of_the_same_and_different_blocks(store: Blockstore) -> None:
    shared = random_bytes(300_000, seed=7)
    own = [random_bytes(50_000, seed=100 + i) for i in range(8)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                store.put(shared)
                store.put(own[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.get(CID.for_block(RAW, shared)) == shared
    assert store.stats().blocks == 9
    assert store.stats().bytes == len(shared) + sum(len(b) for b in own)
    assert Blockstore.open(store.root).stats() == store.stats()  # a fresh scan agrees with the counters
    assert _temp_files(store.root) == []


_CRASHING_WRITER = """
import sys, time
from pathlib import Path
from storage import CID, RAW, Blockstore
store = Blockstore.open(Path(sys.argv[1]))
batch = store.batch()
for i in range(4):
    data = bytes([i]) * 1_000_000
    batch.put(CID.for_block(RAW, data), data)
batch.flush()
print("written", flush=True)
time.sleep(60)
batch.commit()
"""


def test_process_killed_mid_batch_leaves_no_visible_block(store: Blockstore) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_WRITER, str(store.root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
        assert len(_temp_files(store.root)) == 4  # the bytes are on disk, under temporary names only
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    cids = [CID.for_block(RAW, bytes([i]) * 1_000_000) for i in range(4)]
    assert not any(store.has(c) for c in cids)
    assert store.stats().blocks == 0
    assert _temp_files(store.root) == []


def test_failed_write_aborts_the_batch(store: Blockstore) -> None:
    cid = CID.for_block(RAW, b"x")
    shard = store.root / cid.digest[:1].hex()
    shard.rmdir()
    shard.write_bytes(b"")  # a file where the shard directory should be: every write there fails
    with pytest.raises(StorageError) as info, store.batch() as batch:
        batch.put(cid, b"x")
    assert info.value.code == "blockstore_io_error"
    assert info.value.retryable
    shard.unlink()
    shard.mkdir()
    assert not store.has(cid)
    assert _temp_files(store.root) == []
