"""storage.export_tree: a UnixFS file or directory written out of the store, byte for byte, under limits
that hold against a hostile DAG (names that climb out, links repeated, folders nested without end)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.errors import NotFoundError, RequestError, StorageError
from storage import CID, DAG_PB, RAW, Blockstore, export_tree, import_bytes, import_path
from storage._dagpb import PBLink, UnixFSType, encode_node, encode_unixfs
from tests.storage.conftest import MIB

LIMITS = {"max_bytes": 8 * MIB, "max_files": 100, "max_depth": 8}


def _directory(store: Blockstore, entries: list[tuple[str, CID]]) -> CID:
    block = encode_node([PBLink(cid, name, 0) for name, cid in entries], encode_unixfs(UnixFSType.DIRECTORY))
    return store.put(block, DAG_PB)


def test_a_tree_comes_out_as_the_cid_names_it(store: Blockstore, sample_tree: Path, tmp_path: Path) -> None:
    root = import_path(sample_tree, store).cid
    written = export_tree(store, root, tmp_path / "out", **LIMITS)
    assert import_path(tmp_path / "out").cid == root
    for exported in written:
        data = exported.path.read_bytes()
        assert (exported.size, exported.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert sum(f.size for f in written) == sum(
        p.stat().st_size for p in sample_tree.rglob("*") if p.is_file()
    )


def test_a_file_is_written_as_dest_or_under_its_given_name(store: Blockstore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # two chunks: a file node over raw leaves
    cid = import_bytes(data, store).cid
    assert [f.path for f in export_tree(store, cid, tmp_path / "plain.bin", **LIMITS)] == [
        tmp_path / "plain.bin"
    ]
    export_tree(store, cid, tmp_path / "named", file_name="out.bin", **LIMITS)
    assert (tmp_path / "plain.bin").read_bytes() == (tmp_path / "named" / "out.bin").read_bytes() == data

    with pytest.raises(RequestError) as info:
        export_tree(store, cid, tmp_path / "bad", file_name="../out.bin", **LIMITS)
    assert info.value.code == "invalid_file_name"
    assert not (tmp_path / "bad").exists() and not (tmp_path / "out.bin").exists()


def test_a_directory_ignores_the_file_name(store: Blockstore, tmp_path: Path) -> None:
    root = _directory(store, [("a.txt", store.put(b"a"))])
    export_tree(store, root, tmp_path / "out", file_name="unused", **LIMITS)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "nul\x00", "x" * 256])
def test_an_entry_name_that_is_not_one_plain_component_is_refused(
    store: Blockstore, tmp_path: Path, name: str
) -> None:
    root = _directory(store, [(name, store.put(b"escaped"))])
    (tmp_path / "a").mkdir()
    with pytest.raises(StorageError) as info:
        export_tree(store, root, tmp_path / "a" / "out", **LIMITS)
    assert info.value.code == "dag_malformed" and info.value.details == {"cid": str(root)}
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["out"]


def test_a_repeated_name_and_a_repeated_link_are_bounded(store: Blockstore, tmp_path: Path) -> None:
    leaf = store.put(b"x" * 1000)
    with pytest.raises(StorageError) as twice:
        export_tree(store, _directory(store, [("same", leaf), ("same", leaf)]), tmp_path / "one", **LIMITS)
    copies = _directory(store, [(f"copy{i}", leaf) for i in range(10)])  # 10 kB out of one 1 kB block
    with pytest.raises(StorageError) as big:
        export_tree(store, copies, tmp_path / "two", max_bytes=5000, max_files=100, max_depth=8)
    with pytest.raises(StorageError) as many:
        export_tree(store, copies, tmp_path / "three", max_bytes=MIB, max_files=9, max_depth=8)
    assert twice.value.code == "dag_malformed"
    assert (big.value.code, big.value.details["max_bytes"]) == ("dag_too_large", 5000)
    assert sum(p.stat().st_size for p in (tmp_path / "two").iterdir()) <= 5000
    assert many.value.code == "dag_malformed" and "more than 9 files" in many.value.message


def test_folders_nest_no_deeper_than_allowed(store: Blockstore, tmp_path: Path) -> None:
    cid = store.put(b"deep")
    for depth in range(4):
        cid = _directory(store, [(f"d{depth}", cid)])
    export_tree(store, cid, tmp_path / "ok", max_bytes=MIB, max_files=10, max_depth=4)
    assert (tmp_path / "ok" / "d3" / "d2" / "d1" / "d0").read_bytes() == b"deep"
    with pytest.raises(StorageError) as info:
        export_tree(store, cid, tmp_path / "too", max_bytes=MIB, max_files=10, max_depth=3)
    assert info.value.code == "dag_malformed" and "deeper than 3" in info.value.message


def test_a_missing_block_and_a_node_that_is_no_unixfs_are_refused(store: Blockstore, tmp_path: Path) -> None:
    absent = CID.for_block(RAW, b"never stored")
    with pytest.raises(NotFoundError) as missing:
        export_tree(store, _directory(store, [("gone", absent)]), tmp_path / "one", **LIMITS)
    assert missing.value.code == "block_not_found" and missing.value.details == {"cid": str(absent)}

    bare = store.put(encode_node([], None), DAG_PB)  # dag-pb without UnixFS data
    symlink = store.put(encode_node([], encode_unixfs(UnixFSType.SYMLINK, data=b"/etc/passwd")), DAG_PB)
    for i, cid in enumerate([bare, symlink, CID.for_block(0x71, b"\xa0")]):
        with pytest.raises(StorageError) as info:
            export_tree(store, cid, tmp_path / f"x{i}", **LIMITS)
        assert info.value.code == "dag_malformed", cid
