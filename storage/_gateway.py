"""HTTP: the IPFS Trustless Gateway (``GET``/``HEAD /ipfs/{cid}[/path]``) and blob upload (``PUT /v1/blobs``).

Responses by format, chosen by ``?format=`` or else by ``Accept``:

- ``raw`` (``application/vnd.ipld.raw``): the one block at the (resolved) CID.
- ``car`` (``application/vnd.ipld.car``): CAR v1 of the DAG, streamed in DFS order without duplicate
  blocks (``order=dfs; dups=n``), the directories crossed by a path first; ``dag-scope`` ``all``
  (default), ``entity`` or ``block``. ``entity-bytes`` is refused with 400.
- neither: the plain bytes of a UnixFS file, as a convenience for people with a browser or curl; a
  directory answers 406 ``format_required`` (no listings, no HTML).

An unknown CID (or one whose DAG this node holds only in part) is 404, an unparsable one 400. Errors are
raised as :class:`~core.errors.HearthError` for the API's error middleware to render.

``PUT /v1/blobs`` streams the raw body into the blockstore as one UnixFS file, capped at
``max_blob_mb`` (413, from ``Content-Length`` before reading or as soon as the stream passes the cap);
blocks become visible only once the whole upload is stored, so a refused upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Literal

from aiohttp import web

from core.config import StorageSection
from core.errors import HearthError, NotFoundError, RequestError
from storage._blockstore import BlockBatch, Blockstore
from storage._car import iter_car
from storage._cid import CID
from storage._dag import DagScope, entity_kind, file_size, first_missing, iter_file, resolve_path
from storage._importer import CHUNK_SIZE, FileImporter, ImportResult

log = logging.getLogger("hearth.storage")

RAW_MEDIA_TYPE = "application/vnd.ipld.raw"
CAR_MEDIA_TYPE = "application/vnd.ipld.car"
CAR_CONTENT_TYPE = "application/vnd.ipld.car; version=1; order=dfs; dups=n"
IMMUTABLE_CACHE_CONTROL = "public, max-age=29030400, immutable"
STREAM_PIECE_BYTES = 1024 * 1024  # bytes handed from the store's thread to the socket at a time
UPLOAD_FLUSH_BYTES = CHUNK_SIZE  # upload bytes gathered before one hop to the importer's thread
_DAG_SCOPES: tuple[DagScope, ...] = ("all", "entity", "block")
MIB = 1024 * 1024

Format = Literal["raw", "car", "file"]


def _negotiate(request: web.Request) -> Format:
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt in ("raw", "car"):
            return "raw" if fmt == "raw" else "car"
        raise RequestError(
            "unsupported_format", f"format={fmt[:40]!r} is not supported; use raw or car", details={}
        )
    for item in request.headers.get("Accept", "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media == RAW_MEDIA_TYPE:
            return "raw"
        if media == CAR_MEDIA_TYPE:
            version = next((p.split("=", 1)[1] for p in params if p.startswith("version=")), "1")
            if version != "1":
                raise RequestError(
                    "unsupported_car_version",
                    f"CAR version {version[:8]!r} is not served; ask for version=1",
                )
            return "car"
    return "file"


def _dag_scope(request: web.Request) -> DagScope:
    if "entity-bytes" in request.query:
        raise RequestError("unsupported_parameter", "entity-bytes is not supported by this gateway")
    scope = request.query.get("dag-scope", "all")
    for known in _DAG_SCOPES:
        if scope == known:
            return known
    raise RequestError("unsupported_parameter", f"dag-scope={scope[:40]!r} must be all, entity or block")


def _headers(
    root: CID, segments: list[str], passed: list[CID], target: CID, etag: str, content_type: str
) -> dict[str, str]:
    ipfs_path = "/".join([f"/ipfs/{root}", *segments])
    return {
        "Content-Type": content_type,
        "Etag": etag,
        "Cache-Control": IMMUTABLE_CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
        "X-Ipfs-Path": ipfs_path,
        "X-Ipfs-Roots": ",".join(str(c) for c in [*passed, target]),
        "Vary": "Accept",
    }


def _not_modified(request: web.Request, etag: str) -> bool:
    candidates = (tag.strip() for tag in request.headers.get("If-None-Match", "").split(","))
    return any(tag in (etag, f"W/{etag}", "*") for tag in candidates)


def _take(pieces: Iterator[bytes]) -> list[bytes]:
    """The next pieces of a stream, up to about ``STREAM_PIECE_BYTES`` (empty at the end)."""
    taken: list[bytes] = []
    size = 0
    for piece in pieces:
        taken.append(piece)
        size += len(piece)
        if size >= STREAM_PIECE_BYTES:
            break
    return taken


class Gateway:
    """The storage routes over one blockstore; :meth:`add_routes` mounts them on an application."""

    def __init__(self, store: Blockstore, *, max_blob_bytes: int, stall_seconds: float) -> None:
        self.store = store
        self.max_blob_bytes = max_blob_bytes
        self.stall_seconds = stall_seconds

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ipfs/{cid}", self.get_ipfs)
        app.router.add_get("/ipfs/{cid}/{path:.+}", self.get_ipfs)
        app.router.add_put("/v1/blobs", self.put_blob)

    async def get_ipfs(self, request: web.Request) -> web.StreamResponse:
        """``GET``/``HEAD /ipfs/{cid}[/path]`` in the format the client asked for."""
        root = CID.parse(request.match_info["cid"])
        segments = [s for s in request.match_info.get("path", "").split("/") if s]
        fmt = _negotiate(request)
        scope = _dag_scope(request) if fmt == "car" else "all"
        target, passed = await asyncio.to_thread(resolve_path, self.store, root, segments)
        if fmt == "raw":
            return await self._raw(request, root, segments, passed, target)
        if fmt == "car":
            return await self._car(request, root, segments, passed, target, scope)
        return await self._file(request, root, segments, passed, target)

    async def _raw(
        self, request: web.Request, root: CID, segments: list[str], passed: list[CID], target: CID
    ) -> web.StreamResponse:
        etag = f'"{target}.raw"'
        headers = _headers(root, segments, passed, target, etag, RAW_MEDIA_TYPE)
        headers["Content-Disposition"] = f'attachment; filename="{target}.bin"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers=headers)
        if request.method == "HEAD":
            size = await asyncio.to_thread(self.store.size, target)
            if size is None:
                raise _block_missing(target)
            return await _head(request, headers, size)
        data = await asyncio.to_thread(self.store.get, target)
        return web.Response(body=data, headers=headers)

    async def _car(
        self,
        request: web.Request,
        root: CID,
        segments: list[str],
        passed: list[CID],
        target: CID,
        scope: DagScope,
    ) -> web.StreamResponse:
        variant = hashlib.sha256("/".join([*segments, scope]).encode()).hexdigest()[:12]
        etag = f'"{root}.{variant}.car"'
        headers = _headers(root, segments, passed, target, etag, CAR_CONTENT_TYPE)
        headers["Content-Disposition"] = f'attachment; filename="{target}.car"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers=headers)
        await self._require_complete(target, whole=scope != "block")
        response = web.StreamResponse(headers=headers)
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        pieces = iter_car(self.store, target, scope=scope, path_blocks=passed)
        return await self._stream(request, response, pieces)

    async def _file(
        self, request: web.Request, root: CID, segments: list[str], passed: list[CID], target: CID
    ) -> web.StreamResponse:
        kind = await asyncio.to_thread(entity_kind, self.store, target)
        if kind != "file":
            raise RequestError(
                "format_required",
                f"{target} is not a file; ask for ?format=car or ?format=raw "
                f"(Accept: {CAR_MEDIA_TYPE} or {RAW_MEDIA_TYPE})",
                details={"cid": str(target), "formats": ["car", "raw"]},
            )
        etag = f'"{target}"'
        headers = _headers(root, segments, passed, target, etag, "application/octet-stream")
        if _not_modified(request, etag):
            return web.Response(status=304, headers=headers)
        await self._require_complete(target, whole=True)
        size = await asyncio.to_thread(file_size, self.store, target)
        if request.method == "HEAD":
            return await _head(request, headers, size)
        response = web.StreamResponse(headers=headers)
        response.content_length = size
        return await self._stream(request, response, iter_file(self.store, target))

    async def _require_complete(self, target: CID, *, whole: bool) -> None:
        """404 before any byte is sent when the node lacks part of what the response would hold."""
        if whole:
            missing = await asyncio.to_thread(first_missing, self.store, target)
        else:
            missing = None if await asyncio.to_thread(self.store.has, target) else target
        if missing is not None:
            raise _block_missing(missing, root=target)

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, pieces: Iterator[bytes]
    ) -> web.StreamResponse:
        await response.prepare(request)
        try:
            while batch := await asyncio.to_thread(_take, pieces):
                for piece in batch:
                    await response.write(piece)
        except HearthError as exc:
            # The status is already sent: cut the connection so the client sees a broken transfer,
            # never a short body that ends cleanly.
            log.warning("gateway stream aborted: %s", exc, extra={"code": exc.code})
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def put_blob(self, request: web.Request) -> web.Response:
        """``PUT /v1/blobs``: the raw body (not empty) becomes one UnixFS file; 201 ``{"cid", "size"}``."""
        cap = self.max_blob_bytes
        if request.content_length is not None and request.content_length > cap:
            raise _blob_too_large(cap)
        batch = self.store.batch()
        importer = FileImporter(batch)
        pieces: list[bytes] = []
        held = received = 0
        try:
            async for piece in _stall_bounded(request.content.iter_any(), self.stall_seconds):
                received += len(piece)
                if received > cap:
                    raise _blob_too_large(cap)
                pieces.append(piece)
                held += len(piece)
                if held >= UPLOAD_FLUSH_BYTES:
                    await asyncio.to_thread(_write_pieces, importer, pieces)
                    pieces, held = [], 0
            if received == 0:
                raise RequestError(
                    "empty_body", "the blob is empty; an input needs bytes", details={"min_bytes": 1}
                )
            result = await asyncio.to_thread(_finish_upload, importer, pieces, batch)
        except BaseException:
            batch.abort()  # waits for a put still running in a worker thread, then removes temp files
            raise
        log.info("blob stored", extra={"cid": str(result.cid), "size": result.size})
        return web.json_response(
            {"cid": str(result.cid), "size": result.size},
            status=201,
            headers={"Location": f"/ipfs/{result.cid}"},
        )


async def _stall_bounded(pieces: AsyncIterator[bytes], stall_seconds: float) -> AsyncIterator[bytes]:
    """``pieces``, refused with 408 ``upload_stalled`` when none arrives for ``stall_seconds``: an upload
    may be long, but a client that stops sending must not hold its connection and temp files forever."""
    while True:
        try:
            async with asyncio.timeout(stall_seconds):
                piece = await anext(pieces, None)
        except TimeoutError:
            raise RequestError(
                "upload_stalled",
                f"no bytes of the blob arrived for {stall_seconds:g} s",
                details={"stall_seconds": stall_seconds},
            ) from None
        if piece is None:
            return
        yield piece


def _write_pieces(importer: FileImporter, pieces: list[bytes]) -> None:
    for piece in pieces:
        importer.write(piece)


def _finish_upload(importer: FileImporter, pieces: list[bytes], batch: BlockBatch) -> ImportResult:
    _write_pieces(importer, pieces)
    result = importer.close()
    batch.commit()
    return result


async def _head(request: web.Request, headers: dict[str, str], size: int) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    return response


def _block_missing(cid: CID, *, root: CID | None = None) -> NotFoundError:
    subject = f"the DAG of {root} is incomplete on this node: " if root is not None and root != cid else ""
    return NotFoundError(
        "block_not_found", f"{subject}block {cid} is not on this node", details={"cid": str(cid)}
    )


def _blob_too_large(cap: int) -> RequestError:
    return RequestError(
        "blob_too_large",
        f"the blob exceeds this node's cap of {cap} bytes ({cap // MIB} MiB)",
        details={"max_bytes": cap},
    )


def add_routes(app: web.Application, store: Blockstore, config: StorageSection) -> Gateway:
    """Mount ``/ipfs/{cid}[/path]`` and ``PUT /v1/blobs`` over ``store`` on ``app``."""
    gateway = Gateway(
        store, max_blob_bytes=config.max_blob_mb * MIB, stall_seconds=config.upload_stall_seconds
    )
    gateway.add_routes(app)
    return gateway
