"""Signing keys: the node's (and tools') identities, and the key file they live in.

A :class:`Signer` is what signs JWS tokens: an Ed25519 key behind a ``did:key``, or a secp256k1
Ethereum key behind a ``did:pkh:eip155``. Secret bytes never appear in a repr, an exception message or
error details; they leave a signer only through the explicitly named ``seed_bytes()`` /
``private_key_bytes()`` (for the key file, and for EIP-712 signing with eth_account).

The key file is JSON, mode 0600 from the moment it exists::

    {"type": "ed25519", "seed": "<64 hex>"}
    {"type": "secp256k1", "private_key": "<64 hex>", "chain_id": 1}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import coincurve
from eth_hash.auto import keccak
from nacl.signing import SigningKey

from core.errors import ConfigError
from payments.did import did_key_from_ed25519, did_pkh, to_checksum_address, verification_fragment

Alg = Literal["EdDSA", "ES256K"]

SECRET_LENGTH = 32
KEY_FILE_MODE = 0o600
MAX_KEY_FILE_BYTES = 4096


class Signer(ABC):
    """A private key that signs JWS tokens for one DID.

    ``sign`` returns the raw JWS signature: 64 bytes for EdDSA, ``r || s`` (low-S) over
    ``sha256(message)`` for ES256K.
    """

    alg: ClassVar[Alg]
    key_type: ClassVar[str]

    def __init__(self, did: str) -> None:
        self._did = did
        self._kid = f"{did}#{verification_fragment(did)}"

    @property
    def did(self) -> str:
        """The DID this key speaks for."""
        return self._did

    @property
    def kid(self) -> str:
        """The JWS ``kid``: the DID URL of this key's verification method (``did#fragment``)."""
        return self._kid

    @abstractmethod
    def sign(self, message: bytes) -> bytes:
        """The raw JWS signature of ``message`` (the ASCII signing input ``header.payload``)."""

    @abstractmethod
    def _key_file_fields(self) -> dict[str, Any]:
        """The JSON fields that recreate this key (secret included); used by :func:`save_key` only."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(did={self._did!r})"


class Ed25519Signer(Signer):
    """An Ed25519 key (PyNaCl) behind a ``did:key:z6Mk...``; signs with ``alg`` EdDSA."""

    alg: ClassVar[Alg] = "EdDSA"
    key_type: ClassVar[str] = "ed25519"

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SECRET_LENGTH:
            raise ValueError(f"an Ed25519 seed is {SECRET_LENGTH} bytes")
        self._signing_key = SigningKey(bytes(seed))
        self._public_key = bytes(self._signing_key.verify_key)
        super().__init__(did_key_from_ed25519(self._public_key))

    @classmethod
    def generate(cls) -> Ed25519Signer:
        """A fresh key from the OS CSPRNG."""
        return cls(secrets.token_bytes(SECRET_LENGTH))

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public_key

    def seed_bytes(self) -> bytes:
        """The 32-byte secret seed. Handle with care: this is the whole identity."""
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._signing_key.sign(message).signature)

    def _key_file_fields(self) -> dict[str, Any]:
        return {"type": self.key_type, "seed": self.seed_bytes().hex()}


class EthSigner(Signer):
    """A secp256k1 Ethereum key (coincurve) behind ``did:pkh:eip155:<chain_id>:<address>``; ``alg`` ES256K."""

    alg: ClassVar[Alg] = "ES256K"
    key_type: ClassVar[str] = "secp256k1"

    def __init__(self, private_key: bytes, chain_id: int) -> None:
        if len(private_key) != SECRET_LENGTH:
            raise ValueError(f"a secp256k1 private key is {SECRET_LENGTH} bytes")
        try:
            self._private_key = coincurve.PrivateKey(bytes(private_key))
        except ValueError:
            raise ValueError(
                "not a valid secp256k1 private key (zero or not below the group order)"
            ) from None
        self._chain_id = chain_id
        self._address = address_of_public_key(self._private_key.public_key.format(compressed=False))
        super().__init__(did_pkh(chain_id, self._address))

    @classmethod
    def generate(cls, chain_id: int) -> EthSigner:
        """A fresh key from the OS CSPRNG."""
        return cls(coincurve.PrivateKey().secret, chain_id)

    @property
    def address(self) -> str:
        """The EIP-55 checksummed account address."""
        return self._address

    @property
    def chain_id(self) -> int:
        """The EIP-155 chain id in the DID."""
        return self._chain_id

    def private_key_bytes(self) -> bytes:
        """The 32-byte private key, e.g. for ``eth_account.Account.from_key``. Handle with care."""
        return bytes(self._private_key.secret)

    def sign(self, message: bytes) -> bytes:
        digest = hashlib.sha256(message).digest()
        # libsecp256k1 always produces low-S signatures; drop the recovery byte for plain ES256K.
        return bytes(self._private_key.sign_recoverable(digest, hasher=None)[:64])

    def _key_file_fields(self) -> dict[str, Any]:
        return {
            "type": self.key_type,
            "private_key": self.private_key_bytes().hex(),
            "chain_id": self._chain_id,
        }


def address_of_public_key(uncompressed: bytes) -> str:
    """The EIP-55 address of a 65-byte uncompressed secp256k1 public key (``04 || x || y``)."""
    if len(uncompressed) != 65 or uncompressed[0] != 4:
        raise ValueError("expected a 65-byte uncompressed secp256k1 public key")
    return to_checksum_address("0x" + keccak(uncompressed[1:])[-20:].hex())


def new_ed25519() -> Ed25519Signer:
    """A fresh Ed25519 signer (``did:key``)."""
    return Ed25519Signer.generate()


def new_eth(chain_id: int) -> EthSigner:
    """A fresh Ethereum signer (``did:pkh:eip155:<chain_id>:...``)."""
    return EthSigner.generate(chain_id)


def public_summary(signer: Signer) -> dict[str, str]:
    """What may be shown about a key: ``did``, ``kid``, ``alg`` and, for Ethereum keys, ``address``."""
    summary = {"did": signer.did, "kid": signer.kid, "alg": signer.alg}
    if isinstance(signer, EthSigner):
        summary["address"] = signer.address
    return summary


# ---------------------------------------------------------------------------------------------- key file


def save_key(signer: Signer, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write ``signer`` to a key file that is mode 0600 from its first byte, atomically.

    The file is written under a temporary name (``O_CREAT | O_EXCL``, mode 0600), fsynced, then linked
    into place (or, with ``overwrite``, renamed over the old one), so a reader never sees half a key.
    Raises ``ConfigError("key_file_exists")`` if ``path`` exists and ``overwrite`` is false.
    """
    target = Path(path)
    if not overwrite and os.path.lexists(target):
        raise _key_file_exists(target)
    data = json.dumps(signer._key_file_fields(), separators=(",", ":")).encode("ascii") + b"\n"
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_FILE_MODE)
        try:
            os.fchmod(fd, KEY_FILE_MODE)  # the umask can only remove bits; make the mode exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temporary, target)
        else:
            os.link(temporary, target)  # fails, rather than replaces, if the path appeared meanwhile
        _fsync_directory(target.parent)
    except FileExistsError:
        raise _key_file_exists(target) from None
    except OSError as exc:
        raise ConfigError(
            "key_file_unwritable",
            f"cannot write key file {str(target)!r}: {exc.strerror}",
            details={"path": str(target), "errno": exc.errno},
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def load_key(path: str | os.PathLike[str], *, group_readable: bool = False) -> Signer:
    """Read a key file written by :func:`save_key`.

    Refuses (``key_file_permissions``) a file that group or others may access, like ssh does, and
    (``invalid_key_file``) anything that is not exactly one of the two JSON shapes. ``group_readable``
    lets the group read it: systemd credentials are 0440 in a directory only the service may open.
    """
    source = Path(path)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang us
    except FileNotFoundError:
        raise ConfigError(
            "key_file_missing", f"key file {str(source)!r} does not exist", details={"path": str(source)}
        ) from None
    except OSError as exc:
        raise ConfigError(
            "key_file_unreadable",
            f"cannot open key file {str(source)!r}: {exc.strerror}",
            details={"path": str(source), "errno": exc.errno},
        ) from None
    try:
        info = os.fstat(fd)  # of the opened file itself: no check-then-open race
        if not stat.S_ISREG(info.st_mode):
            raise _invalid_key_file(source, "not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & (0o037 if group_readable else 0o077):
            raise ConfigError(
                "key_file_permissions",
                f"key file {str(source)!r} is accessible by group or others (mode {mode:04o}); chmod 600 it",
                details={"path": str(source), "expected": f"{KEY_FILE_MODE:04o}", "got": f"{mode:04o}"},
            )
        raw = _read_up_to(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise _invalid_key_file(source, f"larger than {MAX_KEY_FILE_BYTES} bytes")
    return _signer_from_fields(source, raw)


def load_eth_key(
    path: str | os.PathLike[str], *, role: str = "wallet", group_readable: bool = False
) -> EthSigner:
    """Like :func:`load_key`, for a key that must sign for an Ethereum account (a wallet, a validator).

    An Ed25519 key is refused as ``<role>_key_not_ethereum``.
    """
    signer = load_key(path, group_readable=group_readable)
    if not isinstance(signer, EthSigner):
        raise ConfigError(
            f"{role}_key_not_ethereum",
            f"{path} holds a {signer.key_type} key; a {role} needs a secp256k1 (Ethereum) key",
            details={"path": str(path), "key_type": signer.key_type},
        )
    return signer


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _signer_from_fields(source: Path, raw: bytes) -> Signer:
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _invalid_key_file(source, "not JSON") from None
    if not isinstance(fields, dict):
        raise _invalid_key_file(source, "not a JSON object")
    key_type = fields.get("type")
    try:
        if key_type == Ed25519Signer.key_type:
            _expect_fields(source, fields, {"type", "seed"})
            return Ed25519Signer(_secret_hex(source, fields, "seed"))
        if key_type == EthSigner.key_type:
            _expect_fields(source, fields, {"type", "private_key", "chain_id"})
            chain_id = fields["chain_id"]
            if isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id <= 0:
                raise _invalid_key_file(source, "chain_id must be a positive integer")
            return EthSigner(_secret_hex(source, fields, "private_key"), chain_id)
    except ValueError as exc:  # the constructors' messages never contain key material
        raise _invalid_key_file(source, str(exc)) from None
    raise _invalid_key_file(source, f"type must be {Ed25519Signer.key_type!r} or {EthSigner.key_type!r}")


def _expect_fields(source: Path, fields: dict[str, Any], expected: set[str]) -> None:
    if set(fields) != expected:
        raise _invalid_key_file(
            source, f"expected exactly the fields {sorted(expected)}, got {sorted(str(k) for k in fields)}"
        )


def _secret_hex(source: Path, fields: dict[str, Any], name: str) -> bytes:
    value = fields[name]
    if not isinstance(value, str) or len(value) != 2 * SECRET_LENGTH:
        raise _invalid_key_file(source, f"{name} must be {2 * SECRET_LENGTH} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _invalid_key_file(source, f"{name} must be {2 * SECRET_LENGTH} hex digits") from None


def _invalid_key_file(source: Path, reason: str) -> ConfigError:
    return ConfigError(
        "invalid_key_file",
        f"key file {str(source)!r} is invalid: {reason}",
        details={"path": str(source), "reason": reason},
    )


def _key_file_exists(target: Path) -> ConfigError:
    return ConfigError(
        "key_file_exists",
        f"key file {str(target)!r} already exists; refusing to overwrite it",
        details={"path": str(target)},
    )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
