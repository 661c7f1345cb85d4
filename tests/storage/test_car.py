"""CAR v1 both ways with npm ipfs-car: ours unpacks there, theirs reads and verifies here."""

from __future__ import annotations

import filecmp
import io
from pathlib import Path

import pytest

from core.errors import StorageError
from storage import CID, Blockstore, CarReader, export_file, import_path, read_car, write_car
from storage._car import encode_header
from storage._cid import encode_varint
from storage._dag import iter_blocks
from tests.storage.conftest import MIB, ipfs_car, ipfs_car_pack, random_bytes, write_random


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _match, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_our_file_car_unpacks_with_ipfs_car(store: Blockstore, tmp_path: Path) -> None:
    source = write_random(tmp_path / "video.mp4", 3 * MIB + 1234, seed=5)
    root = import_path(source, store).cid
    car = tmp_path / "ours.car"
    with car.open("wb") as f:
        write_car(store, root, f)
    assert ipfs_car("roots", str(car)) == str(root)
    ipfs_car("unpack", str(car), "--output", str(tmp_path / "unpacked"))
    assert (tmp_path / "unpacked").read_bytes() == source.read_bytes()


def test_our_directory_car_unpacks_with_ipfs_car(
    store: Blockstore, sample_tree: Path, tmp_path: Path
) -> None:
    root = import_path(sample_tree, store).cid
    car = tmp_path / "tree.car"
    with car.open("wb") as f:
        write_car(store, root, f)
    ipfs_car("unpack", str(car), "--output", str(tmp_path / "unpacked"))
    assert _same_tree(sample_tree, tmp_path / "unpacked")


def test_repeated_chunks_are_sent_once(store: Blockstore, tmp_path: Path) -> None:
    source = tmp_path / "zeros"
    source.write_bytes(bytes(4 * MIB))  # four identical leaves
    root = import_path(source, store).cid
    assert len(list(iter_blocks(store, root))) == 2  # the root and one leaf
    car = tmp_path / "zeros.car"
    with car.open("wb") as f:
        write_car(store, root, f)
    assert car.stat().st_size < MIB + 4096
    ipfs_car("unpack", str(car), "--output", str(tmp_path / "unpacked"))
    assert (tmp_path / "unpacked").read_bytes() == bytes(4 * MIB)


def test_ipfs_car_pack_is_read_and_verified(store: Blockstore, tmp_path: Path) -> None:
    source = write_random(tmp_path / "in.bin", 2 * MIB + 99, seed=6)
    car = tmp_path / "theirs.car"
    expected_root = ipfs_car_pack(source, car, wrap=False)
    with car.open("rb") as f:
        roots, blocks = read_car(f)
        with store.batch() as batch:
            for cid, block in blocks:
                batch.put(cid, block)
    assert [str(r) for r in roots] == [expected_root]
    exported = export_file(store, roots[0], tmp_path / "out.bin")
    assert exported.path.read_bytes() == source.read_bytes()
    assert exported.size == source.stat().st_size


def test_ipfs_car_directory_pack_is_read(store: Blockstore, sample_tree: Path, tmp_path: Path) -> None:
    car = tmp_path / "theirs.car"
    expected_root = ipfs_car_pack(sample_tree, car, wrap=True)
    with car.open("rb") as f:
        roots, blocks = read_car(f)
        theirs = {cid: block for cid, block in blocks}
    assert [str(r) for r in roots] == [expected_root]
    ours = import_path(sample_tree, store).cid
    assert ours == roots[0]
    assert theirs == dict(iter_blocks(store, ours))


def test_flipped_byte_is_rejected(tmp_path: Path) -> None:
    source = write_random(tmp_path / "in.bin", MIB + 10, seed=8)
    car = tmp_path / "theirs.car"
    ipfs_car_pack(source, car, wrap=False)
    raw = bytearray(car.read_bytes())
    position = raw.find(source.read_bytes()[500_000:500_032])
    assert position > 0
    raw[position] ^= 0x01
    with pytest.raises(StorageError) as info:
        _, blocks = read_car(io.BytesIO(bytes(raw)))
        list(blocks)
    assert info.value.code == "cid_mismatch"
    assert not info.value.retryable


def test_truncated_car_is_rejected(store: Blockstore) -> None:
    root = store.put(random_bytes(5000))
    buf = io.BytesIO()
    write_car(store, root, buf)
    with pytest.raises(StorageError) as info:
        _, blocks = read_car(io.BytesIO(buf.getvalue()[:-1]))
        list(blocks)
    assert info.value.code == "malformed_car"


def test_byte_at_a_time_feeding_gives_the_same_blocks(store: Blockstore, tmp_path: Path) -> None:
    tree = tmp_path / "small"
    (tree / "sub").mkdir(parents=True)
    for i in range(5):
        (tree / f"f{i}").write_bytes(random_bytes(1000 + i, seed=i))
    (tree / "sub" / "g").write_bytes(b"g")
    root = import_path(tree, store).cid
    buf = io.BytesIO()
    write_car(store, root, buf)
    car = buf.getvalue()
    reader = CarReader()
    fed = [block for i in range(len(car)) for block in reader.feed(car[i : i + 1])]
    reader.finish()
    roots, whole = read_car(io.BytesIO(car))
    assert reader.roots == roots == [root]
    assert fed == list(whole) == list(iter_blocks(store, root))


def test_car_v2_header_is_refused() -> None:
    body = bytes([0xA1, 0x67]) + b"version" + bytes([0x02])
    with pytest.raises(StorageError) as info:
        CarReader().feed(encode_varint(len(body)) + body)
    assert info.value.code == "unsupported_car_version"


def test_oversized_section_is_refused_before_buffering() -> None:
    header = encode_header([CID.for_block(0x55, b"x")])
    reader = CarReader(max_block_bytes=1000)
    with pytest.raises(StorageError) as info:
        reader.feed(header + encode_varint(10_000_000))
    assert info.value.code == "car_block_too_large"
