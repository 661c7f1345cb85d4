"""The UnixFS importer, following the IPIP-499 ``unixfs-v1-2025`` profile.

Profile: CIDv1, sha2-256, raw leaves (codec ``raw``), fixed 1 MiB (1,048,576-byte) chunks, a balanced
DAG of at most 1024 links per dag-pb node, UnixFS ``File`` nodes carrying ``filesize`` and
``blocksizes``, no mode or mtime. A file of one chunk (or none) is its raw leaf. Directories are plain
UnixFS ``Directory`` nodes with links sorted by name bytes, each link's ``Tsize`` being the bytes of the
child's whole DAG.

The CIDs equal those of npm ``ipfs-car`` 3.x (pinned at 3.1.0 in package.json) with its defaults:
``ipfs-car pack FILE --no-wrap`` for a file and ``ipfs-car pack DIR`` (files directly under DIR,
``--hidden`` for dotfiles) for a directory. Version 3.0.0 made 1 MiB chunks and 1024-link nodes its
default (through ``@ipld/unixfs`` with raw leaves and the balanced layout); earlier versions chunk
differently and give other CIDs. Kubo with the same profile (and Helia) agree.

Refused rather than imported under another CID: directories that would need HAMT sharding, which is
either more entries than ``ipfs-car`` keeps in a plain directory (1000) or a directory block of the
profile's 256 KiB threshold or more; symlinks and special files (a job's output has neither); names that
are not UTF-8. Empty directories are kept, as Kubo keeps them (``ipfs-car`` only sees files).

Everything streams: a file is read one chunk at a time and blocks are handed to a sink (a
:class:`~storage._blockstore.BlockBatch` writes them while the next chunk is hashed), so memory stays
at a few chunks whatever the file size.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from core.errors import StorageError
from storage._blockstore import Blockstore
from storage._cid import CID, DAG_PB, RAW
from storage._dagpb import PBLink, UnixFSType, encode_node, encode_unixfs

CHUNK_SIZE = 1_048_576
MAX_LINKS = 1024
MAX_DIRECTORY_ENTRIES = 1000
HAMT_THRESHOLD_BYTES = 256 * 1024
_DIRECTORY_DATA = encode_unixfs(UnixFSType.DIRECTORY)


class BlockSink(Protocol):
    """Where the importer sends each block it makes (a ``BlockBatch``, or nothing to only compute)."""

    def put(self, cid: CID, data: bytes | memoryview) -> None: ...


class _Discard:
    def put(self, cid: CID, data: bytes | memoryview) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import made: the root CID, the content bytes and the bytes of every block in the DAG."""

    cid: CID
    size: int
    dag_size: int


class _Link(NamedTuple):
    cid: CID
    content_size: int
    dag_size: int


class FileImporter:
    """A UnixFS file built from bytes written in pieces of any size; :meth:`close` gives its root.

    ``chunk_size`` and ``max_links`` exist so tests can check the DAG layout against ``ipfs-car`` on
    small inputs; production keeps the profile's values.
    """

    def __init__(
        self, sink: BlockSink | None = None, *, chunk_size: int = CHUNK_SIZE, max_links: int = MAX_LINKS
    ) -> None:
        if chunk_size < 1 or max_links < 2:
            raise ValueError("chunk_size must be >= 1 and max_links >= 2")
        self._sink: BlockSink = sink if sink is not None else _Discard()
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._buffer = bytearray()
        # _levels[0] holds leaves, _levels[n] nodes of height n; a row never reaches max_links links.
        self._levels: list[list[_Link]] = [[]]
        self._size = 0
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` to the file. Immutable ``bytes`` are sliced without copying."""
        if self._closed:
            raise StorageError("importer_closed", "this file import is already closed")
        size = self._chunk_size
        view = memoryview(data).cast("B")
        stable = isinstance(data, bytes)  # a bytearray/memoryview could change after we return
        if self._buffer:
            take = min(size - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == size:
                self._leaf(bytes(self._buffer))
                self._buffer.clear()
        while len(view) >= size:
            piece = view[:size]
            self._leaf(piece if stable else piece.tobytes())
            view = view[size:]
        if len(view):
            self._buffer += view

    def close(self) -> ImportResult:
        """Finish the file: flush the last chunk and build the balanced tree up to its root."""
        if self._closed:
            raise StorageError("importer_closed", "this file import is already closed")
        self._closed = True
        if self._buffer or self._size == 0:
            self._leaf(bytes(self._buffer))
            self._buffer.clear()
        height = 0
        while True:
            row = self._levels[height]
            if height == len(self._levels) - 1:
                root = row[0] if len(row) == 1 else self._branch(row)
                return ImportResult(root.cid, root.content_size, root.dag_size)
            if row:
                node = self._branch(row)
                row.clear()
                self._add(height + 1, node)
            height += 1

    def _leaf(self, chunk: bytes | memoryview) -> None:
        cid = CID(RAW, hashlib.sha256(chunk).digest())
        self._sink.put(cid, chunk)
        self._size += len(chunk)
        self._add(0, _Link(cid, len(chunk), len(chunk)))

    def _add(self, height: int, link: _Link) -> None:
        if height == len(self._levels):
            self._levels.append([])
        row = self._levels[height]
        row.append(link)
        if len(row) == self._max_links:  # a full row becomes one node a level up
            node = self._branch(row)
            row.clear()
            self._add(height + 1, node)

    def _branch(self, children: list[_Link]) -> _Link:
        data = encode_unixfs(
            UnixFSType.FILE,
            filesize=sum(c.content_size for c in children),
            blocksizes=[c.content_size for c in children],
        )
        block = encode_node([PBLink(c.cid, "", c.dag_size) for c in children], data)
        cid = CID.for_block(DAG_PB, block)
        self._sink.put(cid, block)
        return _Link(
            cid, sum(c.content_size for c in children), len(block) + sum(c.dag_size for c in children)
        )


def _import_file(path: str, sink: BlockSink | None) -> ImportResult:
    importer = FileImporter(sink)
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK_SIZE):
                importer.write(chunk)
    except OSError as exc:
        raise StorageError(
            "import_read_failed", f"cannot read {path}: {exc.strerror or exc}", details={"path": path}
        ) from None
    return importer.close()


def _unsupported(path: str, what: str) -> StorageError:
    return StorageError(
        "unsupported_file_type",
        f"{path} is {what}; only regular files and directories can be imported",
        details={"path": path},
    )


def _entry_name(entry: os.DirEntry[str]) -> str:
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError(
            "invalid_file_name",
            f"{entry.path!r} has a name that is not UTF-8",
            details={"path": repr(entry.path)},
        ) from None
    return entry.name


def _import_directory(path: str, sink: BlockSink | None) -> ImportResult:
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    except OSError as exc:
        raise StorageError(
            "import_read_failed", f"cannot list {path}: {exc.strerror or exc}", details={"path": path}
        ) from None
    if len(entries) > MAX_DIRECTORY_ENTRIES:
        raise _needs_sharding(path, f"{len(entries)} entries (more than {MAX_DIRECTORY_ENTRIES})")
    links: list[PBLink] = []
    content = 0
    for entry in entries:
        name = _entry_name(entry)
        if entry.is_symlink():
            raise _unsupported(entry.path, "a symlink")
        if entry.is_dir(follow_symlinks=False):
            child = _import_directory(entry.path, sink)
        elif entry.is_file(follow_symlinks=False):
            child = _import_file(entry.path, sink)
        else:
            raise _unsupported(entry.path, "a special file")
        links.append(PBLink(child.cid, name, child.dag_size))
        content += child.size
    return _directory_node(path, links, content, sink)


def _needs_sharding(path: str, why: str) -> StorageError:
    return StorageError(
        "directory_needs_sharding",
        f"{path} has {why}; HAMT-sharded directories are not supported, split it into subdirectories",
        details={"path": path},
    )


def _directory_node(path: str, links: list[PBLink], content: int, sink: BlockSink | None) -> ImportResult:
    block = encode_node(links, _DIRECTORY_DATA)
    if len(block) >= HAMT_THRESHOLD_BYTES:
        raise _needs_sharding(path, f"a directory block of {len(block)} bytes (profile limit 256 KiB)")
    cid = CID.for_block(DAG_PB, block)
    (sink or _Discard()).put(cid, block)
    return ImportResult(cid, content, len(block) + sum(link.tsize for link in links))


def _import_any(path: Path, sink: BlockSink | None) -> ImportResult:
    name = os.fspath(path)
    try:
        mode = os.lstat(name).st_mode
    except OSError as exc:
        raise StorageError(
            "import_read_failed", f"cannot read {name}: {exc.strerror or exc}", details={"path": name}
        ) from None
    if stat.S_ISDIR(mode):
        return _import_directory(name, sink)
    if stat.S_ISREG(mode):
        return _import_file(name, sink)
    raise _unsupported(name, "a symlink" if stat.S_ISLNK(mode) else "a special file")


def import_path(path: Path, store: Blockstore | None = None) -> ImportResult:
    """Import a file or a directory tree; with ``store``, every block is stored before this returns.

    Without a store only the CID is computed. Blocks become visible together once all are durable.
    Blocking: call it in a thread from async code.
    """
    if store is None:
        return _import_any(path, None)
    with store.batch() as batch:
        return _import_any(path, batch)


def _import_pieces(pieces: Iterable[bytes], store: Blockstore | None) -> ImportResult:
    if store is None:
        importer = FileImporter()
        for piece in pieces:
            importer.write(piece)
        return importer.close()
    with store.batch() as batch:
        importer = FileImporter(batch)
        for piece in pieces:
            importer.write(piece)
        return importer.close()


def import_stream(stream: BinaryIO, store: Blockstore | None = None) -> ImportResult:
    """Import one file read from a binary stream a chunk at a time."""
    return _import_pieces(iter(functools.partial(stream.read, CHUNK_SIZE), b""), store)


def import_bytes(data: bytes, store: Blockstore | None = None) -> ImportResult:
    """Import ``data`` as one file."""
    return _import_pieces([data], store)
