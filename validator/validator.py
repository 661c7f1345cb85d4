"""The validator's tool: judge one job's result independently, then sign the receipt that settles it.

Nothing the node says is taken on trust beyond its signature, and every byte is checked::

    fetch_signed_job     GET /v1/jobs/{id} and /result: both signed by one node DID, each token's claim
                         equal to the document served beside it
    job_envelope         the requester's envelope (or the node's copy), sha256(JCS) = job.envelope_hash
    funding_terms        the escrow terms (given, or the node's), checked against envelope, key and job
    judge                the input fetched from the node's gateway (verified) and, for a transcode, probed
                         with the host's ffprobe to rebuild the plan; the artifact fetched as a CAR
                         (every block verified, root = artifact_cid), unpacked under limits.max_output_mb,
                         and judged: a transcode by collect_outputs + check_output (the node's own
                         judgement, our own ffprobe), a batch by check_batch_output against the input's
                         lines (each request answered once, statuses, max_tokens, the usage the result
                         reports); artifact_sha256 recomputed as the executor computes it
    sign_verdict         the EIP-712 receipt: passed only if the digest and every check pass; amount =
                         the result's cost, capped at the escrowed amount, 0 when failing
    issue_credential     optionally, the receipt and its signature as a W3C Verifiable Credential
                         (JSON-LD, EcdsaSecp256k1RecoverySignature2020 by the validator's did:pkh)
    receipt_body         what NodeClient.post_receipt sends to POST /v1/jobs/{id}/receipt; the node
                         then simulates and submits ``release``/``refund``

:func:`validate` runs them in that order and returns a :class:`ValidationReport`. A result that cannot be
judged (a bad signature, an artifact that does not verify, terms that do not fit) is refused with a
:class:`~core.errors.HearthError` and no receipt; a result that is judged and fails gets a failing receipt,
which lets the payer take the escrow back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
import coincurve
import didkit

from core.config import StorageSection
from core.envelope import (
    FfmpegTranscodeEnvelope,
    VllmBatchEnvelope,
    canonical_json,
    envelope_hash,
    parse_envelope,
)
from core.errors import FundingError, HearthError, NotFoundError, RequestError, SettlementError, StorageError
from core.untrusted import UntrustedJSONError, parse_json
from payments.did import parse_did_pkh
from payments.jwt import b64url_encode, decode_unverified, verify_node_token
from payments.keys import EthSigner
from payments.receipts import (
    FundingTerms,
    Receipt,
    escrow_job_id,
    hex32,
    receipt_signer,
    result_digest,
    sign_receipt,
    usdc_units,
)
from requester.client import NodeClient, NodeError, NodeUnreachable
from sandbox.ffmpeg import (
    MAX_FFMPEG_THREADS,
    MAX_OUTPUT_FILES,
    Checks,
    OutputFile,
    Plan,
    check_output,
    collect_outputs,
    ffmpeg_threads,
    probe_file,
    transcode_argv,
)
from sandbox.vllm import BatchChecks, check_batch_output, parse_batch
from storage import (
    CID,
    DAG_PB,
    RAW,
    BlockBatch,
    Blockstore,
    CarReader,
    FetchedInput,
    export_file,
    fetch_input,
)
from storage._car import MAX_BLOCK_BYTES
from storage._dagpb import PBLink, UnixFSType, decode_node, decode_unixfs
from storage._fetch import CAR_OVERHEAD_ALLOWANCE
from storage._gateway import CAR_CONTENT_TYPE, CAR_MEDIA_TYPE

MIB: Final = 1024 * 1024
AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope
CAR_FEED_BYTES: Final = MIB  # downloaded bytes gathered before one hop to the verifying thread
MAX_ARTIFACT_DEPTH: Final = 16  # folders within folders; an HLS ladder needs two levels
MAX_ENTRY_NAME_BYTES: Final = 255
MAX_COST_LENGTH: Final = 64
RECEIPT_CREDENTIAL_TYPE: Final = "HearthValidationReceipt"
# Every term of the credential expands under this vocabulary, so no context document is ever fetched.
RECEIPT_VOCAB: Final = "https://hearth.dev/ns/receipt#"
VC_CONTEXT: Final = "https://www.w3.org/2018/credentials/v1"
# The stub declares the exception as an instance; it is the class didkit raises.
DIDKIT_ERROR: Final = cast(type[Exception], didkit.DIDKitException)
# did:pkh names a recovery method: didkit signs for it only with a key marked ES256K-R.
VC_KEY_ALG: Final = "ES256K-R"


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


def _refused(code: str, message: str, **details: Any) -> SettlementError:
    return SettlementError(code, message, details=details)


def verify_signed_document(body: Mapping[str, Any], claim: str, node_did: str, job: str) -> dict[str, Any]:
    """The document of a signed node answer (``body`` less its ``jwt``), once the token vouches for it.

    The token must be the node's (:func:`~payments.jwt.verify_node_token`: issuer, signature, expiry),
    name ``job`` as its ``sub`` and carry, under ``claim``, exactly the document served beside it: a
    document altered after signing is refused with ``signed_document_mismatch``.
    """
    token = body.get("jwt")
    if not isinstance(token, str):
        raise _refused("unsigned_document", f"the node's {claim} carries no jwt", claim=claim)
    payload = verify_node_token(token, node_did)
    document = {key: value for key, value in body.items() if key != "jwt"}
    if payload.get("sub") != job:
        raise _refused(
            "signed_document_mismatch",
            f"the node's {claim} token is about {payload.get('sub')!r}, not {job}",
            claim=claim,
            job=job,
        )
    if payload.get(claim) != document:
        raise _refused(
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
        raise _refused("unsigned_document", "the node's status carries no jwt", claim="status")
    view = verify_signed_document(status, "status", node_did, job).get("job")
    result = verify_signed_document(await client.result(job), "result", node_did, job).get("result")
    if not isinstance(view, dict) or view.get("id") != job or not isinstance(result, dict):
        raise _refused("result_malformed", f"the node's documents for {job} are not a job and its result")
    provenance = result.get("provenance")
    if result.get("job") != job or not isinstance(provenance, dict) or provenance.get("node_did") != node_did:
        raise _refused(
            "result_malformed",
            "the result is not this job's, or does not name the signing node in its provenance",
            job=job,
            node_did=node_did,
        )
    return SignedJob(node_did=node_did, job=view, result=result)


# -- envelope and terms ------------------------------------------------------------------------------------


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


def funding_terms(signed: SignedJob, given: FundingTerms | None = None) -> FundingTerms:
    """The escrow terms to sign under: ``given``, else the node's ``job.payment.terms``.

    When both exist they must be the same (``terms_mismatch``); when neither does the job is unpaid and
    no receipt can be signed (``no_funding_terms``).
    """
    payment = signed.job.get("payment")
    shown = payment.get("terms") if isinstance(payment, dict) else None
    node_terms = FundingTerms.from_json(shown) if shown is not None else None
    if given is not None:
        given = FundingTerms.from_json(given.to_json())  # one spelling of each address
    if given is not None and node_terms is not None and given != node_terms:
        raise FundingError(
            "terms_mismatch",
            "the funding terms given differ from the node's for this job",
            details={"given": given.to_json(), "node": node_terms.to_json()},
        )
    terms = given or node_terms
    if terms is None:
        raise FundingError(
            "no_funding_terms",
            f"job {signed.id} has no escrow terms on the node (it runs unpaid); nothing can be settled",
            details={"job": signed.id},
        )
    return terms


def check_terms(terms: FundingTerms, env: AnyEnvelope, signer: EthSigner, signed: SignedJob) -> None:
    """Refuse (``FundingError``) terms this validator must not sign under.

    The key must be the terms' validator and the account the envelope names; chain, escrow and payer must
    be the envelope's; the escrow job id must be this node's id for this job.
    """
    problems = {
        "validator": (terms.validator, signer.address),
        "envelope_validator": (_account(env.payment.validator), signer.address),
        "chain_id": (terms.chain_id, env.payment.chain_id),
        "escrow": (terms.escrow.lower(), env.payment.escrow.lower()),
        "payer": (terms.payer.lower(), env.payment.payer.lower()),
        "escrow_job_id": (hex32(terms.job_id), hex32(escrow_job_id(signed.node_did, signed.id))),
    }
    wrong = {name: {"terms": a, "expected": b} for name, (a, b) in problems.items() if a != b}
    if wrong:
        raise FundingError(
            "terms_not_signable",
            "this key may not sign a receipt under these terms: " + ", ".join(sorted(wrong)),
            details={"mismatched": wrong, "job": signed.id},
        )


def _account(did: str) -> str | None:
    """The Ethereum account a ``did:pkh`` names (None for any other DID: it cannot sign EIP-712)."""
    return parse_did_pkh(did)[1] if did.startswith("did:pkh:") else None


# -- fetching and unpacking --------------------------------------------------------------------------------


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
        raise _refused("result_malformed", "the result's provenance names no input CID") from None
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
        raise _refused(
            "input_mismatch",
            "the input the result names is not the envelope's",
            recorded_cid=recorded,
            fetched_cid=str(fetched.cid),
            envelope_sha256=env.input_sha256,
            fetched_sha256=fetched.sha256,
        )
    return fetched


async def fetch_artifact(client: NodeClient, cid: CID, store: Blockstore, *, max_bytes: int) -> None:
    """``GET /ipfs/{cid}?format=car`` from the node into ``store``: every block verified against its CID,
    the CAR's one root ``cid``, at most ``max_bytes`` of content (plus CAR overhead) accepted.

    Blocks become visible in ``store`` only once the whole CAR has verified.
    """
    config = _gateway_config(client)
    timeout = aiohttp.ClientTimeout(
        total=config.fetch_timeout_seconds,
        sock_connect=config.connect_timeout_seconds,
        sock_read=config.read_timeout_seconds,
    )
    limit = int(max_bytes * (1 + CAR_OVERHEAD_ALLOWANCE)) + MAX_BLOCK_BYTES
    batch = store.batch()
    try:
        async with client.session.get(
            f"{client.base_url}/ipfs/{cid}",
            params={"format": "car", "dag-scope": "all"},
            headers={"Accept": CAR_CONTENT_TYPE},
            timeout=timeout,
        ) as response:
            if response.status >= 400:
                text = await response.text()
                raise NodeError(response.status, _json_or_empty(text))
            if response.content_type != CAR_MEDIA_TYPE:
                raise StorageError(
                    "gateway_bad_response",
                    f"the node answered {response.content_type} for the artifact, not a CAR",
                    details={"cid": str(cid)},
                )
            reader = CarReader()
            pieces: list[bytes] = []
            held = 0
            async for piece in response.content.iter_any():
                held += len(piece)
                if reader.bytes_read + held > limit:
                    raise _artifact_too_large(cid, max_bytes)
                pieces.append(piece)
                if held >= CAR_FEED_BYTES:
                    await asyncio.to_thread(_feed, reader, batch, pieces)
                    pieces, held = [], 0
            await asyncio.to_thread(_feed, reader, batch, pieces)
        reader.finish()
        roots = [root.v1() for root in reader.roots or []]
        if roots != [cid.v1()]:
            raise StorageError(
                "car_root_mismatch",
                f"the CAR's roots {[str(r) for r in roots]} are not the artifact {cid}",
                details={"cid": str(cid), "roots": [str(r) for r in roots]},
            )
        await asyncio.to_thread(batch.commit)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NodeUnreachable(client.base_url, str(exc) or type(exc).__name__) from None
    finally:
        await asyncio.to_thread(batch.abort)  # a no-op once committed


def _feed(reader: CarReader, batch: BlockBatch, pieces: Sequence[bytes]) -> None:
    for piece in pieces:
        for block_cid, block in reader.feed(piece):
            batch.put(block_cid, block)


def _json_or_empty(text: str) -> dict[str, Any]:
    try:
        body = parse_json(text) if text else {}
    except UntrustedJSONError:
        return {}
    return body if isinstance(body, dict) else {}


def _artifact_too_large(cid: CID, max_bytes: int) -> StorageError:
    return StorageError(
        "artifact_too_large",
        f"the artifact is larger than the envelope's max_output_mb ({max_bytes} bytes), at {cid}",
        details={"cid": str(cid), "max_bytes": max_bytes},
    )


def _malformed_artifact(cid: CID, why: str) -> StorageError:
    return StorageError("artifact_malformed", f"artifact entry {cid}: {why}", details={"cid": str(cid)})


class _Unpacker:
    """Writes a UnixFS DAG from a store to disk: files byte for byte, folders as folders, nothing else.

    Entry names are checked (no separators, no ``.``/``..``), and the files, their bytes and the depth are
    capped, so a hostile DAG (a link repeated a million times, a name that climbs out) cannot escape or
    fill the disk.
    """

    def __init__(self, store: Blockstore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.written = 0
        self.files = 0

    def entry(self, cid: CID) -> list[PBLink] | None:
        """None for a file; a directory's links for a directory; refused for anything else."""
        if cid.codec == RAW:
            return None
        if cid.codec != DAG_PB:
            raise _malformed_artifact(cid, f"codec 0x{cid.codec:x} is not UnixFS")
        try:
            links, data = decode_node(self._block(cid))
            kind = decode_unixfs(data).type if data is not None else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _malformed_artifact(cid, f"not valid dag-pb/UnixFS ({exc})") from None
        if kind in (UnixFSType.FILE, UnixFSType.RAW):
            return None
        if kind == UnixFSType.DIRECTORY:
            return links
        raise _malformed_artifact(cid, f"UnixFS {kind.name if kind is not None else 'no data'} is not a file")

    def unpack(self, cid: CID, dest: Path, depth: int = 0) -> None:
        links = self.entry(cid)
        if links is None:
            self.file(cid, dest)
            return
        if depth >= MAX_ARTIFACT_DEPTH:
            raise _malformed_artifact(cid, f"folders nest deeper than {MAX_ARTIFACT_DEPTH}")
        dest.mkdir()
        seen: set[str] = set()
        for link in links:
            if not _safe_name(link.name) or link.name in seen:
                raise _malformed_artifact(cid, f"entry name {link.name[:80]!r} is not a plain, unique name")
            seen.add(link.name)
            self.unpack(link.cid, dest / link.name, depth + 1)

    def file(self, cid: CID, dest: Path) -> None:
        self.files += 1
        if self.files > MAX_OUTPUT_FILES:
            raise _malformed_artifact(cid, f"more than {MAX_OUTPUT_FILES} files")
        try:
            exported = export_file(self.store, cid, dest, max_bytes=self.max_bytes - self.written)
        except NotFoundError:
            raise _incomplete(cid) from None
        except StorageError as exc:
            if exc.code == "input_too_large":
                raise _artifact_too_large(cid, self.max_bytes) from None
            raise
        self.written += exported.size

    def _block(self, cid: CID) -> bytes:
        try:
            return self.store.get(cid)
        except NotFoundError:
            raise _incomplete(cid) from None


def _incomplete(cid: CID) -> StorageError:
    return StorageError(
        "artifact_incomplete", f"the node's CAR lacks block {cid} of the artifact", details={"cid": str(cid)}
    )


def _safe_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\x00" not in name
        and len(name.encode()) <= MAX_ENTRY_NAME_BYTES
    )


def unpack_artifact(store: Blockstore, cid: CID, out: Path, *, single_name: str, max_bytes: int) -> None:
    """Write the artifact ``cid`` from ``store`` into the new folder ``out``, as the run left it.

    A directory becomes ``out`` itself; a single file (published without its name) becomes
    ``out/single_name``.
    """
    unpacker = _Unpacker(store, max_bytes)
    try:
        if unpacker.entry(cid) is None:
            if not _safe_name(single_name):
                raise _refused("result_malformed", f"the result names its file {single_name[:80]!r}")
            out.mkdir()
            unpacker.file(cid, out / single_name)
        else:
            unpacker.unpack(cid, out)
    except OSError as exc:
        raise StorageError(
            "artifact_unpack_failed",
            f"cannot write the artifact under {out}: {exc.strerror or exc}",
            details={"path": str(out)},
        ) from None


# -- judging -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the validator found: its own checks, and whether the artifact is the one the result names.

    ``argv_hash_match`` says whether the rebuilt ffmpeg command is the node's; None for a batch, whose
    command depends on the node's model catalog.
    """

    checks: Checks | BatchChecks
    artifact_sha256: str
    digest_ok: bool
    argv_hash_match: bool | None

    @property
    def passed(self) -> bool:
        return self.digest_ok and self.checks["passed"]


def artifact_sha256(files: Sequence[OutputFile]) -> str:
    """The result's ``artifact_sha256``, as the executor computes it: one file's own sha256, or
    ``sha256(JCS({name: sha256}))`` over several.
    """
    if len(files) == 1:
        return files[0].sha256
    return hashlib.sha256(canonical_json({f.name: f.sha256 for f in files})).hexdigest()


def listed_files(result: Mapping[str, Any]) -> dict[str, str]:
    """``{name: sha256}`` of the files the result lists; ``result_malformed`` if it lists none sensibly."""
    rows = result.get("files")
    if not isinstance(rows, list) or not rows:
        raise _refused("result_malformed", "the result lists no files")
    listed: dict[str, str] = {}
    for row in rows:
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("name"), str)
            or not isinstance(row.get("sha256"), str)
        ):
            raise _refused("result_malformed", "a file the result lists has no name or sha256")
        listed[row["name"]] = row["sha256"]
    return listed


async def judge(client: NodeClient, signed: SignedJob, env: AnyEnvelope) -> Judgement:
    """Fetch, verify and check the job's artifact (see the module docstring).

    Everything fetched lives in a temporary folder, removed on return.
    """
    if isinstance(env, VllmBatchEnvelope):
        return await judge_batch(client, signed, env)
    result = signed.result
    listed = listed_files(result)
    try:
        root = CID.parse(str(result.get("artifact_cid", "")))
    except HearthError:
        raise _refused("result_malformed", "the result's artifact_cid is not a CID") from None
    cap = env.limits.max_output_mb * MIB
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hearth-validate-"))
    try:
        store = await asyncio.to_thread(Blockstore.open, tmp / "blocks")
        fetched = await fetch_job_input(client, env, result, tmp / "input", store)
        plan = await asyncio.to_thread(_plan, env, fetched, result)
        await fetch_artifact(client, root, store, max_bytes=cap)
        single = next(iter(listed)) if len(listed) == 1 else plan.outputs[0]
        await asyncio.to_thread(unpack_artifact, store, root, tmp / "out", single_name=single, max_bytes=cap)
        files = await asyncio.to_thread(collect_outputs, plan, tmp / "out")
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    checks = check_output(
        files, plan=plan, validation=env.validation, limits=env.limits, expected_sha256=listed
    )
    digest = artifact_sha256(files)
    provenance = result.get("provenance") or {}
    return Judgement(
        checks=checks,
        artifact_sha256=digest,
        digest_ok=digest == result.get("artifact_sha256"),
        argv_hash_match=plan.argv_hash == provenance.get("argv_hash"),
    )


async def judge_batch(client: NodeClient, signed: SignedJob, env: VllmBatchEnvelope) -> Judgement:
    """Judge a batch's answers against its requests, without the model.

    The input's lines are checked as the node checks them (format, model, ``max_tokens``, count) except
    for prompt length, which needs the model's tokenizer; the output must answer each request once, with
    status 200 where ``validation.all_answered``, within each line's ``max_tokens``, and its usage must sum
    to what the result reports (and is charged for).
    """
    result = signed.result
    listed = listed_files(result)
    if len(listed) != 1:
        raise _refused("result_malformed", "a batch result lists exactly one file, its output JSONL")
    try:
        root = CID.parse(str(result.get("artifact_cid", "")))
    except HearthError:
        raise _refused("result_malformed", "the result's artifact_cid is not a CID") from None
    cap = env.limits.max_output_mb * MIB
    name = next(iter(listed))
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hearth-validate-"))
    try:
        store = await asyncio.to_thread(Blockstore.open, tmp / "blocks")
        fetched = await fetch_job_input(client, env, result, tmp / "input", store)
        requests = await asyncio.to_thread(fetched.path.read_bytes)
        await fetch_artifact(client, root, store, max_bytes=cap)
        await asyncio.to_thread(unpack_artifact, store, root, tmp / "out", single_name=name, max_bytes=cap)
        answers = await asyncio.to_thread((tmp / "out" / name).read_bytes)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    spec = env.output_spec
    batch = parse_batch(
        requests,
        model=spec.model,
        max_requests=spec.max_requests,
        max_tokens=spec.max_tokens,
        max_context=sys.maxsize,  # prompt length needs the node's tokenizer; the engine enforced it
        prompt_tokens=lambda messages: 0,
    )
    reported = result.get("usage")
    outcome = check_batch_output(
        batch,
        answers,
        all_answered=env.validation.all_answered,
        reported_usage=reported if isinstance(reported, Mapping) else {},
    )
    digest = hashlib.sha256(answers).hexdigest()
    return Judgement(
        checks=outcome.checks,
        artifact_sha256=digest,
        digest_ok=digest == result.get("artifact_sha256") == listed[name],
        argv_hash_match=None,
    )


def _plan(env: FfmpegTranscodeEnvelope, fetched: FetchedInput, result: Mapping[str, Any]) -> Plan:
    """The run's plan, rebuilt from the envelope and our own probe of the input (host ffprobe, with the
    same protocol and demuxer allow-lists as the node's), at the thread count the node recorded.
    """
    info = probe_file(str(fetched.path.absolute()))
    recorded = (result.get("provenance") or {}).get("threads")
    threads = ffmpeg_threads(env.limits.cpus)
    if isinstance(recorded, int) and not isinstance(recorded, bool) and 1 <= recorded <= MAX_FFMPEG_THREADS:
        threads = recorded  # x264's output depends on it: the node's count reproduces the node's argv
    return transcode_argv(env.output_spec, info=info, threads=threads)


# -- the receipt and its credential ------------------------------------------------------------------------


def receipt_amount(result: Mapping[str, Any], terms: FundingTerms, passed: bool) -> int:
    """What the receipt releases: the result's ``cost`` in base units, never above the escrowed amount;
    0 for a failing result.
    """
    if not passed:
        return 0
    cost = result.get("cost")
    try:
        units = usdc_units(cost) if isinstance(cost, str) and len(cost) <= MAX_COST_LENGTH else -1
    except ValueError:
        units = -1
    if units < 0:
        raise _refused("result_malformed", "the result's cost is not a USDC amount", cost=str(cost)[:80])
    return min(units, terms.amount)


def sign_verdict(
    signer: EthSigner, terms: FundingTerms, signed: SignedJob, passed: bool
) -> tuple[Receipt, bytes]:
    """The validator's EIP-712 receipt for the job's result, and its 65-byte signature."""
    receipt = Receipt(
        job=signed.id,
        chain_id=terms.chain_id,
        escrow=terms.escrow,
        escrow_job_id=terms.job_id,
        result_digest=result_digest(signed.id, signed.result),
        passed=passed,
        amount=receipt_amount(signed.result, terms, passed),
        provider=terms.provider,
    )
    return receipt, sign_receipt(signer, receipt)


def _secp256k1_jwk(signer: EthSigner) -> str:
    secret = signer.private_key_bytes()
    public = coincurve.PrivateKey(secret).public_key.format(compressed=False)
    return json.dumps(
        {
            "kty": "EC",
            "crv": "secp256k1",
            "alg": VC_KEY_ALG,
            "x": b64url_encode(public[1:33]),
            "y": b64url_encode(public[33:]),
            "d": b64url_encode(secret),
        }
    )


async def issue_credential(
    signer: EthSigner, receipt: Receipt, signature: bytes, *, issued_at: datetime | None = None
) -> dict[str, Any]:
    """The receipt and its EIP-712 signature as a W3C Verifiable Credential issued by the validator.

    JSON-LD with an inline ``@vocab`` (nothing to fetch), proved with
    ``EcdsaSecp256k1RecoverySignature2020`` by the key behind the validator's ``did:pkh``; the subject is
    the provider's account on the receipt's chain.
    """
    when = (issued_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    credential = {
        "@context": [VC_CONTEXT, {"@vocab": RECEIPT_VOCAB}],
        "type": ["VerifiableCredential", RECEIPT_CREDENTIAL_TYPE],
        "issuer": signer.did,
        "issuanceDate": when,
        "credentialSubject": {
            "id": f"did:pkh:eip155:{receipt.chain_id}:{receipt.provider}",
            "receipt": receipt.to_json(),
            "signature": "0x" + signature.hex(),
        },
    }
    options = {"proofPurpose": "assertionMethod", "verificationMethod": signer.kid}
    try:
        issued = await didkit.issue_credential(
            json.dumps(credential), json.dumps(options), _secp256k1_jwk(signer)
        )
    except DIDKIT_ERROR as exc:
        raise _refused("credential_not_issued", f"didkit could not issue the credential: {exc}") from None
    doc: dict[str, Any] = json.loads(issued)
    return doc


async def verify_credential(credential: Mapping[str, Any]) -> tuple[Receipt, bytes]:
    """The receipt and signature a receipt credential carries, once both proofs hold.

    didkit must verify the credential's proof (``credential_invalid`` otherwise), and the EIP-712
    signature inside must recover to the issuer's account (``credential_signer_mismatch``).
    """
    options = json.dumps({"proofPurpose": "assertionMethod"})
    try:
        answer = json.loads(await didkit.verify_credential(json.dumps(dict(credential)), options))
    except DIDKIT_ERROR as exc:
        raise _refused("credential_invalid", f"didkit refused the credential: {exc}") from None
    if answer.get("errors") or "proof" not in answer.get("checks", []):
        raise _refused(
            "credential_invalid", "the credential's proof does not verify", errors=answer.get("errors")
        )
    subject = credential.get("credentialSubject")
    types = credential.get("type")
    if (
        not isinstance(subject, Mapping)
        or not isinstance(types, list)
        or RECEIPT_CREDENTIAL_TYPE not in types
    ):
        raise _refused("credential_invalid", f"not a {RECEIPT_CREDENTIAL_TYPE} credential")
    receipt = Receipt.from_json(subject.get("receipt"))
    signature = _signature_bytes(subject.get("signature"))
    issuer = str(credential.get("issuer"))
    _, address = parse_did_pkh(issuer)
    if receipt_signer(receipt, signature) != address:
        raise _refused(
            "credential_signer_mismatch",
            "the receipt inside the credential was not signed by its issuer",
            issuer=issuer,
        )
    return receipt, signature


def _signature_bytes(value: object) -> bytes:
    """A ``0x``-hex signature's bytes; empty (recovering to nobody) when it is not one."""
    if not isinstance(value, str) or not value.startswith("0x"):
        return b""
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        return b""


def receipt_body(
    receipt: Receipt, signature: bytes, credential: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The body of ``POST /v1/jobs/{id}/receipt``: the receipt, its signature and, if issued, its VC."""
    body: dict[str, Any] = {"receipt": receipt.to_json(), "signature": "0x" + signature.hex()}
    if credential is not None:
        body["credential"] = dict(credential)
    return body


# -- all of it ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The machine-readable outcome of :func:`validate`."""

    job: str
    judgement: Judgement
    receipt: Receipt
    signature: bytes
    credential: dict[str, Any] | None
    posted: bool
    node_answer: dict[str, Any] | None

    @property
    def passed(self) -> bool:
        return self.receipt.passed

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "job": self.job,
            "passed": self.passed,
            "checks": self.judgement.checks,
            "digest_ok": self.judgement.digest_ok,
            "artifact_sha256": self.judgement.artifact_sha256,
            "argv_hash_match": self.judgement.argv_hash_match,
            "result_digest": hex32(self.receipt.result_digest),
            "amount": str(self.receipt.amount),
            "receipt": self.receipt.to_json(),
            "signature": "0x" + self.signature.hex(),
            "posted": self.posted,
        }
        if self.credential is not None:
            doc["credential"] = self.credential
        if self.node_answer is not None:
            doc["node_answer"] = self.node_answer
        return doc


async def validate(
    client: NodeClient,
    job: str,
    signer: EthSigner,
    *,
    envelope: Mapping[str, Any] | None = None,
    terms: FundingTerms | None = None,
    node_did: str | None = None,
    credential: bool = False,
    post: bool = True,
) -> ValidationReport:
    """Judge job ``job`` on the node behind ``client`` and sign (and, with ``post``, send) its receipt.

    Raises before signing anything when the result cannot be judged. A refusal of the posted receipt
    does not raise: the report carries the signed receipt and the node's answer (``posted`` false), so
    it can be sent again.
    """
    signed = await fetch_signed_job(client, job, node_did=node_did)
    env = job_envelope(signed.job, envelope)
    chosen = funding_terms(signed, terms)
    check_terms(chosen, env, signer, signed)
    judgement = await judge(client, signed, env)
    receipt, signature = sign_verdict(signer, chosen, signed, judgement.passed)
    vc = await issue_credential(signer, receipt, signature) if credential else None
    posted, answer = False, None
    if post:
        try:
            answer = await client.post_receipt(job, receipt_body(receipt, signature, vc))
            posted = True
        except (NodeError, NodeUnreachable) as exc:
            answer = exc.body if isinstance(exc, NodeError) else exc.to_dict()
    return ValidationReport(
        job=job,
        judgement=judgement,
        receipt=receipt,
        signature=signature,
        credential=vc,
        posted=posted,
        node_answer=answer,
    )
