"""dag-pb nodes and their UnixFS payloads, encoded byte for byte as the reference importers do.

A dag-pb ``PBNode`` is written links first (field 2, each ``Hash``/``Name``/``Tsize``), then ``Data``
(field 1), links sorted by name bytes. ``Data`` holds a UnixFS ``Data`` message: ``Type`` always, then
``Data``, ``filesize`` and one ``blocksizes`` entry per child (not packed), as go and js UnixFS write them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from storage._cid import CID, decode_varint, encode_varint

_WIRE_VARINT = 0
_WIRE_I64 = 1
_WIRE_LEN = 2
_WIRE_I32 = 5


class UnixFSType(IntEnum):
    """The UnixFS ``Data.Type`` values."""

    RAW = 0
    DIRECTORY = 1
    FILE = 2
    METADATA = 3
    SYMLINK = 4
    HAMT_SHARD = 5


@dataclass(frozen=True, slots=True)
class PBLink:
    """One dag-pb link: the child's CID, its name (empty inside files) and the bytes of its whole DAG."""

    cid: CID
    name: str
    tsize: int


@dataclass(frozen=True, slots=True)
class UnixFSData:
    """A decoded UnixFS ``Data`` message (mode, mtime and HAMT fields are read past, not kept)."""

    type: UnixFSType
    data: bytes = b""
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)


def _key(field_number: int, wire: int) -> bytes:
    return encode_varint(field_number << 3 | wire)


def _len_field(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, _WIRE_LEN) + encode_varint(len(payload)) + payload


def encode_unixfs(
    kind: UnixFSType, *, data: bytes = b"", filesize: int | None = None, blocksizes: Sequence[int] = ()
) -> bytes:
    """A UnixFS ``Data`` message; ``Data`` is omitted when empty, as the reference encoders do."""
    out = bytearray(_key(1, _WIRE_VARINT) + encode_varint(int(kind)))
    if data:
        out += _len_field(2, data)
    if filesize is not None:
        out += _key(3, _WIRE_VARINT) + encode_varint(filesize)
    for size in blocksizes:
        out += _key(4, _WIRE_VARINT) + encode_varint(size)
    return bytes(out)


def encode_node(links: Sequence[PBLink], data: bytes | None) -> bytes:
    """A canonical dag-pb block: links sorted by UTF-8 name bytes (stable for equal names), then data."""
    ordered = sorted(links, key=lambda link: link.name.encode())
    out = bytearray()
    for link in ordered:
        body = _len_field(1, link.cid.to_bytes()) + _len_field(2, link.name.encode()) + _key(3, _WIRE_VARINT)
        body += encode_varint(link.tsize)
        out += _len_field(2, body)
    if data is not None:
        out += _len_field(1, data)
    return bytes(out)


def _fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each protobuf field; ``ValueError`` when malformed."""
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        try:
            key, pos = decode_varint(view, pos)
            number, wire = key >> 3, key & 7
            if wire == _WIRE_VARINT:
                value, pos = decode_varint(view, pos)
                yield number, wire, value
            elif wire == _WIRE_LEN:
                length, pos = decode_varint(view, pos)
                if pos + length > len(view):
                    raise ValueError("length-delimited field runs past the end")
                yield number, wire, view[pos : pos + length]
                pos += length
            elif wire in (_WIRE_I64, _WIRE_I32):
                pos += 8 if wire == _WIRE_I64 else 4
                if pos > len(view):
                    raise ValueError("fixed-width field runs past the end")
            else:
                raise ValueError(f"protobuf wire type {wire} is not supported")
        except EOFError:
            raise ValueError("protobuf message is truncated") from None


def decode_node(block: bytes | memoryview) -> tuple[list[PBLink], bytes | None]:
    """The links and data of a dag-pb block; ``ValueError`` when it is not valid dag-pb."""
    links: list[PBLink] = []
    data: bytes | None = None
    for number, wire, value in _fields(block):
        if number == 2 and isinstance(value, memoryview):
            links.append(_decode_link(value))
        elif number == 1 and isinstance(value, memoryview):
            data = bytes(value)
        else:
            raise ValueError(f"unexpected dag-pb field {number} (wire type {wire})")
    return links, data


def _decode_link(buf: memoryview) -> PBLink:
    cid: CID | None = None
    name = ""
    tsize = 0
    for number, _wire, value in _fields(buf):
        if number == 1 and isinstance(value, memoryview):
            cid = CID.from_bytes(bytes(value))
        elif number == 2 and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8")
        elif number == 3 and isinstance(value, int):
            tsize = value
        else:
            raise ValueError(f"unexpected dag-pb link field {number}")
    if cid is None:
        raise ValueError("dag-pb link without a Hash")
    return PBLink(cid, name, tsize)


def decode_unixfs(buf: bytes) -> UnixFSData:
    """A UnixFS ``Data`` message; ``ValueError`` when malformed or of an unknown type."""
    kind: int | None = None
    data = b""
    filesize: int | None = None
    blocksizes: list[int] = []
    for number, _wire, value in _fields(buf):
        if number == 1 and isinstance(value, int):
            kind = value
        elif number == 2 and isinstance(value, memoryview):
            data = bytes(value)
        elif number == 3 and isinstance(value, int):
            filesize = value
        elif number == 4 and isinstance(value, int):
            blocksizes.append(value)
        elif number == 4 and isinstance(value, memoryview):  # packed encoding, accepted when read
            pos = 0
            while pos < len(value):
                try:
                    size, pos = decode_varint(value, pos)
                except EOFError:
                    raise ValueError("packed blocksizes are truncated") from None
                blocksizes.append(size)
    if kind is None:
        raise ValueError("UnixFS Data without a Type")
    try:
        unixfs_type = UnixFSType(kind)
    except ValueError:
        raise ValueError(f"unknown UnixFS type {kind}") from None
    return UnixFSData(unixfs_type, data, filesize, blocksizes)
