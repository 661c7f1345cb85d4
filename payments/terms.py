"""Escrow terms for quotes (docs/protocol.md): what a job's escrow entry must hold, and the payer's
authorization.

A quote names the escrow entry the requester must fund (:class:`~payments.receipts.FundingTerms`): job id,
provider (this node's wallet), validator, amount (the quote) and deadline. :class:`PaymentTerms` refuses an
envelope whose payment this node cannot take, computes the terms of a quote, checks a payer's EIP-3009
authorization (locally and, when the chain answers, by simulating the ``fundWithAuthorization``), and
records the terms in the journal (``payments`` table) so the funding watcher (:mod:`payments.funding`)
follows the job's funding. Part of :class:`payments.settlement.Settlement`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

from eth_utils.address import to_checksum_address

from core.config import ChainSection
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope
from core.errors import ChainError, FundingError, HearthError
from core.journal import JobRecord, Journal, PaymentRecord
from payments.chain import Chain, is_reverted
from payments.did import parse_did_pkh
from payments.grant_terms import check_grant_funding
from payments.grants import GrantFunding, is_grant_funding
from payments.jwt import decode_unverified
from payments.receipts import (
    Authorization,
    FundingTerms,
    authorization_signer,
    escrow_job_id,
    hex32,
    terms_mismatches,
    usdc_units,
)

log = logging.getLogger("hearth.settlement")

# The actor every journal transition and note of the settlement parts is recorded under.
ACTOR: Final = "settlement"
# An authorization must stay valid this long after it reaches the node, or funding may fail in flight.
AUTHORIZATION_MARGIN_SECONDS: Final = 60

AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope


def fund_call(chain: Chain, terms: FundingTerms, auth: Authorization) -> Any:
    """The escrow's ``fundWithAuthorization`` call that funds ``terms`` with the payer's ``auth``."""
    v, r, s = auth.vrs
    return chain.fund_with_authorization(
        (
            terms.job_id,
            terms.provider,
            terms.validator,
            terms.amount,
            terms.deadline,
            terms.payer,
            auth.valid_after,
            auth.valid_before,
            v,
            r,
            s,
        )
    )


class PaymentTerms:
    """The terms side of admission: which payments this node takes, under which escrow terms."""

    def __init__(
        self,
        cfg: ChainSection,
        journal: Journal,
        chain: Chain,
        node_did: str,
        provider: str,
        *,
        retry_budget: int,
        wake: Callable[[], None] = lambda: None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.chain = chain
        self.node_did = node_did
        self.provider = provider
        self._retry_budget = retry_budget
        self._wake = wake
        self._now = now

    def check_payment_terms(self, env: AnyEnvelope) -> str:
        """Refuse an envelope whose payment this node cannot take; return the validator's address.

        The envelope's payment is compared with the terms this node would quote for it (its chain, its
        escrow, the validator's account; nothing priced yet) by :func:`~payments.receipts.terms_mismatches`,
        the same comparison the requester and the validator make of the quote; the first field that
        differs is refused (``payment_terms_unsupported``).
        """
        pay = env.payment

        def refuse(field: str, expected: Any, got: Any) -> FundingError:
            return FundingError(
                "payment_terms_unsupported",
                f"payment.{field} must be {expected} on this node, not {got}",
                details={"field": f"payment.{field}", "expected": expected, "got": got},
            )

        try:
            validator_chain, validator = parse_did_pkh(pay.validator)
        except HearthError:
            validator_chain, validator = None, ""
        unpriced = FundingTerms(
            chain_id=self.cfg.chain_id,
            escrow=to_checksum_address(self.cfg.escrow),
            token=to_checksum_address(self.cfg.token),
            token_name=self.cfg.token_name,
            job_id=bytes(32),
            payer=to_checksum_address(pay.payer),
            provider=self.provider,
            validator=validator,
            amount=0,
            deadline=0,
        )
        for row in terms_mismatches(unpriced, pay):
            field = str(row["field"])
            if field != "validator":
                raise refuse(field, row["terms"], row["expected"])
            if validator_chain is None:
                raise refuse("validator", f"a did:pkh:eip155:{self.cfg.chain_id}:0x... DID", pay.validator)
            raise refuse("validator", f"a DID on chain {self.cfg.chain_id}", pay.validator)
        return validator

    def terms_for(self, job: str, env: AnyEnvelope, price: str, quote_expires_at: int) -> FundingTerms:
        """The escrow terms a quote of ``price`` for ``job`` asks to be funded."""
        validator = self.check_payment_terms(env)
        # The deadline covers funding, every attempt the retry budget allows, and validation + release.
        deadline = (
            quote_expires_at
            + self.cfg.funding_timeout_seconds
            + (self._retry_budget + 1) * env.limits.timeout_seconds
            + self.cfg.settlement_window_seconds
        )
        return FundingTerms(
            chain_id=self.cfg.chain_id,
            escrow=to_checksum_address(self.cfg.escrow),
            token=to_checksum_address(self.cfg.token),
            token_name=self.cfg.token_name,
            job_id=escrow_job_id(self.node_did, job),
            payer=to_checksum_address(env.payment.payer),
            provider=self.provider,
            validator=validator,
            amount=usdc_units(price),
            deadline=deadline,
        )

    @staticmethod
    def terms_of(job: JobRecord) -> FundingTerms | None:
        """The terms in the job's current quote (signed by this node and kept in the journal)."""
        if job.quote_jwt is None:
            return None
        _, claims, _, _ = decode_unverified(job.quote_jwt)
        doc = (claims.get("quote") or {}).get("funding_terms")
        return None if doc is None else FundingTerms.from_json(doc)

    async def check_funding(self, terms: FundingTerms, doc: Any, *, iss: str) -> Authorization | GrantFunding:
        """A job's ``funding``: the payer's EIP-3009 authorization, or a grant's agent's signed spend
        (:func:`~payments.grant_terms.check_grant_funding`; ``iss`` must be the grant's agent)."""
        if is_grant_funding(doc):
            return await check_grant_funding(self.cfg, self.chain, terms, doc, iss=iss, now=self._now())
        return await self.check_authorization(terms, doc)

    async def check_authorization(self, terms: FundingTerms, doc: Any) -> Authorization:
        """A payer's EIP-3009 authorization, checked locally and, if the chain answers, in simulation."""
        auth = Authorization.from_json(doc)
        now = int(self._now())
        if auth.payer != terms.payer:
            raise FundingError(
                "authorization_payer_mismatch",
                f"the authorization is from {auth.payer}, the envelope's payer is {terms.payer}",
                details={"from": auth.payer, "payer": terms.payer},
            )
        if auth.valid_before < now + AUTHORIZATION_MARGIN_SECONDS or auth.valid_after > now:
            raise FundingError(
                "authorization_not_valid_now",
                f"the authorization must be valid now and for {AUTHORIZATION_MARGIN_SECONDS}s more",
                details={"valid_after": auth.valid_after, "valid_before": auth.valid_before, "now": now},
            )
        signer = authorization_signer(terms, auth)
        if signer != terms.payer:
            raise FundingError(
                "authorization_signature_invalid",
                "the authorization is not signed by the payer for these terms (amount, escrow job, nonce)",
                details={"recovered": signer, "payer": terms.payer, "terms": terms.to_json()},
            )
        try:
            await self.chain.simulate(fund_call(self.chain, terms, auth), domain="funding")
        except ChainError as exc:
            if exc.code != "chain_unavailable":
                raise
            log.warning("could not simulate a funding authorization (chain down); it is checked before use")
        except HearthError as exc:
            if not is_reverted(exc, "JobExists"):  # already funded (by this authorization or otherwise)
                raise FundingError(
                    "authorization_rejected",
                    f"the escrow would refuse this funding: {exc.message}",
                    details=exc.details,
                ) from None
        return auth

    def open_payment(
        self, job: JobRecord, terms: FundingTerms, auth: Authorization | GrantFunding | None
    ) -> PaymentRecord:
        """Record ``job``'s terms (and authorization or grant spend) so the loop watches its funding;
        idempotent."""
        record = self.journal.open_payment(
            job.id,
            escrow_job_id=hex32(terms.job_id),
            terms=terms.to_json(),
            wait_until=self._now() + self.cfg.funding_timeout_seconds,
            authorization=None if auth is None else auth.to_json(),
        )
        self._wake()
        return record


__all__ = ["ACTOR", "AUTHORIZATION_MARGIN_SECONDS", "AnyEnvelope", "PaymentTerms", "fund_call"]
