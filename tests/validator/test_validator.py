"""The validator's tool against a real node that really transcodes (Docker, ffmpeg, blockstore, gateway).

One unpaid node (no ``[chain]``) runs one short job for the whole module; most tests validate that job:
as it is, through a proxy that lies about it, or under a stricter envelope. Funding terms are built here,
as a requester would hand them to its validator, since an unpaid node shows none. One test runs the
paid path end to end (devnet anvil): the posted receipt releases the escrow. The unpacker is also fed
hostile DAGs built by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import didkit
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_utils.address import to_checksum_address

from cli.common import Out
from cli.common import client_opts as _client_opts
from cli.common import common_opts as _common
from cli.validator import add_parser
from core.envelope import FfmpegTranscodeEnvelope, parse_envelope
from core.errors import ConfigError, FundingError, RequestError, SettlementError, StorageError
from payments import devnet
from payments.credentials import issue_credential, verify_credential
from payments.devnet import TOKEN_NAME
from payments.keys import EthSigner, new_ed25519, new_eth, save_key
from payments.receipts import FundingTerms, Receipt, escrow_job_id, receipt_signer, result_digest, usdc_units
from requester.client import NodeClient
from sandbox.ffmpeg import make_test_clip
from storage import CID, DAG_PB, RAW, Blockstore, import_path, write_car
from storage._car import section_prefix
from storage._dagpb import PBLink, UnixFSType, encode_node, encode_unixfs
from tests.conftest import LiveNode, live, make_envelope, write_home
from tests.node.test_execution import FINISHED, RUN_CONFIG, submit, upload, wait_state
from tests.payments.paid import paid_envelope, paid_home, quote_and_fund, wait_for
from validator import (
    MIB,
    SignedJob,
    check_terms,
    fetch_artifact,
    fetch_signed_job,
    judge,
    sign_verdict,
    unpack_artifact,
    validate,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAIN_ID = 31337
ESCROW = to_checksum_address("0x" + "e" * 40)
PAYER = to_checksum_address("0x" + "a" * 40)
PROVIDER = to_checksum_address("0x" + "9" * 40)
TOKEN = to_checksum_address("0x" + "7" * 40)


@dataclass(frozen=True)
class Done:
    """The module's completed job, the envelope it ran under, and terms a validator could sign under."""

    node: LiveNode
    job: str
    envelope: dict[str, Any]
    validator: EthSigner
    terms: FundingTerms


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def done(
    tmp_path_factory: pytest.TempPathFactory, sandbox_images: dict[str, str]
) -> AsyncIterator[Done]:
    tmp = tmp_path_factory.mktemp("validator")
    clip = make_test_clip(tmp / "clip.mp4", seconds=2.5, width=320, height=240)
    validator = new_eth(CHAIN_ID)
    async with live(write_home(tmp / "home", RUN_CONFIG)) as node:
        cid = await upload(node.url, clip.read_bytes())
        envelope = make_envelope(
            "validate-1",
            input_uri=cid,
            output_spec={"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"},
            validation={"min_duration_seconds": 2, "required_streams": ["video", "audio"]},
            payment={
                "max_price": "5.00",
                "chain_id": CHAIN_ID,
                "escrow": ESCROW,
                "payer": PAYER,
                "validator": validator.did,
            },
        )
        job = await submit(node.url, node.did, new_ed25519(), envelope)
        view = await wait_state(node.url, job, FINISHED)
        assert view["state"] == "completed", view
        terms = FundingTerms(
            chain_id=CHAIN_ID,
            escrow=ESCROW,
            token=TOKEN,
            token_name=TOKEN_NAME,
            job_id=escrow_job_id(node.did, job),
            payer=PAYER,
            provider=PROVIDER,
            validator=validator.address,
            amount=usdc_units(view["price"]),
            deadline=int(time.time()) + 3600,
        )
        yield Done(node, job, envelope, validator, terms)


async def _signed(done: Done) -> SignedJob:
    async with done.node.client() as client:
        return await fetch_signed_job(client, done.job)


def _envelope(doc: dict[str, Any]) -> FfmpegTranscodeEnvelope:
    env = parse_envelope(doc)
    assert isinstance(env, FfmpegTranscodeEnvelope)
    return env


async def _result(done: Done) -> dict[str, Any]:
    async with done.node.client() as client:
        body = await client.result(done.job)
    result: dict[str, Any] = body["result"]
    return result


# -- the honest path ---------------------------------------------------------------------------------------


async def test_a_real_transcode_passes_and_its_receipt_recovers_to_the_validator(done: Done) -> None:
    result = await _result(done)
    async with done.node.client() as client:
        # no --envelope: the node's copy is used, checked against the job's envelope_hash
        report = await validate(client, done.job, done.validator, terms=done.terms, post=False)
    assert report.passed and report.judgement.digest_ok
    assert report.judgement.artifact_sha256 == result["artifact_sha256"]
    checks = {c["name"]: c for c in report.judgement.checks["checks"]}
    assert set(checks) == {"stream_layout", "duration", "file_size", "resolution", "codec", "hash"}
    assert all(c["passed"] for c in checks.values())
    assert checks["hash"]["detail"]["compared"] is True  # our files against the node's listing
    assert report.judgement.argv_hash_match  # the host's probe rebuilt exactly the node's argv

    receipt = report.receipt
    assert receipt_signer(receipt, report.signature) == done.validator.address
    assert receipt.result_digest == result_digest(done.job, result)
    assert receipt.amount == usdc_units(result["cost"]) > 0
    assert (receipt.job, receipt.escrow_job_id, receipt.provider) == (done.job, done.terms.job_id, PROVIDER)
    assert not report.posted and report.node_answer is None

    doc = report.to_json()
    assert doc["passed"] is True and doc["digest_ok"] is True and doc["posted"] is False
    assert doc["receipt"] == receipt.to_json() and doc["signature"] == "0x" + report.signature.hex()
    assert doc["result_digest"] == "0x" + receipt.result_digest.hex() and doc["amount"] == str(receipt.amount)
    assert "credential" not in doc and "node_answer" not in doc


async def test_the_amount_never_exceeds_the_escrowed_amount(done: Done) -> None:
    signed = await _signed(done)
    small = dataclasses.replace(done.terms, amount=1)
    receipt, signature = sign_verdict(done.validator, small, signed, passed=True)
    assert receipt.amount == 1 and receipt_signer(receipt, signature) == done.validator.address


async def test_posting_to_an_unpaid_node_keeps_the_signed_receipt_and_the_refusal(done: Done) -> None:
    async with done.node.client() as client:
        report = await validate(
            client, done.job, done.validator, envelope=done.envelope, terms=done.terms, credential=True
        )
    assert report.passed and not report.posted
    assert report.node_answer is not None
    assert report.node_answer["error"]["code"] == "payments_not_configured"
    assert receipt_signer(report.receipt, report.signature) == done.validator.address
    assert report.credential is not None
    assert await verify_credential(report.credential) == (report.receipt, report.signature)


async def test_on_a_paid_node_the_posted_receipt_settles_the_job(
    tmp_path: Path, sandbox_images: dict[str, str]
) -> None:
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=2, width=320, height=240)
    ph = paid_home(tmp_path / "home", RUN_CONFIG, chain={"funding_timeout_seconds": 30})
    try:
        before = ph.balances()
        async with live(ph.home) as node, NodeClient(node.url) as client:
            cid = (await client.put_blob(clip))["cid"]
            job, terms = await quote_and_fund(
                client, node.did, new_ed25519(), ph, paid_envelope(ph, "validate-paid", cid)
            )
            assert (await wait_for(client, job, {"completed", "failed", "expired"}))["state"] == "completed"
            # no envelope, no terms: the node's copies, checked against the job and the validator's key
            report = await validate(client, job, ph.validator, credential=True)
            assert report.passed and report.posted and report.node_answer is not None
            assert report.node_answer["job"]["state"] in ("validated", "settled")
            assert report.receipt.escrow_job_id == terms.job_id and 0 < report.receipt.amount <= terms.amount
            view = await wait_for(client, job, {"settled"})
            assert view["payment"]["settlement"]["tx"]["purpose"] == "release"
        after = ph.balances()
        assert after["provider"] - before["provider"] == report.receipt.amount
        assert ph.released_events(terms.to_json()["escrow_job_id"]) == 1
    finally:
        devnet.stop(ph.home)


# -- results that are refused ------------------------------------------------------------------------------


@asynccontextmanager
async def lying_node(
    upstream: str,
    *,
    path: Callable[[str], str] = lambda p: p,
    edit: Callable[[str, dict[str, Any]], None] = lambda p, doc: None,
    raw: Callable[[str, bytes], bytes] = lambda p, body: body,
) -> AsyncIterator[str]:
    """A proxy in front of ``upstream`` that may send a request elsewhere (``path``), change a JSON
    answer (``edit``) or any other answer's bytes (``raw``) before passing it on; yields its URL.
    """
    async with aiohttp.ClientSession() as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            target = (
                upstream + path(request.path) + (f"?{request.query_string}" if request.query_string else "")
            )
            headers = {k: v for k, v in request.headers.items() if k in ("Accept", "Content-Type")}
            async with session.request(
                request.method, target, headers=headers, data=await request.read()
            ) as r:
                body = await r.read()
                if r.content_type == "application/json":
                    doc = json.loads(body)
                    edit(request.path, doc)
                    body = json.dumps(doc).encode()
                else:
                    body = raw(request.path, body)
                return web.Response(status=r.status, body=body, content_type=r.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            yield str(server.make_url("")).rstrip("/")
        finally:
            await server.close()


async def test_a_result_altered_after_signing_is_refused(done: Done) -> None:
    def alter(path: str, doc: dict[str, Any]) -> None:
        if path.endswith("/result"):
            doc["result"]["artifact_sha256"] = "0" * 64

    async with lying_node(done.node.url, edit=alter) as url, NodeClient(url) as client:
        with pytest.raises(SettlementError) as info:
            await validate(client, done.job, done.validator, terms=done.terms, post=False)
    assert info.value.code == "signed_document_mismatch"
    assert info.value.details == {"claim": "result", "job": done.job}


async def test_an_artifact_that_is_not_the_results_is_refused(done: Done) -> None:
    result = await _result(done)
    artifact, source = f"/ipfs/{result['artifact_cid']}", f"/ipfs/{result['provenance']['input_cid']}"

    async with (
        lying_node(done.node.url, path=lambda p: source if p == artifact else p) as url,
        NodeClient(url) as client,
    ):
        with pytest.raises(StorageError) as info:
            await validate(client, done.job, done.validator, terms=done.terms, post=False)
    assert info.value.code == "car_root_mismatch"
    assert info.value.details["roots"] == [result["provenance"]["input_cid"]]


def _stuffed(car: bytes) -> tuple[bytes, CID]:
    """``car`` with one more, well-formed block appended that no block of its DAG links to."""
    junk = b"a block the artifact does not link to" * 100
    junk_cid = CID.for_block(RAW, junk)
    return car + section_prefix(junk_cid, len(junk)) + junk, junk_cid


async def test_a_car_carrying_a_block_outside_the_artifacts_dag_is_refused(done: Done) -> None:
    result = await _result(done)
    artifact = f"/ipfs/{result['artifact_cid']}"
    stuffed: list[CID] = []

    def stuff(path: str, body: bytes) -> bytes:
        if path != artifact:
            return body
        car, junk = _stuffed(body)
        stuffed.append(junk)
        return car

    async with lying_node(done.node.url, raw=stuff) as url, NodeClient(url) as client:
        with pytest.raises(StorageError) as info:
            await validate(client, done.job, done.validator, terms=done.terms, post=False)
    assert info.value.code == "unexpected_block"
    assert stuffed and info.value.details == {"cid": str(stuffed[0])}


async def test_fetch_artifact_keeps_nothing_of_a_car_with_an_unlinked_block(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "master.m3u8").write_text("#EXTM3U\n")
    (tree / "seg_00000.ts").write_bytes(bytes(range(256)) * 64)
    origin = Blockstore.open(tmp_path / "origin")
    root = import_path(tree, origin).cid  # a folder node and its two files: three verified blocks
    car = io.BytesIO()
    write_car(origin, root, car)
    body, junk = _stuffed(car.getvalue())

    async def gateway(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/vnd.ipld.car")

    app = web.Application()
    app.router.add_get("/{tail:.*}", gateway)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    store = Blockstore.open(tmp_path / "blocks")
    try:
        async with NodeClient(str(server.make_url("")).rstrip("/")) as client:
            with pytest.raises(StorageError) as info:
                await fetch_artifact(client, root, store, max_bytes=MIB)
    finally:
        await server.close()
    assert info.value.code == "unexpected_block" and info.value.details == {"cid": str(junk)}
    assert store.stats().blocks == 0  # the artifact's own, verified blocks are not kept either


async def test_an_envelope_that_is_not_the_jobs_is_refused(done: Done) -> None:
    other = {**done.envelope, "limits": {**done.envelope["limits"], "max_output_mb": 1}}
    async with done.node.client() as client:
        with pytest.raises(RequestError) as info:
            await validate(client, done.job, done.validator, envelope=other, terms=done.terms, post=False)
    assert info.value.code == "envelope_mismatch"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"validator": "0x" + "1" * 40}, "validator"),
        ({"escrow": "0x" + "f" * 40}, "escrow"),
        ({"chain_id": 1}, "chain_id"),
        ({"job_id": bytes(32)}, "escrow_job_id"),
    ],
)
async def test_terms_the_validator_may_not_sign_under_are_refused(
    done: Done, change: dict[str, Any], field: str
) -> None:
    async with done.node.client() as client:
        with pytest.raises(FundingError) as info:
            await validate(
                client, done.job, done.validator, terms=dataclasses.replace(done.terms, **change), post=False
            )
    assert info.value.code == "terms_not_signable"
    assert set(info.value.details["mismatched"]) == {field}


async def test_another_key_than_the_envelopes_validator_may_not_sign(done: Done) -> None:
    stranger = new_eth(CHAIN_ID)
    terms = dataclasses.replace(done.terms, validator=stranger.address)
    with pytest.raises(FundingError) as info:
        check_terms(terms, _envelope(done.envelope), stranger, await _signed(done))
    assert set(info.value.details["mismatched"]) == {"envelope_validator"}


async def test_an_unpaid_job_without_terms_has_nothing_to_settle(done: Done) -> None:
    async with done.node.client() as client:
        with pytest.raises(FundingError) as info:
            await validate(client, done.job, done.validator, post=False)
    assert info.value.code == "no_funding_terms"


async def test_an_artifact_over_the_envelopes_output_cap_is_refused(done: Done, tmp_path: Path) -> None:
    result = await _result(done)
    root, size = CID.parse(result["artifact_cid"]), result["artifact_size"]
    store = Blockstore.open(tmp_path / "blocks")
    async with done.node.client() as client:
        # the download allows a block of CAR framing over the cap; the unpacked bytes get none
        await fetch_artifact(client, root, store, max_bytes=size - 1)
    with pytest.raises(StorageError) as info:
        unpack_artifact(store, root, tmp_path / "out", single_name="output.mp4", max_bytes=size - 1)
    assert info.value.code == "artifact_too_large"
    unpack_artifact(store, root, tmp_path / "out2", single_name="output.mp4", max_bytes=size)
    assert (tmp_path / "out2" / "output.mp4").stat().st_size == size


# -- unpacking a hostile DAG -------------------------------------------------------------------------------


def _directory(store: Blockstore, entries: list[tuple[str, CID]]) -> CID:
    block = encode_node([PBLink(cid, name, 0) for name, cid in entries], encode_unixfs(UnixFSType.DIRECTORY))
    return store.put(block, DAG_PB)


async def test_an_unpacked_tree_is_the_one_its_cid_names(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "360p").mkdir(parents=True)
    (tree / "master.m3u8").write_text("#EXTM3U\n")
    (tree / "360p" / "seg_00000.ts").write_bytes(bytes(range(256)) * 8000)  # two chunks: a file DAG
    store = Blockstore.open(tmp_path / "blocks")
    root = import_path(tree, store).cid
    unpack_artifact(store, root, tmp_path / "out", single_name="unused", max_bytes=4 * MIB)
    assert import_path(tmp_path / "out").cid == root
    assert (tmp_path / "out" / "360p" / "seg_00000.ts").read_bytes() == bytes(range(256)) * 8000


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "nul\x00", "x" * 256])
async def test_unpacking_refuses_an_entry_name_that_is_not_a_plain_name(tmp_path: Path, name: str) -> None:
    store = Blockstore.open(tmp_path / "blocks")
    leaf = store.put(b"escaped")
    root = _directory(store, [(name, leaf)])
    (tmp_path / "a").mkdir()
    with pytest.raises(StorageError) as info:
        unpack_artifact(store, root, tmp_path / "a" / "out", single_name="unused", max_bytes=MIB)
    assert info.value.code == "artifact_malformed"
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["out"]  # the empty folder, nothing else


async def test_unpacking_caps_the_bytes_a_repeated_link_would_write(tmp_path: Path) -> None:
    store = Blockstore.open(tmp_path / "blocks")
    leaf = store.put(b"x" * 1000)
    root = _directory(store, [(f"copy{i}", leaf) for i in range(10)])  # 10 kB from one 1 kB block
    with pytest.raises(StorageError) as info:
        unpack_artifact(store, root, tmp_path / "out", single_name="unused", max_bytes=5000)
    assert info.value.code == "artifact_too_large"


async def test_unpacking_refuses_a_duplicate_name_and_a_missing_block(tmp_path: Path) -> None:
    store = Blockstore.open(tmp_path / "blocks")
    leaf = store.put(b"a")
    absent = CID.for_block(RAW, b"never stored")
    for i, entries in enumerate([[("same", leaf), ("same", leaf)], [("gone", absent)]]):
        with pytest.raises(StorageError) as info:
            unpack_artifact(
                store, _directory(store, entries), tmp_path / f"out{i}", single_name="x", max_bytes=MIB
            )
        assert info.value.code == ("artifact_malformed", "artifact_incomplete")[i]


async def test_a_single_file_artifact_takes_a_plain_name_only(tmp_path: Path) -> None:
    store = Blockstore.open(tmp_path / "blocks")
    leaf = store.put(b"data")
    with pytest.raises(SettlementError) as info:
        unpack_artifact(store, leaf, tmp_path / "out", single_name="../output.mp4", max_bytes=MIB)
    assert info.value.code == "result_malformed"
    unpack_artifact(store, leaf, tmp_path / "out", single_name="output.mp4", max_bytes=MIB)
    assert (tmp_path / "out" / "output.mp4").read_bytes() == b"data"


# -- results that are judged and fail ----------------------------------------------------------------------


async def test_a_result_whose_artifact_sha256_is_wrong_gets_a_failing_receipt(done: Done) -> None:
    async with done.node.client() as client:
        signed = await fetch_signed_job(client, done.job)
        # as if the node had signed a wrong digest: the bytes it serves are not the ones it names
        lying = dataclasses.replace(signed, result={**signed.result, "artifact_sha256": "0" * 64})
        judgement = await judge(client, lying, _envelope(done.envelope))
    assert not judgement.digest_ok and judgement.checks["passed"] and not judgement.passed
    receipt, signature = sign_verdict(done.validator, done.terms, lying, judgement.passed)
    assert not receipt.passed and receipt.amount == 0
    assert receipt.result_digest == result_digest(done.job, lying.result)
    assert receipt_signer(receipt, signature) == done.validator.address


async def test_checks_that_fail_give_a_failing_receipt_with_amount_zero(done: Done) -> None:
    strict = _envelope({**done.envelope, "validation": {"min_duration_seconds": 30}})
    async with done.node.client() as client:
        signed = await fetch_signed_job(client, done.job)
        judgement = await judge(client, signed, strict)
    failed = [c["name"] for c in judgement.checks["checks"] if not c["passed"]]
    assert failed == ["duration"] and judgement.digest_ok and not judgement.passed
    receipt, signature = sign_verdict(done.validator, done.terms, signed, judgement.passed)
    assert not receipt.passed and receipt.amount == 0
    assert receipt_signer(receipt, signature) == done.validator.address


# -- the credential ----------------------------------------------------------------------------------------


async def test_the_receipt_credential_verifies_with_didkit_and_breaks_when_altered(done: Done) -> None:
    receipt, signature = sign_verdict(done.validator, done.terms, await _signed(done), passed=True)
    vc = await issue_credential(done.validator, receipt, signature)
    assert vc["issuer"] == done.validator.did
    assert vc["proof"]["verificationMethod"] == done.validator.kid
    answer = json.loads(
        await didkit.verify_credential(json.dumps(vc), json.dumps({"proofPurpose": "assertionMethod"}))
    )
    assert answer["errors"] == [] and "proof" in answer["checks"]
    assert await verify_credential(vc) == (receipt, signature)

    more = json.loads(json.dumps(vc))
    more["credentialSubject"]["receipt"]["amount"] = str(receipt.amount + 1)
    other_issuer = {**vc, "issuer": new_eth(CHAIN_ID).did}
    for altered in (more, other_issuer):
        with pytest.raises(SettlementError) as info:
            await verify_credential(altered)
        assert info.value.code == "credential_invalid"


async def test_a_credential_must_carry_its_issuers_own_receipt_signature(done: Done) -> None:
    receipt, signature = sign_verdict(done.validator, done.terms, await _signed(done), passed=True)
    # a credential whose proof holds, by a stranger, wrapping the validator's EIP-712 signature
    vc = await issue_credential(new_eth(CHAIN_ID), receipt, signature)
    with pytest.raises(SettlementError) as info:
        await verify_credential(vc)
    assert info.value.code == "credential_signer_mismatch"


# -- the command -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    """``hearth`` with only ``validate``, wired as cli/main.py wires it."""
    parser = argparse.ArgumentParser(prog="hearth")
    add_parser(parser.add_subparsers(dest="command", required=True), [_common(), _client_opts()])
    return parser


async def _run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    code: int = await asyncio.to_thread(args.func, args, Out(args.json))
    return code


async def test_hearth_validate_signs_and_prints_the_report(
    done: Done, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, envelope, terms = tmp_path / "validator.key", tmp_path / "job.json", tmp_path / "terms.json"
    save_key(done.validator, key)
    envelope.write_text(json.dumps(done.envelope))
    terms.write_text(json.dumps(done.terms.to_json()))
    common = [done.job, "--key", str(key), "--node", done.node.url, "--terms", str(terms), "--json"]

    assert await _run_cli(["validate", *common, "--envelope", str(envelope), "--no-post", "--vc"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and report["posted"] is False
    receipt = Receipt.from_json(report["receipt"])
    assert receipt_signer(receipt, bytes.fromhex(report["signature"][2:])) == done.validator.address
    assert (await verify_credential(report["credential"]))[0] == receipt

    # posting: this unpaid node refuses the receipt, which is still printed for another try
    assert await _run_cli(["validate", *common]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["posted"] is False and report["node_answer"]["error"]["code"] == "payments_not_configured"

    # for people: the verdict first, then each check
    assert await _run_cli(["validate", *common[:-1], "--no-post"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"PASSED  job {done.job}")
    assert any(line.split() == ["duration", "ok"] for line in lines)


async def test_hearth_validate_refuses_a_key_that_cannot_sign_eip712(done: Done, tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    save_key(new_ed25519(), key)
    with pytest.raises(ConfigError) as info:  # hearth's main prints it and exits 2
        await _run_cli(["validate", done.job, "--key", str(key), "--node", done.node.url])
    assert info.value.code == "validator_key_not_ethereum"


async def test_hearth_validate_exits_1_on_a_result_it_cannot_verify(
    done: Done, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "validator.key"
    save_key(done.validator, key)
    # no --terms on an unpaid node: refused as a funding error, printed, exit 1
    assert await _run_cli(["validate", done.job, "--key", str(key), "--node", done.node.url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "no_funding_terms"
