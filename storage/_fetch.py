"""Fetching a job's input to a local file, verified end to end, and any DAG as a verified CAR.

:func:`fetch_car` brings one DAG from one trustless gateway into a blockstore (every block checked
against its CID and against the DAG's links, the size bounded); the node's ``ipfs://`` inputs and the
validator's artifacts both come through it.

- ``ipfs://CID[/path]``: served from the local blockstore when its DAG is complete there; otherwise
  fetched as a CAR from each configured trustless gateway in turn. Every block is checked against its
  CID, and must be one the DAG so far links to (a gateway cannot fill the disk with other blocks),
  before it is stored; blocks become visible only once the whole CAR is in. The file is then put
  together from the local store.
- ``https://…``: needs the expected sha256; streamed to disk with a size cap, checked, then imported
  into the store so the input has a CID for replay.
- a bare CID: a blob uploaded to this node (``PUT /v1/blobs``), read from the local store only.

Where the node connects. An ``https://`` input is a URL a requester chose, so every connection for it
obeys the address policy (:mod:`core.netpolicy`, ``[storage] allow_private_addresses`` and
``allow_networks``): the host as written is checked before each request, every address a name resolves
to is checked before aiohttp may connect to it, and redirects are followed (at most ``[storage]
max_redirects``, ``https://`` only) one hop at a time, each hop checked the same way before it is
requested. Gateways are the operator's: their configured hosts are trusted as named (a local Kubo on
``http://127.0.0.1:8080`` works as is), and a gateway's redirect is never followed, so a requester, who
chooses only the CID and path, cannot steer a gateway connection anywhere.

What the requester sees. A refused address is ``input_not_allowed`` (403, not retryable). Anything that
goes wrong on the connection itself (refused, reset, timed out, a TLS failure) is ``input_unreachable``
(retryable) with one fixed message and no details, so a job's failure cannot tell a closed port from an
open one; the operator's log keeps what happened.

Failures are :class:`~core.errors.StorageError`: ``cid_mismatch``, ``sha256_mismatch``,
``unexpected_block``, ``malformed_car``, ``input_too_large``, ``input_not_allowed`` and
``too_many_redirects`` are not retryable (the bytes or the URL are wrong); ``input_unreachable``,
``gateway_unreachable`` and ``gateways_unavailable`` are.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import aiohttp
from yarl import URL

from core.config import StorageSection
from core.errors import NotFoundError, RequestError, StorageError
from core.netpolicy import AddressNotAllowed, AddressPolicy
from storage._blockstore import BlockBatch, Blockstore
from storage._car import MAX_BLOCK_BYTES, CarReader
from storage._cid import CID, DAG_PB
from storage._dag import entity_kind, export_file, file_size, first_missing, resolve_path
from storage._dagpb import UnixFSType, decode_node, decode_unixfs
from storage._gateway import CAR_CONTENT_TYPE, CAR_MEDIA_TYPE, MIB
from storage._importer import import_path

log = logging.getLogger("hearth.storage")

IPFS_SCHEME = "ipfs://"
HTTPS_SCHEME = "https://"
FETCH_PIECE_BYTES = 1024 * 1024  # downloaded bytes gathered before one hop to a worker thread
# A CAR carries the file's bytes plus its dag-pb nodes and framing: allow that much over the input cap.
CAR_OVERHEAD_ALLOWANCE = 1 / 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The one message every connection-level failure of an https:// input gets: what differs stays in the log.
UNREACHABLE_MESSAGE = "the input's URL could not be fetched: its server gave no usable answer"
NOT_ALLOWED_MESSAGE = (
    "the input's URL names an address this node does not connect to "
    "(loopback, private, link-local or otherwise not public)"
)


@dataclass(frozen=True, slots=True)
class FetchedInput:
    """An input on local disk: its path, size, sha256, CID and where it came from."""

    path: Path
    size: int
    sha256: str
    cid: CID
    source: str  # "local", the gateway's URL, or the https URL


def _too_large(subject: str, cap: int) -> StorageError:
    return StorageError(
        "input_too_large",
        f"{subject} is larger than the input cap of {cap} bytes",
        details={"max_bytes": cap},
    )


def input_policy(config: StorageSection) -> AddressPolicy:
    """The address policy for ``https://`` inputs and their redirects: ``[storage]``'s allowances."""
    return AddressPolicy.from_settings(
        allow_private=config.allow_private_addresses, allow_networks=config.allow_networks
    )


def gateway_policy(config: StorageSection) -> AddressPolicy:
    """The input policy, with the configured gateways' hosts trusted: the operator chose them."""
    hosts = [URL(g).raw_host or "" for g in config.gateways]  # as aiohttp will connect to them
    return AddressPolicy.from_settings(
        allow_private=config.allow_private_addresses,
        allow_networks=config.allow_networks,
        trusted_hosts=[h for h in hosts if h],
    )


def _not_allowed(exc: AddressNotAllowed) -> StorageError:
    log.warning(
        "input fetch refused by the address policy: %s",
        exc,
        extra={"host": exc.host, "address": exc.address, "reason": exc.reason},
    )
    return StorageError("input_not_allowed", NOT_ALLOWED_MESSAGE, retryable=False)


def _segments(path: str) -> list[str]:
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise RequestError("invalid_input_uri", "an ipfs:// path may not contain '.' or '..'")
    return segments


async def fetch_input(
    uri: str,
    dest: Path,
    *,
    store: Blockstore,
    config: StorageSection,
    sha256: str | None = None,
    session: aiohttp.ClientSession | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> FetchedInput:
    """Fetch ``uri`` (``ipfs://``, ``https://`` or a bare CID) to ``dest``, verified.

    ``session`` lets a caller share its connections to the gateways (it is used for nothing else: an
    ``https://`` input always goes through a session of the address policy); ``ssl_context`` replaces
    the system trust store (tests use it to trust a self-signed certificate; production leaves it out).
    """
    if uri.startswith(IPFS_SCHEME):
        cid_text, _, path = uri[len(IPFS_SCHEME) :].partition("/")
        root, segments = CID.parse(cid_text), _segments(path)
    elif uri.startswith(HTTPS_SCHEME):
        root, segments = None, []
    elif "://" in uri:
        raise RequestError(
            "unsupported_scheme",
            f"input {uri[:80]!r}: only ipfs://, https:// and bare CIDs are fetched",
            details={"uri": uri[:200]},
        )
    else:
        return await _from_store(store, CID.parse(uri), dest, config.max_input_mb * MIB)
    policy = input_policy(config) if root is None else gateway_policy(config)
    if root is not None and session is not None:
        return await _Fetcher(store, config, session, policy, ssl_context).ipfs(root, segments, dest)
    async with aiohttp.ClientSession(connector=policy.connector()) as client:
        fetcher = _Fetcher(store, config, client, policy, ssl_context)
        if root is None:
            return await fetcher.https(uri, dest, sha256)
        return await fetcher.ipfs(root, segments, dest)


async def _from_local(
    store: Blockstore, root: CID, segments: list[str], dest: Path, cap: int
) -> FetchedInput | None:
    """The input exported from the local store, or ``None`` when its DAG is not all here."""
    return await asyncio.to_thread(_export_if_complete, store, root, segments, dest, cap)


async def _from_store(store: Blockstore, cid: CID, dest: Path, cap: int) -> FetchedInput:
    """A blob uploaded to this node: only the local store is asked."""
    exported = await _from_local(store, cid, [], dest, cap)
    if exported is None:
        raise StorageError(
            "blob_not_found",
            f"{cid} is not stored on this node; upload it with PUT /v1/blobs or use ipfs://",
            details={"cid": str(cid)},
        )
    return exported


def _export_if_complete(
    store: Blockstore, root: CID, segments: list[str], dest: Path, cap: int
) -> FetchedInput | None:
    try:
        target, _passed = resolve_path(store, root, segments)
    except NotFoundError as exc:
        if exc.code == "block_not_found":
            return None
        raise
    if first_missing(store, target) is not None:
        return None
    if entity_kind(store, target) != "file":
        raise StorageError("not_a_file", f"input {target} is not a file", details={"cid": str(target)})
    if file_size(store, target) > cap:
        raise _too_large(f"input {target}", cap)
    exported = export_file(store, target, dest, max_bytes=cap)
    return FetchedInput(dest, exported.size, exported.sha256, target, "local")


class _Fetcher:
    def __init__(
        self,
        store: Blockstore,
        config: StorageSection,
        session: aiohttp.ClientSession,
        policy: AddressPolicy,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.store = store
        self.config = config
        self.session = session
        self.policy = policy
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.cap = config.max_input_mb * MIB
        self.timeout = aiohttp.ClientTimeout(
            total=config.fetch_timeout_seconds,
            sock_connect=config.connect_timeout_seconds,
            sock_read=config.read_timeout_seconds,
        )

    # -- ipfs:// --------------------------------------------------------------------------------------

    async def ipfs(self, root: CID, segments: list[str], dest: Path) -> FetchedInput:
        local = await _from_local(self.store, root, segments, dest, self.cap)
        if local is not None:
            return local
        if not self.config.gateways:
            raise StorageError(
                "no_gateways",
                f"{root} is not on this node and no IPFS gateways are configured ([storage] gateways)",
                details={"cid": str(root)},
            )
        failures: list[tuple[str, StorageError]] = []
        for gateway in self.config.gateways:
            try:
                await fetch_car(
                    self.session,
                    gateway,
                    root,
                    store=self.store,
                    max_bytes=self.cap,
                    path=segments,
                    http_timeout=self.timeout,
                    ssl=self.ssl,
                    policy=self.policy,
                )
                fetched = await _from_local(self.store, root, segments, dest, self.cap)
                if fetched is not None:
                    return FetchedInput(fetched.path, fetched.size, fetched.sha256, fetched.cid, gateway)
                raise StorageError(
                    "incomplete_dag", f"{gateway} sent only part of {root}'s DAG", retryable=True
                )
            except StorageError as exc:
                log.warning("gateway fetch failed", extra={"gateway": gateway, "code": exc.code})
                failures.append((gateway, exc))
        raise _all_failed(root, failures)

    # -- https:// -------------------------------------------------------------------------------------

    async def https(self, url: str, dest: Path, sha256: str | None) -> FetchedInput:
        if sha256 is None or not _SHA256_HEX.fullmatch(sha256):
            raise RequestError(
                "input_sha256_required",
                "an https:// input needs input_sha256: 64 lowercase hex digits",
                details={"uri": url[:200]},
            )
        temp = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
        try:
            actual, size = await self._download(url, temp)
            if actual != sha256:
                raise StorageError(
                    "sha256_mismatch",
                    f"{url[:200]} has sha256 {actual}, not the expected {sha256}",
                    details={"uri": url[:200], "expected": sha256, "actual": actual},
                )
            await asyncio.to_thread(os.replace, temp, dest)
        except OSError as exc:
            raise StorageError(
                "input_write_failed", f"cannot write {dest}: {exc.strerror or exc}", retryable=True
            ) from None
        finally:
            await asyncio.to_thread(temp.unlink, missing_ok=True)
        imported = await asyncio.to_thread(import_path, dest, self.store)
        return FetchedInput(dest, size, actual, imported.cid, url)

    async def _get(self, url: str) -> aiohttp.ClientResponse:
        """The answer to ``GET url`` that is not a redirect, each hop checked by the policy before it is
        requested (the very URL object checked is the one requested); the caller releases it.
        """
        hop = _parse_url(url)
        for _ in range(self.config.max_redirects + 1):
            self.policy.check_url(hop)
            response = await self.session.get(hop, timeout=self.timeout, ssl=self.ssl, allow_redirects=False)
            if response.status not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location", "")
            response.release()
            hop = _redirect_target(hop, location)
        raise StorageError(
            "too_many_redirects",
            f"the input's URL redirected more than {self.config.max_redirects} times",
            details={"max_redirects": self.config.max_redirects},
        )

    async def _download(self, url: str, temp: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        out = await asyncio.to_thread(open, temp, "wb")
        try:
            async with asyncio.timeout(self.config.fetch_timeout_seconds), await self._get(url) as response:
                _check_status(url[:200], response.status)
                if response.content_length is not None and response.content_length > self.cap:
                    raise _too_large(url[:200], self.cap)
                pieces: list[bytes] = []
                held = 0
                async for piece in response.content.iter_any():
                    size += len(piece)
                    if size > self.cap:
                        raise _too_large(url[:200], self.cap)
                    pieces.append(piece)
                    held += len(piece)
                    if held >= FETCH_PIECE_BYTES:
                        await asyncio.to_thread(_write_hashed, out, pieces, digest)
                        pieces, held = [], 0
                await asyncio.to_thread(_write_hashed, out, pieces, digest)
        except AddressNotAllowed as exc:
            raise _not_allowed(exc) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Refused, reset, timed out, TLS: one answer for the requester (no port-scan oracle), the
            # detail for the operator.
            log.warning("https input unreachable: %s: %s", type(exc).__name__, exc, extra={"uri": url[:200]})
            raise StorageError("input_unreachable", UNREACHABLE_MESSAGE, retryable=True) from None
        finally:
            await asyncio.to_thread(out.close)
        return digest.hexdigest(), size


def _write_hashed(out: BinaryIO, pieces: list[bytes], digest: hashlib._Hash) -> None:
    for piece in pieces:
        digest.update(piece)
        out.write(piece)


async def fetch_car(
    session: aiohttp.ClientSession,
    gateway: str,
    root: CID,
    *,
    store: Blockstore,
    max_bytes: int,
    path: Sequence[str] = (),
    http_timeout: aiohttp.ClientTimeout | None = None,
    ssl: ssl.SSLContext | bool = True,
    policy: AddressPolicy | None = None,
) -> int:
    """``GET {gateway}/ipfs/{root}[/path]?format=car&dag-scope=all`` into ``store``, verified; the CAR's
    byte count.

    Every block must hash to its CID and be one the DAG so far links to (parents come first in a DFS
    CAR), the CAR's roots, if it names any, must include ``root``, and the download may be at most
    ``max_bytes`` of content plus :data:`CAR_OVERHEAD_ALLOWANCE` and one block of framing; a UnixFS file
    node that declares more than ``max_bytes`` ends it at once. Blocks become visible in ``store`` only
    once the whole CAR has verified; nothing of a refused one is kept.

    The gateway is asked once, redirects are refused (``gateway_bad_response``), and ``policy``, when
    given, checks the URL before it is requested. Refusals are :class:`~core.errors.StorageError`:
    ``gateway_unreachable`` and ``gateway_bad_response`` (retryable), the status codes of a non-200
    answer (``input_not_found``, ``input_unavailable``, ``input_refused``, details ``source`` and
    ``status``), ``input_too_large`` (details ``max_bytes``), ``unexpected_block``, ``car_root_mismatch``
    (details ``cid`` and ``roots``), ``malformed_block``, and :class:`CarReader`'s own.
    """
    url = "/".join([f"{gateway}/ipfs/{root}", *(quote(s, safe="") for s in path)])
    batch = store.batch()
    try:
        if policy is not None:
            policy.check_url(url)  # a gateway's own host is trusted; this guards how the URL is built
        async with session.get(
            url,
            headers={"Accept": CAR_CONTENT_TYPE},
            params={"format": "car", "dag-scope": "all"},
            timeout=http_timeout,
            ssl=ssl,
            allow_redirects=False,
        ) as response:
            if response.status in _REDIRECT_STATUSES:
                raise StorageError(
                    "gateway_bad_response",
                    f"{gateway} answered a CAR request with a redirect, which is not followed",
                    details={"gateway": gateway, "status": response.status},
                    retryable=True,
                )
            _check_status(gateway, response.status)
            if response.content_type != CAR_MEDIA_TYPE:
                raise StorageError(
                    "gateway_bad_response",
                    f"{gateway} answered {response.content_type}, not a CAR",
                    details={"gateway": gateway},
                    retryable=True,
                )
            read = await _ingest(response, _CarIngest(root, batch, max_bytes))
        await asyncio.to_thread(batch.commit)
        return read
    except AddressNotAllowed as exc:
        raise _not_allowed(exc) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        # the detail stays in the operator's log: refused, reset, timeout and TLS read the same
        log.warning("gateway %s unreachable: %s: %s", gateway, type(exc).__name__, exc)
        raise StorageError(
            "gateway_unreachable",
            f"{gateway} could not be reached",
            details={"gateway": gateway},
            retryable=True,
        ) from None
    finally:
        await asyncio.to_thread(batch.abort)  # a no-op once committed; otherwise no block is kept


async def _ingest(response: aiohttp.ClientResponse, ingest: _CarIngest) -> int:
    """Feed the response body to ``ingest`` (verified in a worker thread, a piece at a time)."""
    pieces: list[bytes] = []
    held = 0
    async for piece in response.content.iter_any():
        if ingest.reader.bytes_read + held + len(piece) > ingest.byte_limit:
            raise _too_large(f"the CAR for {ingest.root}", ingest.cap)
        pieces.append(piece)
        held += len(piece)
        if held >= FETCH_PIECE_BYTES:
            await asyncio.to_thread(ingest.feed, pieces)
            pieces, held = [], 0
    await asyncio.to_thread(ingest.feed, pieces)
    ingest.finish()
    return ingest.reader.bytes_read


class _CarIngest:
    """Verified blocks of one gateway's CAR into a batch, refusing any block the DAG does not link to.

    Blocks arrive in DFS order, parents first, so every block must already be linked from one before
    it. The CAR's roots are checked as soon as its header is in, before any block is looked at; a
    UnixFS file node whose ``filesize`` is over the cap ends the fetch as soon as it arrives.
    """

    def __init__(self, root: CID, batch: BlockBatch, cap: int) -> None:
        self.root = root
        self.batch = batch
        self.cap = cap
        self.reader = CarReader()
        self.expected = {root.v1()}
        self.byte_limit = int(cap * (1 + CAR_OVERHEAD_ALLOWANCE)) + MAX_BLOCK_BYTES
        self.roots_checked = False

    def feed(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            blocks = self.reader.feed(piece)
            if not self.roots_checked and self.reader.roots is not None:
                self._check_roots(self.reader.roots)
            for cid, block in blocks:
                if cid.v1() not in self.expected:
                    raise StorageError(
                        "unexpected_block",
                        f"the gateway sent block {cid}, which the requested DAG does not link to",
                        details={"cid": str(cid)},
                    )
                if cid.codec == DAG_PB:
                    self._follow(cid, block)
                self.batch.put(cid, block)

    def _check_roots(self, roots: list[CID]) -> None:
        self.roots_checked = True
        if roots and self.root.v1() not in {r.v1() for r in roots}:
            raise StorageError(
                "car_root_mismatch",
                f"the CAR's roots {[str(r) for r in roots]} do not include {self.root}",
                details={"cid": str(self.root), "roots": [str(r) for r in roots]},
            )

    def _follow(self, cid: CID, block: bytes) -> None:
        try:
            links, data = decode_node(block)
            unixfs = decode_unixfs(data) if data is not None else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise StorageError(
                "malformed_block", f"block {cid} is not valid dag-pb: {exc}", details={"cid": str(cid)}
            ) from None
        if unixfs is not None and unixfs.type == UnixFSType.FILE and (unixfs.filesize or 0) > self.cap:
            raise _too_large(f"input {cid} ({unixfs.filesize} bytes)", self.cap)
        self.expected.update(link.cid.v1() for link in links)

    def finish(self) -> None:
        self.reader.finish()
        if not self.roots_checked and self.reader.roots is not None:
            self._check_roots(self.reader.roots)


def _parse_url(url: str) -> URL:
    try:
        return URL(url)
    except (TypeError, ValueError):
        raise RequestError("invalid_input_uri", "the input's URL cannot be parsed") from None


def _redirect_target(url: URL, location: str) -> URL:
    """Where a redirect from ``url`` leads (relative locations resolved); only ``https://`` is followed."""
    try:
        target = url.join(URL(location)) if location else None
    except (TypeError, ValueError):
        target = None
    if target is None or not target.absolute:
        raise StorageError("input_refused", "the input's URL redirected without a usable Location")
    if target.scheme != "https":
        raise StorageError("input_not_allowed", "the input's URL redirected to a URL that is not https://")
    return target


def _check_status(source: str, status: int) -> None:
    if status == 200:
        return
    retryable = status in _RETRY_STATUSES
    code = "input_not_found" if status == 404 else "input_unavailable" if retryable else "input_refused"
    raise StorageError(
        code,
        f"{source} answered HTTP {status}",
        details={"source": source, "status": status},
        retryable=retryable,
    )


def _all_failed(root: CID, failures: list[tuple[str, StorageError]]) -> StorageError:
    attempts = [{"gateway": g, "code": e.code, "message": e.message} for g, e in failures]
    if all(not e.retryable for _g, e in failures):
        first = failures[0][1]
        first.details = {**first.details, "attempts": attempts}
        return first
    return StorageError(
        "gateways_unavailable",
        f"no configured gateway delivered {root}: "
        + "; ".join(f"{a['gateway']}: {a['code']}" for a in attempts),
        details={"cid": str(root), "attempts": attempts},
        retryable=True,
    )


class CarImport:
    """A CAR pushed to this node a piece at a time (a cluster worker's output), into ``store``, verified.

    The checks of :func:`fetch_car`: every block hashes to its CID and is one the DAG of ``root`` links to
    (parents first), the CAR's roots include ``root``, and at most ``max_bytes`` of content (plus the
    framing allowance) arrive. A refused piece ends the import with nothing stored (:meth:`abort`);
    :meth:`finish` stores what came and then requires the DAG whole (``incomplete_dag``). Blocks are
    content-addressed, so what a refused import stored is never wrong, only unused.
    """

    def __init__(self, root: CID, store: Blockstore, *, max_bytes: int) -> None:
        self.root = root
        self._store = store
        self._batch = store.batch()
        self._ingest = _CarIngest(root, self._batch, max_bytes)

    @property
    def bytes_read(self) -> int:
        return self._ingest.reader.bytes_read

    def feed(self, piece: bytes) -> None:
        """Take the next piece of the CAR (blocking: hashes and writes blocks)."""
        if self._ingest.reader.bytes_read + len(piece) > self._ingest.byte_limit:
            raise _too_large(f"the CAR for {self.root}", self._ingest.cap)
        self._ingest.feed([piece])

    def finish(self) -> None:
        """The CAR ended: commit its blocks, and refuse a DAG that is not all there."""
        self._ingest.finish()
        self._batch.commit()
        missing = first_missing(self._store, self.root)
        if missing is not None:
            raise StorageError(
                "incomplete_dag",
                f"the CAR for {self.root} lacks block {missing}",
                details={"cid": str(self.root), "missing": str(missing)},
                retryable=True,
            )

    def abort(self) -> None:
        """Drop every block of an unfinished import (a no-op once finished)."""
        self._batch.abort()
