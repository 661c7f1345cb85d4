"""A CAR pushed to the node piece by piece (a cluster worker's output): verified like a gateway's.

The worker is another machine: its bytes are untrusted. Each hostile variant is refused with its code and
leaves nothing in the store; a good CAR arrives whole however it is cut into pieces.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from core.errors import StorageError
from storage import CID, Blockstore, CarImport, export_tree, import_bytes, import_path, iter_car
from storage._car import encode_header, section_prefix
from storage._dag import iter_blocks


def car_of(store: Blockstore, root: CID) -> bytes:
    return b"".join(iter_car(store, root))


def pushed(car: bytes, root: CID, dest: Blockstore, *, piece: int, max_bytes: int = 1 << 30) -> None:
    importing = CarImport(root, dest, max_bytes=max_bytes)
    try:
        for at in range(0, len(car), piece):
            importing.feed(car[at : at + piece])
        importing.finish()
    except BaseException:
        importing.abort()
        raise


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_a_worker_s_output_arrives_whole_however_it_is_cut(
    store: Blockstore, sample_tree: Path, tmp_path: Path, piece: int
) -> None:
    root = import_path(sample_tree, store).cid
    dest = Blockstore.open(tmp_path / "head")
    pushed(car_of(store, root), root, dest, piece=piece)
    export_tree(dest, root, tmp_path / "out", max_bytes=1 << 30, max_files=100, max_depth=8)
    assert not filecmp.dircmp(sample_tree, tmp_path / "out").diff_files
    assert import_path(tmp_path / "out", None).cid == root


def test_a_truncated_car_is_an_incomplete_dag(store: Blockstore, sample_tree: Path, tmp_path: Path) -> None:
    root = import_path(sample_tree, store).cid
    blocks = list(iter_blocks(store, root))
    car = encode_header([root]) + b"".join(section_prefix(c, len(b)) + b for c, b in blocks[:-1])
    with pytest.raises(StorageError) as refused:
        pushed(car, root, Blockstore.open(tmp_path / "head"), piece=1000)
    assert refused.value.code == "incomplete_dag" and refused.value.details["cid"] == str(root)


def test_a_block_the_dag_does_not_link_is_refused_and_nothing_is_kept(
    store: Blockstore, sample_tree: Path, tmp_path: Path
) -> None:
    root = import_path(sample_tree, store).cid
    stranger = import_bytes(b"not part of the output", store).cid
    car = car_of(store, root) + section_prefix(stranger, 22) + b"not part of the output"
    dest = Blockstore.open(tmp_path / "head")
    with pytest.raises(StorageError) as refused:
        pushed(car, root, dest, piece=4096)
    assert refused.value.code == "unexpected_block"
    assert not dest.has(root) and not dest.has(stranger)


def test_a_car_of_another_root_is_refused(store: Blockstore, tmp_path: Path) -> None:
    asked = import_bytes(b"the output the head expects", store).cid
    other = import_bytes(b"something else", store).cid
    with pytest.raises(StorageError) as refused:
        pushed(car_of(store, other), asked, Blockstore.open(tmp_path / "head"), piece=64)
    assert refused.value.code == "car_root_mismatch"


def test_a_block_that_does_not_hash_to_its_cid_is_refused(store: Blockstore, tmp_path: Path) -> None:
    root = import_bytes(b"honest bytes", store).cid
    car = encode_header([root]) + section_prefix(root, 12) + b"forged bytes"
    dest = Blockstore.open(tmp_path / "head")
    with pytest.raises(StorageError) as refused:
        pushed(car, root, dest, piece=5)
    assert refused.value.code == "cid_mismatch" and not dest.has(root)


def test_more_than_the_output_cap_is_refused_early(
    store: Blockstore, sample_tree: Path, tmp_path: Path
) -> None:
    root = import_path(sample_tree, store).cid
    with pytest.raises(StorageError) as refused:
        pushed(car_of(store, root), root, Blockstore.open(tmp_path / "head"), piece=65536, max_bytes=1000)
    assert refused.value.code == "input_too_large"


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\xff" * 64, b"\x0a" + b"\x00" * 9])
def test_garbage_is_a_malformed_car(store: Blockstore, tmp_path: Path, garbage: bytes) -> None:
    root = import_bytes(b"x", store).cid
    with pytest.raises(StorageError) as refused:
        pushed(garbage, root, Blockstore.open(tmp_path / "head"), piece=3)
    assert refused.value.code in {"malformed_car", "incomplete_dag"}
