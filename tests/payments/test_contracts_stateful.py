"""HearthEscrow under random sequences of fund/release/refund/wait (Hypothesis state machine on anvil).

After every step the escrow must hold exactly the sum of its open jobs, every provider must hold exactly
what its one release paid (so no job is paid twice), and the payers exactly what they did not spend.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
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

DEADLINE_SECONDS = 1000
MAX_EXAMPLES = 8
STEPS_PER_EXAMPLE = 14


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


def test_escrow_conserves_funds_and_pays_each_job_once(chain: Chain) -> None:
    usdc = chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)

    class EscrowMachine(RuleBasedStateMachine):
        jobs = Bundle("jobs")

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
            self.minted = dict.fromkeys(self.payer_start, 0)
            self.all_jobs: list[_Job] = []

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
            call = self.escrow.functions.release(job.job_id, amount, job.job_id, signature)
            if job.settled:
                with reverts("JobNotOpen(bytes32)"):
                    call.transact({"from": chain.deployer})
                return
            chain.transact(call, chain.deployer)
            job.settled, job.paid = True, amount

        @rule(job=jobs, with_failing_receipt=st.booleans())
        def refund(self, job: _Job, with_failing_receipt: bool) -> None:
            signature = self._receipt(job, passed=False, amount=0) if with_failing_receipt else b""
            call = self.escrow.functions.refund(job.job_id, job.job_id, signature)
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

        @rule(seconds=st.sampled_from([1, DEADLINE_SECONDS // 2, DEADLINE_SECONDS + 1]))
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
