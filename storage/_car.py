"""CAR v1: a dag-cbor header ``{roots, version: 1}`` then varint-length-prefixed ``CID ‖ block`` sections.

Writing streams from the blockstore in DFS order. Reading is a push parser (:class:`CarReader`) fed
whatever pieces arrive (a file, an HTTP body), so sync and async sources share it; every block is
checked against its CID before it is handed out, and sizes are capped before anything is buffered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from core.errors import StorageError
from storage._blockstore import Blockstore
from storage._cid import CID, decode_varint, encode_varint
from storage._dag import DagScope, iter_blocks

CAR_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_BLOCK_BYTES = 2 * 1024 * 1024  # the largest block IPFS implementations exchange
READ_CHUNK_BYTES = 1024 * 1024
_CID_TAG = 42
_MAX_CBOR_DEPTH = 4


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([major << 5 | info]) + value.to_bytes(width, "big")
    raise ValueError("CBOR length too large")


def encode_header(roots: Sequence[CID]) -> bytes:
    """The length-prefixed CAR v1 header; dag-cbor map keys sorted by length, then bytes."""
    body = bytearray(_cbor_head(5, 2))
    body += _cbor_head(3, 5) + b"roots" + _cbor_head(4, len(roots))
    for root in roots:
        link = b"\x00" + root.to_bytes()  # dag-cbor links are tag 42 over a 0x00-prefixed binary CID
        body += _cbor_head(6, _CID_TAG) + _cbor_head(2, len(link)) + link
    body += _cbor_head(3, 7) + b"version" + _cbor_head(0, CAR_VERSION)
    return encode_varint(len(body)) + bytes(body)


def section_prefix(cid: CID, block_length: int) -> bytes:
    """What precedes a block in a CAR: the section length varint and the CID."""
    raw = cid.to_bytes()
    return encode_varint(len(raw) + block_length) + raw


def iter_car(
    store: Blockstore, root: CID, *, scope: DagScope = "all", path_blocks: Iterable[CID] = ()
) -> Iterator[bytes]:
    """The CAR of ``root``'s DAG as byte pieces: header, then ``path_blocks``, then the DAG in DFS order.

    ``path_blocks`` are the directories crossed to reach ``root`` from the CID a client asked for (a
    trustless gateway sends them first so the client can verify the path); the header then names the
    first of them, the requested CID, as the CAR's root.
    """
    path = list(path_blocks)
    yield encode_header([path[0] if path else root])
    for cid in path:
        block = store.get(cid)
        yield section_prefix(cid, len(block))
        yield block
    for cid, block in iter_blocks(store, root, scope):
        yield section_prefix(cid, len(block))
        yield block


def write_car(store: Blockstore, root: CID, out: BinaryIO) -> int:
    """Write the CAR of ``root``'s whole DAG to ``out``; returns the bytes written."""
    written = 0
    for piece in iter_car(store, root):
        out.write(piece)
        written += len(piece)
    return written


def _malformed(message: str, **details: object) -> StorageError:
    return StorageError("malformed_car", f"malformed CAR: {message}", details=dict(details))


class CarReader:
    """A push parser for CAR v1: :meth:`feed` bytes, get back verified ``(cid, block)`` pairs.

    Raises :class:`StorageError` ``malformed_car`` for a bad structure, ``cid_mismatch`` when a block
    does not hash to its CID, ``car_block_too_large`` past ``max_block_bytes``. Neither is retryable:
    the bytes themselves are wrong.
    """

    def __init__(self, *, max_block_bytes: int = MAX_BLOCK_BYTES) -> None:
        self.roots: list[CID] | None = None
        self.bytes_read = 0
        self._max_block = max_block_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[CID, bytes]]:
        """Take the next piece of the CAR; returns every block it completed."""
        self._buffer += data
        self.bytes_read += len(data)
        out: list[tuple[CID, bytes]] = []
        pos = 0
        buf = self._buffer
        while True:
            try:
                length, start = decode_varint(buf, pos)
            except EOFError:
                break
            except ValueError as exc:
                raise _malformed(str(exc)) from None
            limit = MAX_HEADER_BYTES if self.roots is None else self._max_block + 64
            if length > limit:
                if self.roots is None:
                    raise _malformed(f"header of {length} bytes exceeds {MAX_HEADER_BYTES}")
                raise StorageError(
                    "car_block_too_large",
                    f"a CAR section of {length} bytes exceeds the {self._max_block}-byte block limit",
                    details={"max_block_bytes": self._max_block},
                )
            end = start + length
            if end > len(buf):
                break
            section = memoryview(buf)[start:end]
            try:
                if self.roots is None:
                    self.roots = _decode_header(section)
                else:
                    out.append(_verified_block(section))
            finally:
                section.release()
            pos = end
        del buf[:pos]
        return out

    def finish(self) -> None:
        """Check the CAR ended on a section boundary (and had a header at all)."""
        if self.roots is None:
            raise _malformed("no header")
        if self._buffer:
            raise _malformed(f"{len(self._buffer)} trailing bytes after the last whole section")


def _verified_block(section: memoryview) -> tuple[CID, bytes]:
    try:
        cid, offset = CID.decode(section)
    except (ValueError, EOFError) as exc:
        raise _malformed(f"bad section CID: {exc}") from None
    block = bytes(section[offset:])
    if not cid.matches(block):
        raise StorageError("cid_mismatch", f"block {cid} does not hash to its CID", details={"cid": str(cid)})
    return cid, block


def read_car(
    stream: BinaryIO, *, max_block_bytes: int = MAX_BLOCK_BYTES
) -> tuple[list[CID], Iterator[tuple[CID, bytes]]]:
    """The roots of the CAR on ``stream`` and an iterator over its verified blocks (read lazily)."""
    reader = CarReader(max_block_bytes=max_block_bytes)
    pending: list[tuple[CID, bytes]] = []
    while reader.roots is None:
        piece = stream.read(READ_CHUNK_BYTES)
        if not piece:
            reader.finish()
        pending.extend(reader.feed(piece))

    def blocks() -> Iterator[tuple[CID, bytes]]:
        yield from pending
        while piece := stream.read(READ_CHUNK_BYTES):
            yield from reader.feed(piece)
        reader.finish()

    return reader.roots, blocks()


# -- the few dag-cbor forms a CAR header uses -------------------------------------------------------


def _decode_header(section: memoryview) -> list[CID]:
    try:
        header, end = _cbor_item(section, 0, 0)
    except (ValueError, EOFError, IndexError) as exc:
        raise _malformed(f"bad header: {exc}") from None
    if end != len(section) or not isinstance(header, dict):
        raise _malformed("the header is not a single dag-cbor map")
    version = header.get("version")
    if version != CAR_VERSION:
        raise StorageError(
            "unsupported_car_version",
            f"CAR version {version!r} is not supported; send CAR v1",
            details={"version": repr(version)},
        )
    roots = header.get("roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, CID) for r in roots):
        raise _malformed("header roots are not a list of CIDs")
    return list(roots)


def _cbor_item(buf: memoryview, pos: int, depth: int) -> tuple[object, int]:
    if depth > _MAX_CBOR_DEPTH:
        raise ValueError("nested too deeply")
    initial = buf[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        value = info
    elif info <= 27:
        width = 1 << (info - 24)
        if pos + width > len(buf):
            raise EOFError("truncated")
        value = int.from_bytes(buf[pos : pos + width], "big")
        pos += width
    else:
        raise ValueError("indefinite lengths and reserved values are not dag-cbor")
    if major == 0:
        return value, pos
    if major == 1:
        return -1 - value, pos
    if major in (2, 3):
        if pos + value > len(buf):
            raise EOFError("truncated string")
        raw = bytes(buf[pos : pos + value])
        return (raw if major == 2 else raw.decode("utf-8")), pos + value
    if major == 4:
        items = []
        for _ in range(value):
            item, pos = _cbor_item(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        mapping: dict[object, object] = {}
        for _ in range(value):
            key, pos = _cbor_item(buf, pos, depth + 1)
            if not isinstance(key, str):
                raise ValueError("dag-cbor map keys are strings")
            mapping[key], pos = _cbor_item(buf, pos, depth + 1)
        return mapping, pos
    if major == 6 and value == _CID_TAG:
        raw_link, pos = _cbor_item(buf, pos, depth + 1)
        if not isinstance(raw_link, bytes) or not raw_link.startswith(b"\x00"):
            raise ValueError("tag 42 must wrap a 0x00-prefixed byte string")
        return CID.from_bytes(raw_link[1:]), pos
    if major == 7 and info in (20, 21, 22):
        return (False, True, None)[info - 20], pos
    raise ValueError(f"CBOR major type {major} (info {info}) is not expected in a CAR header")
