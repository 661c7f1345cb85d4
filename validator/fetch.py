"""What the validator takes from the node, each piece verified before it is used.

- :func:`fetch_signed_job`: ``GET /v1/jobs/{id}`` and ``/result``, both signed by one node DID, each
  token's claim equal to the document served beside it (:func:`verify_signed_document`).
- :func:`job_envelope`: the requester's envelope (or the node's copy), sha256(JCS) = the job's
  ``envelope_hash``.
- :func:`fetch_job_input`: the job's input from the node's gateway (every block verified), bound to the
  envelope and to the CID the result names.
- :func:`fetch_artifact` / :func:`unpack_artifact`: the artifact as a CAR (:func:`storage.fetch_car`:
  every block verified, none outside the artifact's DAG, the size bounded by the envelope's
  ``max_output_mb``), then written to disk by :func:`storage.export_tree` under the same cap.

A piece that cannot be trusted is refused with a :class:`~core.errors.HearthError` (mostly
:class:`~core.errors.SettlementError` for the node's documents, :class:`~core.errors.StorageError` for the
artifact's bytes) and nothing is judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from core.config import StorageSection
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope, envelope_hash, parse_envelope
from core.errors import HearthError, NotFoundError, RequestError, SettlementError, StorageError
from payments.jwt import decode_unverified, verify_node_token
from requester.client import NodeClient, NodeUnreachable
from sandbox.ffmpeg import MAX_OUTPUT_FILES
from storage import CID, Blockstore, FetchedInput, export_tree, fetch_car, fetch_input

MIB: Final = 1024 * 1024
AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope
MAX_ARTIFACT_DEPTH: Final = 16  # folders within folders; an HLS ladder needs two levels
# storage's refusals of an artifact's DAG, as the validator names them
_ARTIFACT_CODES: Final = {
    "dag_malformed": "artifact_malformed",
    "dag_too_large": "artifact_too_large",
    "input_too_large": "artifact_too_large",
    "block_not_found": "artifact_incomplete",
    "export_failed": "artifact_unpack_failed",
}


def refused(code: str, message: str, **details: Any) -> SettlementError:
    """The validator's refusal of what the node served: a :class:`SettlementError` with ``details``."""
    return SettlementError(code, message, details=details)


# -- the node's signed documents ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedJob:
    """A job's status view and result document, both checked to be signed by ``node_did``."""

    node_did: str
    job: Mapping[str, Any]
    result: Mapping[str, Any]

    @property
    def id(self) -> str:
        return str(self.job["id"])


def verify_signed_document(body: Mapping[str, Any], claim: str, node_did: str, job: str) -> dict[str, Any]:
    """The document of a signed node answer (``body`` less its ``jwt``), once the token vouches for it.

    The token must be the node's (:func:`~payments.jwt.verify_node_token`: issuer, signature, expiry),
    name ``job`` as its ``sub`` and carry, under ``claim``, exactly the document served beside it: a
    document altered after signing is refused with ``signed_document_mismatch``.
    """
    token = body.get("jwt")
    if not isinstance(token, str):
        raise refused("unsigned_document", f"the node's {claim} carries no jwt", claim=claim)
    payload = verify_node_token(token, node_did)
    document = {key: value for key, value in body.items() if key != "jwt"}
    if payload.get("sub") != job:
        raise refused(
            "signed_document_mismatch",
            f"the node's {claim} token is about {payload.get('sub')!r}, not {job}",
            claim=claim,
            job=job,
        )
    if payload.get(claim) != document:
        raise refused(
            "signed_document_mismatch",
            f"the node's {claim} differs from what its token signed",
            claim=claim,
            job=job,
        )
    return document


async def fetch_signed_job(client: NodeClient, job: str, *, node_did: str | None = None) -> SignedJob:
    """The job's status and result, each verified as signed by the node (``node_did``, else the status
    token's issuer: the result must come from the same DID, and name it as the provenance's node).
    """
    status = await client.status(job)
    token = status.get("jwt")
    if node_did is None and isinstance(token, str):
        node_did = str(decode_unverified(token)[1].get("iss"))
    if node_did is None:
        raise refused("unsigned_document", "the node's status carries no jwt", claim="status")
    view = verify_signed_document(status, "status", node_did, job).get("job")
    result = verify_signed_document(await client.result(job), "result", node_did, job).get("result")
    if not isinstance(view, dict) or view.get("id") != job or not isinstance(result, dict):
        raise refused("result_malformed", f"the node's documents for {job} are not a job and its result")
    provenance = result.get("provenance")
    if result.get("job") != job or not isinstance(provenance, dict) or provenance.get("node_did") != node_did:
        raise refused(
            "result_malformed",
            "the result is not this job's, or does not name the signing node in its provenance",
            job=job,
            node_did=node_did,
        )
    return SignedJob(node_did=node_did, job=view, result=result)


def job_envelope(job: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> AnyEnvelope:
    """The job's envelope: ``given`` (the requester's), else the node's copy in the status view.

    Refused (``RequestError``) when neither is there (``envelope_missing``) or when its sha256(JCS) is not
    the job's ``envelope_hash`` (``envelope_mismatch``; a ``SettlementError`` for the node's own copy).
    """
    raw = given if given is not None else job.get("envelope")
    if raw is None:
        raise RequestError(
            "envelope_missing",
            f"the node does not show job {job.get('id')}'s envelope; pass the requester's with --envelope",
            details={"job": job.get("id")},
        )
    env = parse_envelope(dict(raw))
    digest = envelope_hash(env)
    if digest != job.get("envelope_hash"):
        # The requester's file may simply be the wrong one; the node's own copy differing is the node's fault.
        error = RequestError if given is not None else SettlementError
        raise error(
            "envelope_mismatch",
            "this envelope is not the one the job was accepted with (sha256 of its JCS differs)",
            details={"job": job.get("id"), "expected": job.get("envelope_hash"), "actual": digest},
        )
    return env


# -- the input and the artifact ----------------------------------------------------------------------------


def _gateway_config(client: NodeClient) -> StorageSection:
    """The node as the one trustless gateway, under storage's default input cap and timeouts."""
    return StorageSection(gateways=[client.base_url])


async def fetch_job_input(
    client: NodeClient, env: AnyEnvelope, result: Mapping[str, Any], dest: Path, store: Blockstore
) -> FetchedInput:
    """The job's input from the node's gateway, verified block by block, and bound to the envelope.

    An ``ipfs://`` or blob input is fetched by the envelope's own URI and must resolve to the CID the
    result names; an ``https://`` one is fetched by that CID and must have the envelope's sha256.
    """
    recorded = str((result.get("provenance") or {}).get("input_cid", ""))
    try:
        CID.parse(recorded)
    except HearthError:
        raise refused("result_malformed", "the result's provenance names no input CID") from None
    if env.input_uri.startswith("ipfs://"):
        uri = env.input_uri
    elif env.input_uri.startswith("https://"):
        uri = f"ipfs://{recorded}"  # the node imported it; the envelope's sha256 binds it below
    else:
        uri = f"ipfs://{env.input_uri}"  # a blob uploaded to the node, named by its CID
    try:
        fetched = await fetch_input(
            uri, dest, store=store, config=_gateway_config(client), session=client.session
        )
    except StorageError as exc:
        if exc.code == "gateways_unavailable":
            raise NodeUnreachable(client.base_url, exc.message) from None
        raise
    if str(fetched.cid) != recorded or (env.input_sha256 not in (None, fetched.sha256)):
        raise refused(
            "input_mismatch",
            "the input the result names is not the envelope's",
            recorded_cid=recorded,
            fetched_cid=str(fetched.cid),
            envelope_sha256=env.input_sha256,
            fetched_sha256=fetched.sha256,
        )
    return fetched


def artifact_root(result: Mapping[str, Any]) -> CID:
    """The CID the result names as its artifact; ``result_malformed`` if it names none."""
    try:
        return CID.parse(str(result.get("artifact_cid", "")))
    except HearthError:
        raise refused("result_malformed", "the result's artifact_cid is not a CID") from None


def listed_files(result: Mapping[str, Any]) -> dict[str, str]:
    """``{name: sha256}`` of the files the result lists; ``result_malformed`` if it lists none sensibly."""
    rows = result.get("files")
    if not isinstance(rows, list) or not rows:
        raise refused("result_malformed", "the result lists no files")
    listed: dict[str, str] = {}
    for row in rows:
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("name"), str)
            or not isinstance(row.get("sha256"), str)
        ):
            raise refused("result_malformed", "a file the result lists has no name or sha256")
        listed[row["name"]] = row["sha256"]
    return listed


def _artifact_error(exc: HearthError, cid: CID, max_bytes: int) -> HearthError:
    """storage's refusal of the artifact's DAG under the validator's ``artifact_*`` codes."""
    code = _ARTIFACT_CODES.get(exc.code)
    if code is None:
        return exc
    if code == "artifact_too_large":
        return StorageError(
            code,
            f"the artifact is larger than the envelope's max_output_mb ({max_bytes} bytes), at {cid}",
            details={"cid": str(cid), "max_bytes": max_bytes},
        )
    if code == "artifact_incomplete":
        missing = exc.details.get("cid", str(cid))
        return StorageError(
            code, f"the node's CAR lacks block {missing} of the artifact", details={"cid": missing}
        )
    return StorageError(code, f"the artifact: {exc.message}", details=exc.details)


async def fetch_artifact(client: NodeClient, cid: CID, store: Blockstore, *, max_bytes: int) -> None:
    """``GET /ipfs/{cid}?format=car`` from the node into ``store`` by :func:`storage.fetch_car`: every
    block verified against its CID and linked from ``cid`` (``unexpected_block`` otherwise), the CAR's
    roots naming ``cid``, at most ``max_bytes`` of content (plus CAR overhead) accepted
    (``artifact_too_large``). Blocks become visible in ``store`` only once the whole CAR has verified.
    """
    config = _gateway_config(client)
    timeout = aiohttp.ClientTimeout(
        total=config.fetch_timeout_seconds,
        sock_connect=config.connect_timeout_seconds,
        sock_read=config.read_timeout_seconds,
    )
    try:
        await fetch_car(
            client.session, client.base_url, cid, store=store, max_bytes=max_bytes, http_timeout=timeout
        )
    except StorageError as exc:
        if exc.code == "gateway_unreachable":
            raise NodeUnreachable(client.base_url, exc.message) from None
        raise _artifact_error(exc, cid, max_bytes) from None


def unpack_artifact(store: Blockstore, cid: CID, out: Path, *, single_name: str, max_bytes: int) -> None:
    """Write the artifact ``cid`` from ``store`` into the new folder ``out``, as the run left it.

    A directory becomes ``out`` itself; a single file (published without its name) becomes
    ``out/single_name``. :func:`storage.export_tree` writes it: plain, unique entry names only, at most
    :data:`MAX_ARTIFACT_DEPTH` folders deep, ``MAX_OUTPUT_FILES`` files and ``max_bytes`` bytes; its
    refusals come back as ``artifact_malformed``, ``artifact_too_large``, ``artifact_incomplete`` and
    ``artifact_unpack_failed``, and a ``single_name`` that is not a plain name as ``result_malformed``.
    """
    try:
        export_tree(
            store,
            cid,
            out,
            max_bytes=max_bytes,
            max_files=MAX_OUTPUT_FILES,
            max_depth=MAX_ARTIFACT_DEPTH,
            file_name=single_name,
        )
    except (StorageError, NotFoundError) as exc:  # NotFoundError before RequestError, its base
        raise _artifact_error(exc, cid, max_bytes) from None
    except RequestError as exc:
        if exc.code != "invalid_file_name":
            raise
        raise refused("result_malformed", f"the result names its file {single_name[:80]!r}") from None
