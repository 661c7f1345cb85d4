"""The UnixFS importer against npm ipfs-car: same bytes, same CID (IPIP-499 unixfs-v1-2025)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from core.errors import StorageError
from storage import CID, DAG_PB, RAW, Blockstore, import_bytes, import_path, import_stream
from storage._dag import first_missing, iter_blocks
from storage._dagpb import UnixFSType, decode_node, decode_unixfs
from storage._importer import CHUNK_SIZE, MAX_DIRECTORY_ENTRIES, FileImporter
from tests.storage.conftest import MIB, ipfs_car_pack, layout_cid, write_random

SIZES = {
    "empty": 0,
    "one_byte": 1,
    "one_chunk": CHUNK_SIZE,
    "one_chunk_plus_one": CHUNK_SIZE + 1,
    "multi_chunk": 5 * MIB + 12_345,
}


@pytest.mark.parametrize("name", list(SIZES))
def test_file_cid_equals_ipfs_car(tmp_path: Path, name: str) -> None:
    path = write_random(tmp_path / name, SIZES[name], seed=len(name))
    expected = ipfs_car_pack(path, tmp_path / "x.car", wrap=False)
    assert str(import_path(path).cid) == expected


def test_small_files_are_their_raw_leaf(tmp_path: Path) -> None:
    empty = import_bytes(b"")
    assert empty.cid.codec == RAW
    assert str(empty.cid) == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    chunk = os.urandom(CHUNK_SIZE)
    single = import_bytes(chunk)
    assert single.cid == CID.for_block(RAW, chunk)
    assert (single.size, single.dag_size) == (CHUNK_SIZE, CHUNK_SIZE)


def test_multi_chunk_root_carries_filesize_and_blocksizes(store: Blockstore) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 5)
    result = import_bytes(data, store)
    assert result.cid.codec == DAG_PB
    links, payload = decode_node(store.get(result.cid))
    assert payload is not None
    unixfs = decode_unixfs(payload)
    assert unixfs.type == UnixFSType.FILE
    assert unixfs.filesize == len(data)
    assert unixfs.blocksizes == [CHUNK_SIZE, CHUNK_SIZE, 5]
    assert [link.cid.codec for link in links] == [RAW, RAW, RAW]
    assert [link.name for link in links] == ["", "", ""]
    assert result.dag_size == sum(len(block) for _cid, block in iter_blocks(store, result.cid))


@pytest.mark.parametrize(
    ("size", "chunk_size", "width"),
    [
        (70_000, 1000, 2),  # 70 leaves, 7 levels of binary tree
        (70_000, 1000, 3),  # a last subtree of a single leaf under its own chain of parents
        (64_000, 1000, 4),  # exactly width**3 leaves: a full tree, no extra level
        (4000, 1000, 4),  # exactly width leaves: one root over them all
        (4001, 1000, 4),  # one more: a second level appears
    ],
)
def test_balanced_layout_matches_ipfs_car(tmp_path: Path, size: int, chunk_size: int, width: int) -> None:
    """Deep trees (several levels of 1024-link nodes need > 1 GiB) checked with small chunks/width."""
    path = write_random(tmp_path / "f", size, seed=size)
    importer = FileImporter(chunk_size=chunk_size, max_links=width)
    with path.open("rb") as f:
        while piece := f.read(777):  # odd piece sizes cross chunk boundaries
            importer.write(piece)
    assert str(importer.close().cid) == layout_cid(path, chunk_size=chunk_size, width=width)


def test_directory_cid_equals_ipfs_car(tmp_path: Path, sample_tree: Path) -> None:
    expected = ipfs_car_pack(sample_tree, tmp_path / "tree.car", wrap=True)
    result = import_path(sample_tree)
    assert str(result.cid) == expected
    assert result.size == sum(p.stat().st_size for p in sample_tree.rglob("*") if p.is_file())


def test_directory_links_sorted_by_name_bytes(store: Blockstore, tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    for name in ("b", "a", "B", "ab", "é", "a.txt"):
        (root / name).write_text(name)
    result = import_path(root, store)
    links, _ = decode_node(store.get(result.cid))
    assert [link.name for link in links] == sorted(["b", "a", "B", "ab", "é", "a.txt"], key=str.encode)
    assert str(result.cid) == ipfs_car_pack(root, tmp_path / "d.car", wrap=True)


def test_import_stores_every_block(store: Blockstore, sample_tree: Path) -> None:
    result = import_path(sample_tree, store)
    assert first_missing(store, result.cid) is None
    assert store.stats().blocks == len(list(iter_blocks(store, result.cid)))


def test_stream_bytes_and_path_agree(tmp_path: Path) -> None:
    path = write_random(tmp_path / "f", 3 * MIB + 3, seed=9)
    data = path.read_bytes()
    by_path = import_path(path)
    assert import_bytes(data) == by_path
    assert import_stream(io.BytesIO(data)) == by_path


def test_compute_only_stores_nothing(store: Blockstore, tmp_path: Path) -> None:
    import_path(write_random(tmp_path / "f", 2 * MIB, seed=3))
    assert store.stats().blocks == 0


def test_directory_that_needs_sharding_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(MAX_DIRECTORY_ENTRIES + 1):
        (root / f"{i:05d}").touch()
    with pytest.raises(StorageError) as info:
        import_path(root)
    assert info.value.code == "directory_needs_sharding"


def test_directory_block_over_the_profile_threshold_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "long-names"
    root.mkdir()
    for i in range(900):  # under the entry limit, but 900 links of ~300 bytes pass 256 KiB
        (root / (f"{i:04d}" + "x" * 251)).touch()
    with pytest.raises(StorageError) as info:
        import_path(root)
    assert info.value.code == "directory_needs_sharding"


def test_symlinks_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "target").write_text("x")
    (root / "link").symlink_to(root / "target")
    with pytest.raises(StorageError) as info:
        import_path(root)
    assert info.value.code == "unsupported_file_type"


def test_empty_directory_is_kept(store: Blockstore, tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "empty").mkdir(parents=True)
    result = import_path(root, store)
    links, _ = decode_node(store.get(result.cid))
    assert [link.name for link in links] == ["empty"]
    _, payload = decode_node(store.get(links[0].cid))
    assert payload is not None and decode_unixfs(payload).type == UnixFSType.DIRECTORY
