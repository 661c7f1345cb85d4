"""The validator's verdict: judge one job's result independently, then sign the receipt that settles it.

Nothing the node says is taken on trust beyond its signature, and every byte is checked::

    fetch_signed_job     the job's status and result, both signed by one node DID (validator.fetch)
    job_envelope         the requester's envelope (or the node's copy), bound to job.envelope_hash
    funding_terms        the escrow terms (given, or the node's), checked against envelope, key and job
    judge                the input and the artifact fetched from the node's gateway, verified, and judged:
                         a transcode by validator.transcode, a batch by validator.batch
    sign_verdict         the EIP-712 receipt: passed only if the digest and every check pass; amount =
                         the result's cost, capped at the escrowed amount, 0 when failing
    issue_credential     optionally, the receipt and its signature as a W3C Verifiable Credential
                         (payments.credentials)
    receipt_body         what NodeClient.post_receipt sends to POST /v1/jobs/{id}/receipt; the node
                         then simulates and submits ``release``/``refund``

:func:`validate` runs them in that order and returns a :class:`ValidationReport`. A result that cannot be
judged (a bad signature, an artifact that does not verify, terms that do not fit) is refused with a
:class:`~core.errors.HearthError` and no receipt; a result that is judged and fails gets a failing receipt,
which lets the payer take the escrow back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from core.envelope import VllmBatchEnvelope
from core.errors import FundingError, HearthError
from payments.credentials import issue_credential
from payments.did import parse_did_pkh
from payments.keys import EthSigner
from payments.receipts import (
    FundingTerms,
    Receipt,
    escrow_job_id,
    hex32,
    result_digest,
    sign_receipt,
    terms_mismatches,
    usdc_units,
)
from requester.client import NodeClient, NodeError, NodeUnreachable
from validator.batch import judge_batch
from validator.fetch import AnyEnvelope, SignedJob, fetch_signed_job, job_envelope, refused
from validator.judgement import Judgement
from validator.transcode import judge_transcode

MAX_COST_LENGTH: Final = 64

# -- the terms ---------------------------------------------------------------------------------------------


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
    """Refuse (``FundingError`` ``terms_not_signable``) terms this validator must not sign under.

    The terms must be the envelope's payment and this node's escrow job id for this job
    (:func:`~payments.receipts.terms_mismatches`: chain, escrow, payer, amount within ``max_price``,
    escrow job id), and the key must be both the terms' validator (``validator``) and the account the
    envelope names (``envelope_validator``); those two stand for the shared check's own ``validator``
    row, which they imply. Details: ``mismatched`` maps each field to ``{"terms", "expected"}``.
    """
    rows = terms_mismatches(terms, env.payment, escrow_job_id=escrow_job_id(signed.node_did, signed.id))
    wrong: dict[str, dict[str, object]] = {
        str(row["field"]): {"terms": row["terms"], "expected": row["expected"]}
        for row in rows
        if row["field"] != "validator"
    }
    if terms.validator != signer.address:
        wrong["validator"] = {"terms": terms.validator, "expected": signer.address}
    if _account(env.payment.validator) != signer.address:
        wrong["envelope_validator"] = {"terms": _account(env.payment.validator), "expected": signer.address}
    if wrong:
        raise FundingError(
            "terms_not_signable",
            "this key may not sign a receipt under these terms: " + ", ".join(sorted(wrong)),
            details={"mismatched": wrong, "job": signed.id},
        )


def _account(did: str) -> str | None:
    """The Ethereum account a ``did:pkh`` names (None for any other DID: it cannot sign EIP-712)."""
    if not did.startswith("did:pkh:"):
        return None
    try:
        return parse_did_pkh(did)[1]
    except HearthError:
        return None


# -- judging and signing -----------------------------------------------------------------------------------


async def judge(client: NodeClient, signed: SignedJob, env: AnyEnvelope) -> Judgement:
    """Fetch, verify and check the job's artifact: a batch by :func:`~validator.batch.judge_batch`, a
    transcode by :func:`~validator.transcode.judge_transcode`.
    """
    if isinstance(env, VllmBatchEnvelope):
        return await judge_batch(client, signed, env)
    return await judge_transcode(client, signed, env)


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
        raise refused("result_malformed", "the result's cost is not a USDC amount", cost=str(cost)[:80])
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
