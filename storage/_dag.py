"""Walking DAGs in the blockstore: DFS block order, path resolution, file bytes, completeness.

Only what UnixFS v1 files and plain directories need: raw blocks and dag-pb nodes. A HAMT-sharded
directory met while resolving a path is refused with a clear error rather than misread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.errors import NotFoundError, RequestError, StorageError
from storage._blockstore import Blockstore
from storage._cid import CID, DAG_PB, RAW
from storage._dagpb import PBLink, UnixFSData, UnixFSType, decode_node, decode_unixfs

DagScope = Literal["all", "entity", "block"]
EntityKind = Literal["file", "directory", "other"]


@dataclass(frozen=True, slots=True)
class _Node:
    links: list[PBLink]
    unixfs: UnixFSData | None


def _malformed(cid: CID, exc: Exception) -> StorageError:
    return StorageError(
        "malformed_block", f"block {cid} is not valid dag-pb/UnixFS: {exc}", details={"cid": str(cid)}
    )


def _decode(cid: CID, block: bytes) -> _Node:
    try:
        links, data = decode_node(block)
        return _Node(links, decode_unixfs(data) if data is not None else None)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(cid, exc) from None


def _unsupported_codec(cid: CID) -> StorageError:
    return StorageError(
        "unsupported_codec",
        f"{cid} uses codec 0x{cid.codec:x}; only raw and dag-pb (UnixFS) DAGs are supported",
        details={"cid": str(cid)},
    )


def entity_kind(store: Blockstore, cid: CID) -> EntityKind:
    """Whether ``cid`` names a UnixFS file (raw blocks count), a directory, or something else."""
    if cid.codec == RAW:
        return "file"
    if cid.codec != DAG_PB:
        return "other"
    node = _decode(cid, store.get(cid))
    if node.unixfs is None:
        return "other"
    if node.unixfs.type in (UnixFSType.FILE, UnixFSType.RAW):
        return "file"
    return "directory" if _is_directory(node) else "other"


def resolve_path(store: Blockstore, root: CID, segments: Sequence[str]) -> tuple[CID, list[CID]]:
    """The CID at ``root/segments…`` and the CIDs of the directories passed on the way."""
    cid = root
    passed: list[CID] = []
    for depth, segment in enumerate(segments):
        here = "/".join(segments[:depth]) or "/"
        if cid.codec != DAG_PB:
            raise _path_not_found(root, segments, f"{here} is not a directory")
        node = _decode(cid, store.get(cid))
        kind = node.unixfs.type if node.unixfs is not None else None
        if kind == UnixFSType.HAMT_SHARD:
            raise StorageError(
                "unsupported_hamt_directory",
                f"{here} under {root} is a HAMT-sharded directory, which this node does not traverse",
                details={"cid": str(cid)},
            )
        if kind != UnixFSType.DIRECTORY:
            raise _path_not_found(root, segments, f"{here} is not a directory")
        match = next((link for link in node.links if link.name == segment), None)
        if match is None:
            raise _path_not_found(root, segments, f"no entry {segment!r} in {here}")
        passed.append(cid)
        cid = match.cid
    return cid, passed


def _path_not_found(root: CID, segments: Sequence[str], why: str) -> NotFoundError:
    path = "/".join(segments)
    return NotFoundError(
        "path_not_found", f"/ipfs/{root}/{path}: {why}", details={"cid": str(root), "path": path}
    )


def iter_blocks(store: Blockstore, root: CID, scope: DagScope = "all") -> Iterator[tuple[CID, bytes]]:
    """The DAG's blocks in depth-first order (parent first, links in order), each block once.

    ``scope`` follows the trustless gateway's ``dag-scope``: ``all`` is the whole DAG, ``block`` the
    root block only, ``entity`` the whole DAG of a file but only the node of a directory.
    """
    seen: set[CID] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        key = cid.v1()
        if key in seen:
            continue
        seen.add(key)
        block = store.get(cid)
        yield cid, block
        if scope == "block" or cid.codec == RAW:
            continue
        if cid.codec != DAG_PB:
            raise _unsupported_codec(cid)
        node = _decode(cid, block)
        if scope == "entity" and cid == root and _is_directory(node):
            continue
        stack.extend(link.cid for link in reversed(node.links))


def _is_directory(node: _Node) -> bool:
    return node.unixfs is not None and node.unixfs.type in (UnixFSType.DIRECTORY, UnixFSType.HAMT_SHARD)


def first_missing(store: Blockstore, root: CID) -> CID | None:
    """The first block of the DAG (depth-first) that the store lacks, or ``None`` when it is complete.

    Raw leaves are only checked for presence; dag-pb nodes are read to find their children.
    """
    stack = [root]
    seen: set[CID] = set()
    while stack:
        cid = stack.pop()
        if cid.v1() in seen:
            continue
        seen.add(cid.v1())
        if cid.codec != DAG_PB:
            if not store.has(cid):
                return cid
            continue
        try:
            block = store.get(cid)
        except NotFoundError:
            return cid
        stack.extend(link.cid for link in reversed(_decode(cid, block).links))
    return None


def file_size(store: Blockstore, cid: CID) -> int:
    """The content length of the UnixFS file ``cid`` (from its root block alone)."""
    if cid.codec == RAW:
        size = store.size(cid)
        if size is None:
            raise NotFoundError(
                "block_not_found", f"block {cid} is not on this node", details={"cid": str(cid)}
            )
        return size
    unixfs = _file_root(cid, store.get(cid)).unixfs
    assert unixfs is not None  # _file_root checked it
    if unixfs.filesize is not None:
        return unixfs.filesize
    return len(unixfs.data) + sum(unixfs.blocksizes)


def _file_root(cid: CID, block: bytes) -> _Node:
    if cid.codec != DAG_PB:
        raise _unsupported_codec(cid)
    node = _decode(cid, block)
    if node.unixfs is None or node.unixfs.type not in (UnixFSType.FILE, UnixFSType.RAW):
        raise StorageError("not_a_file", f"{cid} is not a UnixFS file", details={"cid": str(cid)})
    return node


def iter_file(store: Blockstore, cid: CID) -> Iterator[bytes]:
    """The bytes of the UnixFS file ``cid``, in order, a block's worth at a time."""
    stack: list[CID | bytes] = [cid]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            yield item
            continue
        block = store.get(item)
        if item.codec == RAW:
            yield block
            continue
        node = _file_root(item, block)
        stack.extend(link.cid for link in reversed(node.links))
        assert node.unixfs is not None
        if node.unixfs.data:
            stack.append(node.unixfs.data)


@dataclass(frozen=True, slots=True)
class ExportedFile:
    """A file written out of the store: where, how many bytes, and their sha256."""

    path: Path
    size: int
    sha256: str


def export_file(store: Blockstore, cid: CID, dest: Path, *, max_bytes: int | None = None) -> ExportedFile:
    """Write the file ``cid`` to ``dest`` (via a temporary name, then renamed into place)."""
    digest = hashlib.sha256()
    size = 0
    temp = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as out:
            for piece in iter_file(store, cid):
                size += len(piece)
                if max_bytes is not None and size > max_bytes:
                    raise StorageError(
                        "input_too_large",
                        f"{cid} is larger than the {max_bytes}-byte input cap",
                        details={"cid": str(cid), "max_bytes": max_bytes},
                    )
                digest.update(piece)
                out.write(piece)
        os.replace(temp, dest)
    except OSError as exc:
        raise StorageError(
            "export_failed", f"cannot write {dest}: {exc.strerror or exc}", details={"path": str(dest)}
        ) from None
    finally:
        temp.unlink(missing_ok=True)
    return ExportedFile(dest, size, digest.hexdigest())


MAX_ENTRY_NAME_BYTES = 255  # the longest file name the common file systems take


def _dag_malformed(cid: CID, why: str) -> StorageError:
    return StorageError("dag_malformed", f"entry {cid}: {why}", details={"cid": str(cid)})


def safe_entry_name(name: str) -> bool:
    """Whether ``name`` is one plain path component: not empty, ``.`` or ``..``, no ``/`` or NUL, at
    most :data:`MAX_ENTRY_NAME_BYTES` bytes of UTF-8.
    """
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\x00" not in name
        and len(name.encode()) <= MAX_ENTRY_NAME_BYTES
    )


def export_tree(
    store: Blockstore,
    cid: CID,
    dest: Path,
    *,
    max_bytes: int,
    max_files: int,
    max_depth: int,
    file_name: str | None = None,
) -> list[ExportedFile]:
    """Write the UnixFS DAG ``cid`` to the new path ``dest``: files byte for byte, directories as
    folders, nothing else; the files written, in DFS order.

    A directory becomes ``dest`` itself. A file becomes ``dest`` too, or, with ``file_name`` (a file
    published without its name), ``dest/file_name`` in a new folder ``dest``. The DAG is not trusted:
    every entry name must be a plain, unique name (:func:`safe_entry_name`), folders may nest at most
    ``max_depth`` deep, and at most ``max_files`` files and ``max_bytes`` bytes in all are written (a
    link repeated a million times writes no more than that), so a hostile DAG can neither escape
    ``dest`` nor fill the disk.

    Refusals: :class:`~core.errors.RequestError` ``invalid_file_name`` for a ``file_name`` that is not a
    plain name; :class:`StorageError` ``dag_malformed`` (anything but raw blocks, UnixFS files and plain
    directories, a bad or repeated name, too deep, too many files), ``dag_too_large`` (details ``cid``,
    ``max_bytes``), ``export_failed`` (the disk); :class:`NotFoundError` ``block_not_found`` for a block
    the store lacks. What was written before a refusal stays under ``dest`` for the caller to remove.
    """
    exporter = _TreeExporter(store, max_bytes=max_bytes, max_files=max_files, max_depth=max_depth)
    try:
        if file_name is not None and exporter.links(cid) is None:
            if not safe_entry_name(file_name):
                raise RequestError(
                    "invalid_file_name",
                    f"{file_name[:80]!r} is not a plain file name",
                    details={"name": file_name[:256]},
                )
            dest.mkdir()
            exporter.file(cid, dest / file_name)
        else:
            exporter.entry(cid, dest, 0)
    except OSError as exc:
        raise StorageError(
            "export_failed", f"cannot write under {dest}: {exc.strerror or exc}", details={"path": str(dest)}
        ) from None
    return exporter.written


class _TreeExporter:
    """The walk behind :func:`export_tree`, counting the files and bytes written so far."""

    def __init__(self, store: Blockstore, *, max_bytes: int, max_files: int, max_depth: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_depth = max_depth
        self.written: list[ExportedFile] = []
        self.size = 0

    def links(self, cid: CID) -> list[PBLink] | None:
        """None for a file; a directory's links for a directory; ``dag_malformed`` for anything else."""
        if cid.codec == RAW:
            return None
        if cid.codec != DAG_PB:
            raise _dag_malformed(cid, f"codec 0x{cid.codec:x} is not UnixFS")
        try:
            links, data = decode_node(self.store.get(cid))
            kind = decode_unixfs(data).type if data is not None else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _dag_malformed(cid, f"not valid dag-pb/UnixFS ({exc})") from None
        if kind in (UnixFSType.FILE, UnixFSType.RAW):
            return None
        if kind == UnixFSType.DIRECTORY:
            return links
        raise _dag_malformed(cid, f"UnixFS {kind.name if kind is not None else 'without data'} is not a file")

    def entry(self, cid: CID, dest: Path, depth: int) -> None:
        links = self.links(cid)
        if links is None:
            self.file(cid, dest)
            return
        if depth >= self.max_depth:
            raise _dag_malformed(cid, f"folders nest deeper than {self.max_depth}")
        dest.mkdir()
        seen: set[str] = set()
        for link in links:
            if not safe_entry_name(link.name) or link.name in seen:
                raise _dag_malformed(cid, f"entry name {link.name[:80]!r} is not a plain, unique name")
            seen.add(link.name)
            self.entry(link.cid, dest / link.name, depth + 1)

    def file(self, cid: CID, dest: Path) -> None:
        if len(self.written) >= self.max_files:
            raise _dag_malformed(cid, f"more than {self.max_files} files")
        try:
            exported = export_file(self.store, cid, dest, max_bytes=self.max_bytes - self.size)
        except StorageError as exc:
            if exc.code in ("not_a_file", "malformed_block", "unsupported_codec"):
                raise _dag_malformed(cid, exc.message) from None
            if exc.code != "input_too_large":
                raise
            raise StorageError(
                "dag_too_large",
                f"the DAG holds more than {self.max_bytes} bytes of files, at {cid}",
                details={"cid": str(cid), "max_bytes": self.max_bytes},
            ) from None
        self.size += exported.size
        self.written.append(exported)
