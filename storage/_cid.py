"""CIDs, unsigned varints and multibase: the small part of multiformats the store speaks.

Only sha2-256 multihashes are accepted: every CID this node makes or trusts is CIDv1 (or a CIDv0 read
from elsewhere) over sha2-256, so a block can always be checked against its name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from functools import lru_cache

import base58

from core.errors import RequestError

RAW = 0x55
DAG_PB = 0x70
DAG_CBOR = 0x71
SHA2_256 = 0x12
SHA2_256_LENGTH = 32
MAX_VARINT_BYTES = 9  # the multiformats unsigned-varint spec caps varints at 63 bits
MAX_CID_TEXT_LENGTH = 256
_CIDV0_PREFIX = bytes([SHA2_256, SHA2_256_LENGTH])


def encode_varint(value: int) -> bytes:
    """``value`` as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError("a varint cannot be negative")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """The varint at ``offset`` and the offset just past it; ``ValueError`` if truncated or too long."""
    value = 0
    shift = 0
    for i in range(offset, min(len(buf), offset + MAX_VARINT_BYTES)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > offset:
                raise ValueError("varint is not minimally encoded")
            return value, i + 1
        shift += 7
    if len(buf) - offset >= MAX_VARINT_BYTES:
        raise ValueError("varint is longer than 9 bytes")
    raise EOFError("varint is truncated")


@dataclass(frozen=True, slots=True)
class CID:
    """A content identifier over a sha2-256 digest: ``codec`` says how to read the block it names.

    ``str()`` gives the canonical text (base32 ``b…`` for CIDv1, base58btc ``Qm…`` for CIDv0);
    :meth:`to_bytes` the binary form used inside CARs and dag-pb links.
    """

    codec: int
    digest: bytes
    version: int = 1

    def __post_init__(self) -> None:
        if len(self.digest) != SHA2_256_LENGTH:
            raise ValueError("a sha2-256 digest is 32 bytes")
        if self.version == 0 and self.codec != DAG_PB:
            raise ValueError("a CIDv0 always names a dag-pb block")
        if self.version not in (0, 1):
            raise ValueError(f"CID version {self.version} is not supported")

    @classmethod
    def for_block(cls, codec: int, data: bytes | bytearray | memoryview) -> CID:
        """The CIDv1 of ``data`` read with ``codec``."""
        return cls(codec, hashlib.sha256(data).digest())

    @property
    def multihash(self) -> bytes:
        return _CIDV0_PREFIX + self.digest

    def to_bytes(self) -> bytes:
        """The binary CID (as in CAR sections and dag-pb links)."""
        if self.version == 0:
            return self.multihash
        return b"\x01" + encode_varint(self.codec) + self.multihash

    def v1(self) -> CID:
        """The same block named as CIDv1 (how the store files it)."""
        return self if self.version == 1 else CID(self.codec, self.digest)

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``data`` hashes to this CID's digest."""
        return hashlib.sha256(data).digest() == self.digest

    def __str__(self) -> str:
        return _text(self)

    def __repr__(self) -> str:
        return f"CID({self})"

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[CID, int]:
        """The binary CID at ``offset`` and the offset past it; ``ValueError``/``EOFError`` if malformed."""
        if len(buf) - offset >= 2 and buf[offset] == SHA2_256 and buf[offset + 1] == SHA2_256_LENGTH:
            end = offset + 2 + SHA2_256_LENGTH
            if end > len(buf):
                raise EOFError("CIDv0 is truncated")
            return cls(DAG_PB, bytes(buf[offset + 2 : end]), 0), end
        version, pos = decode_varint(buf, offset)
        if version != 1:
            raise ValueError(f"CID version {version} is not supported")
        codec, pos = decode_varint(buf, pos)
        hash_code, pos = decode_varint(buf, pos)
        length, pos = decode_varint(buf, pos)
        if hash_code != SHA2_256 or length != SHA2_256_LENGTH:
            raise ValueError(f"multihash 0x{hash_code:x}/{length} is not sha2-256; only sha2-256 is accepted")
        end = pos + length
        if end > len(buf):
            raise EOFError("CID digest is truncated")
        return cls(codec, bytes(buf[pos:end])), end

    @classmethod
    def from_bytes(cls, raw: bytes) -> CID:
        """A CID that is exactly ``raw``; ``ValueError`` otherwise."""
        try:
            cid, end = cls.decode(raw)
        except EOFError as exc:
            raise ValueError(str(exc)) from None
        if end != len(raw):
            raise ValueError("trailing bytes after the CID")
        return cid

    @classmethod
    def parse(cls, text: str) -> CID:
        """The CID written as ``text`` (base32, base58btc, base16 or CIDv0).

        Raises :class:`RequestError` ``invalid_cid`` (400) when it is not a CID this node can check.
        """
        try:
            return _parse(text)
        except (ValueError, binascii.Error) as exc:
            raise RequestError(
                "invalid_cid", f"{text[:80]!r} is not a valid sha2-256 CID: {exc}", details={"cid": text[:80]}
            ) from None


@lru_cache(maxsize=4096)
def _text(cid: CID) -> str:
    if cid.version == 0:
        return base58.b58encode(cid.multihash).decode("ascii")
    return "b" + base64.b32encode(cid.to_bytes()).decode("ascii").lower().rstrip("=")


@lru_cache(maxsize=4096)
def _parse(text: str) -> CID:
    """Parsed CIDs by their text: a CID is immutable, and the same input is named by every quote, run and
    probe of a job (a failure raises and is not kept)."""
    return CID.from_bytes(_multibase_decode(text))


def _multibase_decode(text: str) -> bytes:
    if not text or len(text) > MAX_CID_TEXT_LENGTH or not text.isascii():
        raise ValueError("empty, too long or not ASCII")
    if len(text) == 46 and text.startswith("Qm"):
        return base58.b58decode(text)
    prefix, body = text[0], text[1:]
    if prefix in "bB":
        if not body.isalnum():
            raise ValueError("not base32")
        return base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    if prefix == "z":
        return base58.b58decode(body)
    if prefix in "fF":
        return bytes.fromhex(body)
    raise ValueError(f"multibase prefix {prefix!r} is not supported")
