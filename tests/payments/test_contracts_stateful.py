"""HearthEscrow under random sequences of fund/release/refund/wait and of spending grants opened, spent
from, revoked (Hypothesis state machine on anvil).

After every step the escrow must hold exactly the sum of its open jobs, every provider must hold exactly
what its one release paid (so no job is paid twice), and the payers (grant owners included) exactly what
they did not spend. Every spend from a grant succeeds exactly when a model of its caps, expiry and
revocation says it may; what a grant spent in each period never exceeds its period cap, no spend exceeds
its per-job cap, and the contract's view of the current period agrees with the model.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from web3.contract import Contract

from payments.devnet import TOKEN_NAME, USDC
from tests.payments.contracts.chain import (
    Chain,
    anvil,
    new_account,
    reverts,
    sign_funding_authorization,
    sign_receipt,
)
from tests.payments.contracts.grants import sign_spend

DEADLINE_SECONDS = 1000
MAX_EXAMPLES = 8
STEPS_PER_EXAMPLE = 24
PER_JOB_MAX = st.integers(1, 20 * USDC)
PERIOD_MAX = st.integers(1, 40 * USDC)
PERIOD_SECONDS = st.sampled_from([50, 700, 5000])


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


@dataclass
class _Job:
    job_id: bytes
    payer: str
    provider: str
    validator: LocalAccount
    amount: int
    deadline: int
    paid: int = 0  # what the provider received
    settled: bool = False

    @property
    def entry(self) -> tuple[str, str, str, int, int]:
        """The terms ``release`` and ``refund`` take back."""
        return (self.payer, self.provider, self.validator.address, self.amount, self.deadline)


@dataclass
class _Grant:
    grant_id: int
    agent: LocalAccount
    per_job_max: int
    period_max: int
    period_seconds: int
    expiry: int
    opened_at: int
    revoked: bool = False
    spends: list[tuple[int, int]] = field(default_factory=list)  # (period index, amount) of each spend

    def period(self, timestamp: int) -> int:
        return (timestamp - self.opened_at) // self.period_seconds

    def spent(self, period: int) -> int:
        return sum(amount for p, amount in self.spends if p == period)


def test_escrow_conserves_funds_and_pays_each_job_once(chain: Chain) -> None:
    usdc = chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)

    class EscrowMachine(RuleBasedStateMachine):
        jobs = Bundle("jobs")
        grants = Bundle("grants")

        def __init__(self) -> None:
            super().__init__()
            # A fresh escrow per example: its balance and jobs belong to this example alone.
            self.escrow: Contract = chain.deploy("HearthEscrow", usdc.address)
            self.approving_payer = chain.accounts[1]
            self.signing_payer = new_account()  # funds by authorization only; never holds ether
            self.payer_start = {
                self.approving_payer: usdc.functions.balanceOf(self.approving_payer).call(),
                self.signing_payer.address: 0,
            }
            self.grant_owner = chain.accounts[
                3
            ]  # pays every grant-funded job, through an unlimited allowance
            self.payer_start[self.grant_owner] = usdc.functions.balanceOf(self.grant_owner).call()
            chain.transact(usdc.functions.approve(self.escrow.address, 2**256 - 1), self.grant_owner)
            self.minted = dict.fromkeys(self.payer_start, 0)
            self.all_jobs: list[_Job] = []
            self.all_grants: list[_Grant] = []

        @rule(target=jobs, amount=st.integers(1, 50 * USDC), by_authorization=st.booleans())
        def fund(self, amount: int, by_authorization: bool) -> _Job:
            payer = self.signing_payer.address if by_authorization else self.approving_payer
            job = _Job(
                secrets.token_bytes(32), payer, new_account().address, new_account(), amount,
                chain.now() + DEADLINE_SECONDS,
            )  # fmt: skip
            chain.transact(usdc.functions.mint(payer, amount), chain.deployer)
            self.minted[payer] += amount
            terms = (job.job_id, job.provider, job.validator.address, amount, job.deadline)
            if by_authorization:
                v, r, s = sign_funding_authorization(
                    self.signing_payer, token=usdc.address, escrow=self.escrow.address, job_id=job.job_id,
                    provider=job.provider, validator=job.validator.address, amount=amount,
                    deadline=job.deadline, valid_after=0, valid_before=job.deadline,
                )  # fmt: skip
                call = self.escrow.functions.fundWithAuthorization(*terms, payer, 0, job.deadline, v, r, s)
                chain.transact(call, chain.deployer)
            else:
                chain.transact(usdc.functions.approve(self.escrow.address, amount), payer)
                chain.transact(self.escrow.functions.fund(*terms), payer)
            self.all_jobs.append(job)
            return job

        @rule(job=jobs, percent=st.integers(0, 100))
        def release(self, job: _Job, percent: int) -> None:
            amount = job.amount * percent // 100
            signature = self._receipt(job, passed=True, amount=amount)
            call = self.escrow.functions.release(job.job_id, job.entry, amount, job.job_id, signature)
            if job.settled:
                with reverts("JobNotOpen(bytes32)"):
                    call.transact({"from": chain.deployer})
                return
            chain.transact(call, chain.deployer)
            job.settled, job.paid = True, amount

        @rule(job=jobs, with_failing_receipt=st.booleans())
        def refund(self, job: _Job, with_failing_receipt: bool) -> None:
            signature = self._receipt(job, passed=False, amount=0) if with_failing_receipt else b""
            call = self.escrow.functions.refund(job.job_id, job.entry, job.job_id, signature)
            if job.settled:
                with reverts("JobNotOpen(bytes32)"):
                    call.transact({"from": chain.deployer})
                return
            if not with_failing_receipt and chain.now() <= job.deadline:
                with reverts("DeadlineNotReached(uint64)"):
                    call.transact({"from": chain.deployer})
                return
            chain.transact(call, chain.deployer)
            job.settled = True

        @rule(job=jobs, field=st.integers(0, 4), refund=st.booleans())
        def settle_with_other_terms(self, job: _Job, field: int, refund: bool) -> None:
            """Terms that differ in any one field settle nothing, with a valid receipt for the job."""
            terms: list[Any] = list(job.entry)
            terms[field] = new_account().address if field < 3 else terms[field] + 1
            signature = self._receipt(job, passed=not refund, amount=0 if refund else job.amount)
            if refund:
                call = self.escrow.functions.refund(job.job_id, tuple(terms), job.job_id, signature)
            else:
                call = self.escrow.functions.release(
                    job.job_id, tuple(terms), job.amount, job.job_id, signature
                )
            with reverts("JobNotOpen(bytes32)" if job.settled else "TermsMismatch(bytes32)"):
                call.transact({"from": chain.deployer})

        @initialize(
            target=grants, per_job_max=PER_JOB_MAX, period_max=PERIOD_MAX, period_seconds=PERIOD_SECONDS
        )
        def first_grant(self, per_job_max: int, period_max: int, period_seconds: int) -> _Grant:
            return self._open_grant(per_job_max, period_max, period_seconds, 1200)

        @rule(
            target=grants,
            per_job_max=PER_JOB_MAX,
            period_max=PERIOD_MAX,
            period_seconds=PERIOD_SECONDS,
            lifetime=st.sampled_from([60, 3000]),
        )
        def open_grant(self, per_job_max: int, period_max: int, period_seconds: int, lifetime: int) -> _Grant:
            return self._open_grant(per_job_max, period_max, period_seconds, lifetime)

        def _open_grant(
            self, per_job_max: int, period_max: int, period_seconds: int, lifetime: int
        ) -> _Grant:
            agent, expiry = new_account(), chain.now() + lifetime
            call = self.escrow.functions.openGrant(
                agent.address, per_job_max, period_max, period_seconds, expiry
            )
            receipt = chain.transact(call, self.grant_owner)
            (event,) = self.escrow.events.GrantOpened().process_receipt(receipt)
            grant = _Grant(
                event["args"]["grantId"], agent, per_job_max, period_max, period_seconds, expiry,
                chain.block_time(receipt),
            )  # fmt: skip
            self.all_grants.append(grant)
            return grant

        @rule(
            target=jobs,
            grant=grants,
            random_amount=st.integers(1, 25 * USDC),
        )
        def spend(self, grant: _Grant, random_amount: int) -> object:
            return self._spend(grant, "random", random_amount)

        @rule(target=jobs, grant=grants, how=st.sampled_from(["most", "one_over"]))
        def spend_at_the_edge(self, grant: _Grant, how: str) -> object:
            return self._spend(grant, how, 0)

        def _spend(self, grant: _Grant, how: str, random_amount: int) -> object:
            when = chain.now() + 1  # the block the spend goes into, so the caps' edges are known exactly
            period = grant.period(when)
            left = grant.period_max - grant.spent(period)
            most = min(grant.per_job_max, left)  # the largest spend the caps allow now
            amount = {"random": random_amount, "most": max(1, most), "one_over": most + 1}[how]
            job = _Job(
                secrets.token_bytes(32), self.grant_owner, new_account().address, new_account(), amount,
                when + DEADLINE_SECONDS,
            )  # fmt: skip
            chain.transact(usdc.functions.mint(self.grant_owner, amount), chain.deployer)
            self.minted[self.grant_owner] += amount
            terms = (job.job_id, job.provider, job.validator.address, amount, job.deadline)
            signature = sign_spend(
                grant.agent, escrow=self.escrow.address, grant_id=grant.grant_id, job_id=job.job_id,
                provider=job.provider, validator=job.validator.address, amount=amount, deadline=job.deadline,
            )  # fmt: skip
            chain.next_block_at(when)
            receipt = chain.send(
                self.escrow.functions.fundFromGrant(grant.grant_id, *terms, signature), chain.deployer
            )
            assert chain.block_time(receipt) == when
            allowed = (
                not grant.revoked and when < grant.expiry and amount <= grant.per_job_max and amount <= left
            )
            assert receipt["status"] == int(allowed), (
                f"spend of {amount} ({how}) from {grant}: {receipt['status']}"
            )
            if not allowed:
                return multiple()
            grant.spends.append((period, amount))
            self.all_jobs.append(job)
            return job

        @rule(grant=grants)
        def revoke(self, grant: _Grant) -> None:
            call = self.escrow.functions.revokeGrant(grant.grant_id)
            if grant.revoked:
                with reverts("GrantRevokedError(uint256)", grant.grant_id):
                    call.transact({"from": self.grant_owner})
                return
            chain.transact(call, self.grant_owner)
            grant.revoked = True

        @rule(seconds=st.sampled_from([1, 49, DEADLINE_SECONDS // 2, DEADLINE_SECONDS + 1]))
        def wait(self, seconds: int) -> None:
            chain.advance(seconds)

        @invariant()
        def funds_are_conserved(self) -> None:
            held = sum(j.amount for j in self.all_jobs if not j.settled)
            assert usdc.functions.balanceOf(self.escrow.address).call() == held
            for job in self.all_jobs:
                assert usdc.functions.balanceOf(job.provider).call() == job.paid
            for payer, start in self.payer_start.items():
                spent = sum(j.paid if j.settled else j.amount for j in self.all_jobs if j.payer == payer)
                assert usdc.functions.balanceOf(payer).call() == start + self.minted[payer] - spent

        @invariant()
        def grants_keep_to_their_caps(self) -> None:
            now = chain.now()
            for grant in self.all_grants:
                assert all(amount <= grant.per_job_max for _, amount in grant.spends)
                for period in {p for p, _ in grant.spends}:
                    assert grant.spent(period) <= grant.period_max
                view = self.escrow.functions.grantOf(grant.grant_id).call()
                spent = grant.spent(grant.period(now))
                live = not grant.revoked and now < grant.expiry
                assert view[6:9] == [grant.revoked, spent, grant.period_max - spent if live else 0]

        def _receipt(self, job: _Job, *, passed: bool, amount: int) -> bytes:
            return sign_receipt(
                job.validator, escrow=self.escrow.address, job_id=job.job_id, result_digest=job.job_id,
                passed=passed, amount=amount, provider=job.provider,
            )  # fmt: skip

    run_state_machine_as_test(
        EscrowMachine,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
