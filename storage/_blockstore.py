"""The local blockstore: one file per block in 256 shard directories, crash-safe, verified on read.

Layout: ``<root>/<first two hex digits of the sha2-256 digest>/<CIDv1 in base32>``. A CIDv0 is filed
under its CIDv1 name, so both spellings of a dag-pb block find the same file.

Durability: a block is written under a temporary name (``.tmp-…``) in its shard directory, fdatasync'd,
then hard-linked to its CID name (the link fails if the block is already there, which keeps the size
accounting exact) and the temporary name removed; the shard directory is fsync'd before the caller is
told the block is stored. A crash at any point leaves either no CID name or a CID name over complete,
durable bytes. Temporary files never answer to a CID and are swept when the store is next scanned.

Throughput: a :class:`BlockBatch` writes and fdatasyncs blocks on a few threads while the caller hashes
the next chunk, and makes every block visible at once in :meth:`BlockBatch.commit` (one fsync per
touched shard directory). Until then nothing of the batch is visible, so an aborted upload leaves no
trace. One process owns a store directory.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from core.errors import NotFoundError, StorageError
from storage._cid import CID, RAW

DEFAULT_WRITE_THREADS = 4
DEFAULT_WRITES_IN_FLIGHT = 16
TEMP_PREFIX = ".tmp-"
_SHARDS = [f"{i:02x}" for i in range(256)]
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_BLOCK_MODE = 0o444  # blocks never change; read-only guards against accidents


@dataclass(frozen=True, slots=True)
class StoreStats:
    """How much the store holds: block count and bytes (for the metrics endpoint)."""

    blocks: int
    bytes: int


def _io_error(action: str, exc: OSError, **details: object) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # the operator's disk, not an upstream: 507 (not 502) and said plainly, so clients retry later
        return StorageError(
            "blockstore_io_error",
            f"the blockstore could not {action}: its disk is full",
            details={"errno": exc.errno, "cause": "disk_full", **details},
            retryable=True,
        )
    return StorageError(
        "blockstore_io_error",
        f"the blockstore could not {action}: {exc.strerror or exc}",
        details={"errno": exc.errno, **details},
        retryable=True,
    )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Blockstore:
    """A directory of blocks named by CID. Use :meth:`open`; methods block, so call them off the loop."""

    def __init__(self, root: Path, *, verify_reads: bool, write_threads: int) -> None:
        self.root = root
        self.verify_reads = verify_reads
        self.write_threads = write_threads
        # Temporary names carry this token: a temp file without it was left by an earlier process.
        self._token = secrets.token_hex(6)
        self._serial = itertools.count()
        self._lock = threading.Lock()
        self._stats: StoreStats | None = None

    @classmethod
    def open(
        cls, root: Path, *, verify_reads: bool = True, write_threads: int = DEFAULT_WRITE_THREADS
    ) -> Blockstore:
        """The store at ``root``, created (with its shard directories, durably) if new."""
        try:
            fresh = not (root / _SHARDS[-1]).is_dir()
            if fresh:
                root.mkdir(parents=True, exist_ok=True)
                for shard in _SHARDS:
                    (root / shard).mkdir(exist_ok=True)
                _fsync_dir(str(root))
                _fsync_dir(str(root.parent))
        except OSError as exc:
            raise _io_error("create its directories", exc, root=str(root)) from None
        return cls(root, verify_reads=verify_reads, write_threads=max(1, write_threads))

    def _path(self, cid: CID) -> str:
        v1 = cid.v1()
        return f"{self.root}/{v1.digest[:1].hex()}/{v1}"

    def _temp_path(self, final: str) -> str:
        directory = final.rsplit("/", 1)[0]
        return f"{directory}/{TEMP_PREFIX}{self._token}-{next(self._serial)}"

    def has(self, cid: CID) -> bool:
        return os.path.exists(self._path(cid))

    def size(self, cid: CID) -> int | None:
        """The block's length in bytes, or ``None`` when it is not stored."""
        try:
            return os.stat(self._path(cid)).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _io_error("stat a block", exc, cid=str(cid)) from None

    def get(self, cid: CID, *, verify: bool | None = None) -> bytes:
        """The block's bytes, checked against its CID unless ``verify`` (default: the store's) is off.

        Raises :class:`NotFoundError` ``block_not_found`` when absent and :class:`StorageError`
        ``block_corrupt`` when the bytes on disk no longer hash to the CID.
        """
        try:
            with open(self._path(cid), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFoundError(
                "block_not_found", f"block {cid} is not on this node", details={"cid": str(cid)}
            ) from None
        except OSError as exc:
            raise _io_error("read a block", exc, cid=str(cid)) from None
        if (self.verify_reads if verify is None else verify) and not cid.matches(data):
            raise StorageError(
                "block_corrupt",
                f"block {cid} on disk does not match its CID",
                details={"cid": str(cid), "path": self._path(cid)},
            )
        return data

    def put(self, data: bytes, codec: int = RAW) -> CID:
        """Store one block durably and return its CID; a block already stored is left as it is."""
        cid = CID.for_block(codec, data)
        with self.batch() as batch:
            batch.put(cid, data)
        return cid

    def batch(self) -> BlockBatch:
        """A batch of puts that become visible together on commit (use it as a context manager)."""
        return BlockBatch(self)

    def stats(self) -> StoreStats:
        """Blocks and bytes stored. The first call scans the store (and sweeps crash leftovers)."""
        with self._lock:
            if self._stats is None:
                self._stats = self._scan()
            return self._stats

    def sweep_temp_files(self) -> int:
        """Remove temporary files an earlier process left behind; returns how many were removed."""
        with self._lock:
            swept = 0
            for shard in _SHARDS:
                for entry in self._entries(shard):
                    if self._is_stale_temp(entry.name):
                        swept += self._unlink_quietly(entry.path)
            return swept

    def _scan(self) -> StoreStats:
        blocks = total = 0
        for shard in _SHARDS:
            for entry in self._entries(shard):
                if entry.name.startswith(TEMP_PREFIX):
                    if self._is_stale_temp(entry.name):
                        self._unlink_quietly(entry.path)
                    continue
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                blocks += 1
        return StoreStats(blocks, total)

    def _entries(self, shard: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.root / shard) as it:
                return list(it)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _io_error("list a shard directory", exc, shard=shard) from None

    def _is_stale_temp(self, name: str) -> bool:
        return name.startswith(TEMP_PREFIX) and not name.startswith(f"{TEMP_PREFIX}{self._token}-")

    @staticmethod
    def _unlink_quietly(path: str) -> int:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return 1

    def _publish(self, pending: list[tuple[str, str, int]], pool: ThreadPoolExecutor | None) -> None:
        """Link each written temp file to its CID name, drop the temp name, fsync the directories.

        The directory fsyncs run on ``pool`` when given: issued together, the filesystem folds them
        into fewer journal commits.
        """
        added_blocks = added_bytes = 0
        directories: set[str] = set()
        with self._lock:
            for temp, final, size in pending:
                try:
                    os.link(temp, final)
                    added_blocks += 1
                    added_bytes += size
                except FileExistsError:
                    pass  # stored before, or by a concurrent batch: same bytes, nothing to do
                os.unlink(temp)
                directories.add(final.rsplit("/", 1)[0])
            if self._stats is not None:
                self._stats = StoreStats(self._stats.blocks + added_blocks, self._stats.bytes + added_bytes)
        if pool is None:
            for directory in sorted(directories):
                _fsync_dir(directory)
        else:
            list(pool.map(_fsync_dir, sorted(directories)))


class BlockBatch:
    """Puts that are written in the background and become visible together on :meth:`commit`.

    ``with store.batch() as batch:`` commits on a clean exit and aborts (removing every temporary
    file) on an exception. :meth:`put` trusts the caller that the CID names the bytes: the importer
    and the CAR reader have hashed them already, and hashing twice would halve throughput.
    """

    def __init__(self, store: Blockstore) -> None:
        self._store = store
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(DEFAULT_WRITES_IN_FLIGHT)
        self._lock = threading.Lock()
        # Held by put/commit/abort: an abort from the event loop waits for a put running in a worker
        # thread to finish, so no block is scheduled after the abort has cleaned up.
        self._use = threading.RLock()
        self._pending: list[tuple[str, str, int]] = []
        self._error: BaseException | None = None
        self._state: Literal["open", "committed", "aborted"] = "open"

    def __enter__(self) -> BlockBatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def put(self, cid: CID, data: bytes | memoryview) -> None:
        """Schedule ``data`` to be stored as ``cid``; ``data`` must not change until :meth:`flush`."""
        with self._use:
            if self._state != "open":
                raise StorageError("batch_closed", "this block batch is already committed or aborted")
            self._raise_pending_error()
            final = self._store._path(cid)
            if os.path.exists(final):
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._store.write_threads, thread_name_prefix="hearth-blocks")
            self._slots.acquire()
            try:
                self._pool.submit(self._write, final, data)
            except BaseException:
                self._slots.release()
                raise

    def _write(self, final: str, data: bytes | memoryview) -> None:
        temp = self._store._temp_path(final)
        try:
            fd = os.open(temp, _OPEN_NEW, _BLOCK_MODE)
            try:
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                os.fdatasync(fd)
            finally:
                os.close(fd)
            with self._lock:
                self._pending.append((temp, final, written))
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
            with contextlib.suppress(OSError):
                os.unlink(temp)
        finally:
            self._slots.release()

    def _raise_pending_error(self) -> None:
        error = self._error
        if error is None:
            return
        self.abort()
        if isinstance(error, OSError):
            raise _io_error("write a block", error) from error
        raise error

    def flush(self) -> None:
        """Wait until every scheduled block is written and synced (still invisible until commit)."""
        for _ in range(DEFAULT_WRITES_IN_FLIGHT):
            self._slots.acquire()
        for _ in range(DEFAULT_WRITES_IN_FLIGHT):
            self._slots.release()
        self._raise_pending_error()

    def commit(self) -> None:
        """Make every block of the batch visible and durable; raises if any write failed (and aborts)."""
        with self._use:
            if self._state != "open":
                raise StorageError("batch_closed", "this block batch is already committed or aborted")
            self.flush()
            try:
                self._store._publish(self._pending, self._pool)
            except OSError as exc:
                self.abort()
                raise _io_error("publish blocks", exc) from None
            finally:
                self._close_pool()
            self._pending = []
            self._state = "committed"

    def abort(self) -> None:
        """Drop the batch: wait for writes in flight, then remove every temporary file."""
        with self._use:
            if self._state != "open":
                return
            self._state = "aborted"
            self._close_pool()
            for temp, _final, _size in self._pending:
                Blockstore._unlink_quietly(temp)
            self._pending = []

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
