"""HearthEscrow and TestUSDC on a real local chain (anvil): every settlement path and the attacks on it.

The contracts are the committed build in ``payments/contracts/artifacts``; one test recompiles them with the
pinned solc-js and checks the committed artifacts match byte for byte. Receipts and authorizations are
signed in Python with eth-account, as validators and payers will sign them. TestUSDC's own interface is
checked in ``test_test_usdc.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.contract import Contract

from core.errors import ConfigError
from payments.devnet import TOKEN_NAME, USDC
from payments.escrow_build import (
    ARTIFACTS_DIR,
    authorization_nonce,
    load_artifact,
    receipt_typed_data,
    terms_hash,
)
from tests.payments.contracts.chain import (
    CHAIN_ID,
    TEST_SOURCES,
    Chain,
    anvil,
    compile_contracts,
    events,
    new_account,
    reverts,
    sign_funding_authorization,
    sign_receipt,
)

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_SECONDS = 3600
# Upper bounds that catch a gas regression without pinning exact figures to one compiler release.
MAX_GAS = {"fund": 75_000, "fundWithAuthorization": 110_000, "release": 75_000, "refund": 65_000}


@pytest.fixture(scope="module")
def fresh_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The production and test-only contracts compiled now, into a temporary build folder."""
    out = tmp_path_factory.mktemp("build")
    compile_contracts(out, ROOT / "payments" / "contracts", TEST_SOURCES)
    return out


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


@pytest.fixture(scope="module")
def usdc(chain: Chain) -> Contract:
    return chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)


@pytest.fixture(scope="module")
def escrow(chain: Chain, usdc: Contract) -> Contract:
    return chain.deploy("HearthEscrow", usdc.address)


@dataclass
class Job:
    """One job's terms and the parties to it."""

    job_id: bytes
    payer: str
    provider: str
    validator: LocalAccount
    amount: int
    deadline: int

    @property
    def terms(self) -> tuple[bytes, str, str, int, int]:
        return (self.job_id, self.provider, self.validator.address, self.amount, self.deadline)

    @property
    def entry(self) -> tuple[str, str, str, int, int]:
        """The terms ``release`` and ``refund`` take back (the escrow keeps only their hash)."""
        return (self.payer, self.provider, self.validator.address, self.amount, self.deadline)


def _new_job(chain: Chain, amount: int = 5 * USDC, payer: str | None = None) -> Job:
    return Job(
        job_id=secrets.token_bytes(32),
        payer=payer or chain.accounts[1],
        provider=new_account().address,
        validator=new_account(),
        amount=amount,
        deadline=chain.now() + DEADLINE_SECONDS,
    )


def _fund(chain: Chain, usdc: Contract, escrow: Contract, job: Job) -> int:
    """Mints, approves and funds ``job`` from its payer; returns the gas ``fund`` used."""
    chain.transact(usdc.functions.mint(job.payer, job.amount), chain.deployer)
    chain.transact(usdc.functions.approve(escrow.address, job.amount), job.payer)
    return int(chain.transact(escrow.functions.fund(*job.terms), job.payer)["gasUsed"])


def _receipt(escrow: Contract, job: Job, *, passed: bool = True, amount: int | None = None) -> bytes:
    return sign_receipt(
        job.validator,
        escrow=escrow.address,
        job_id=job.job_id,
        result_digest=_digest(job),
        passed=passed,
        amount=(job.amount if passed else 0) if amount is None else amount,
        provider=job.provider,
    )


def _digest(job: Job) -> bytes:
    return job.job_id[::-1]  # any 32 bytes that belong to this job


def _status(escrow: Contract, job: Job) -> int:
    return int(escrow.functions.jobState(job.job_id).call()[0])


OPEN, RELEASED, REFUNDED = 1, 2, 3


def _hash_typed_data(data: dict[str, Any]) -> bytes:
    """The EIP-712 digest eth-account signs for ``data`` (0x19 0x01 || domain separator || struct hash)."""
    message = encode_typed_data(full_message=data)
    return keccak(b"\x19" + message.version + message.header + message.body)


# --- build -------------------------------------------------------------------------------------------


def test_committed_artifacts_match_a_fresh_compile(fresh_artifacts: Path) -> None:
    for name in ("HearthEscrow", "TestUSDC"):
        committed = (ARTIFACTS_DIR / f"{name}.json").read_bytes()
        assert (fresh_artifacts / f"{name}.json").read_bytes() == committed, (
            f"{name}.json is stale: recompile"
        )


def test_artifacts_carry_no_absolute_paths_and_a_pinned_compiler() -> None:
    for name in ("HearthEscrow", "TestUSDC"):
        text = (ARTIFACTS_DIR / f"{name}.json").read_text()
        assert str(ROOT) not in text and "/home/" not in text
        art = load_artifact(name)
        assert art.compiler_version.startswith("0.8.28+commit.")
        assert art.bytecode.startswith("0x") and len(art.deployed_bytecode) > 1000


# --- happy paths -------------------------------------------------------------------------------------


def test_fund_then_release_pays_provider_and_refunds_remainder(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    assert escrow.functions.jobState(job.job_id).call() == [OPEN, terms_hash(*job.entry)]
    assert bytes(escrow.functions.termsHash(*job.entry).call()) == terms_hash(*job.entry)
    payer_before = usdc.functions.balanceOf(job.payer).call()
    paid = 3 * USDC
    receipt = chain.transact(
        escrow.functions.release(
            job.job_id, job.entry, paid, _digest(job), _receipt(escrow, job, amount=paid)
        ),
        chain.accounts[5],  # anyone may submit: the receipt decides who is paid
    )
    assert usdc.functions.balanceOf(job.provider).call() == paid
    assert usdc.functions.balanceOf(job.payer).call() == payer_before + job.amount - paid
    assert _status(escrow, job) == RELEASED
    (event,) = events(escrow, "Released", receipt)
    assert event["paid"] == paid and event["refunded"] == job.amount - paid


def test_fund_with_authorization_needs_no_gas_from_the_payer(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    payer = new_account()  # holds no ether at all
    job = _new_job(chain, payer=payer.address)
    chain.transact(usdc.functions.mint(payer.address, job.amount), chain.deployer)
    now = chain.now()
    v, r, s = sign_funding_authorization(
        payer, token=usdc.address, escrow=escrow.address, job_id=job.job_id, provider=job.provider,
        validator=job.validator.address, amount=job.amount, deadline=job.deadline,
        valid_after=now - 1, valid_before=now + 600,
    )  # fmt: skip
    receipt = chain.transact(
        escrow.functions.fundWithAuthorization(*job.terms, payer.address, now - 1, now + 600, v, r, s),
        chain.accounts[2],  # a relayer (the provider, say) pays the gas
    )
    (event,) = events(escrow, "Funded", receipt)
    assert event["payer"] == payer.address and event["amount"] == job.amount
    assert usdc.functions.balanceOf(payer.address).call() == 0
    assert chain.w3.eth.get_balance(payer.address) == 0
    nonce = escrow.functions.authorizationNonce(*job.terms).call()
    assert usdc.functions.authorizationState(payer.address, nonce).call() is True

    chain.transact(
        escrow.functions.release(job.job_id, job.entry, job.amount, _digest(job), _receipt(escrow, job)),
        chain.accounts[2],
    )
    assert usdc.functions.balanceOf(job.provider).call() == job.amount


def test_refund_after_deadline_by_anyone(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    with reverts("DeadlineNotReached(uint64)"):
        escrow.functions.refund(job.job_id, job.entry, bytes(32), b"").transact({"from": chain.accounts[6]})
    before = usdc.functions.balanceOf(job.payer).call()
    chain.advance(DEADLINE_SECONDS + 1)
    receipt = chain.transact(
        escrow.functions.refund(job.job_id, job.entry, bytes(32), b""), chain.accounts[6]
    )
    assert usdc.functions.balanceOf(job.payer).call() == before + job.amount
    assert _status(escrow, job) == REFUNDED
    (event,) = events(escrow, "Refunded", receipt)
    assert event["amount"] == job.amount


def test_refund_before_deadline_on_a_failing_receipt(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    before = usdc.functions.balanceOf(job.payer).call()
    failing = _receipt(escrow, job, passed=False)
    with reverts("InvalidReceipt(address)"):  # a failing receipt never releases
        escrow.functions.release(job.job_id, job.entry, 0, _digest(job), failing).transact(
            {"from": job.payer}
        )
    with reverts("InvalidReceipt(address)"):  # a passing receipt never refunds early
        escrow.functions.refund(job.job_id, job.entry, _digest(job), _receipt(escrow, job)).transact(
            {"from": job.payer}
        )
    chain.transact(escrow.functions.refund(job.job_id, job.entry, _digest(job), failing), job.payer)
    assert usdc.functions.balanceOf(job.payer).call() == before + job.amount
    assert usdc.functions.balanceOf(job.provider).call() == 0


def test_gas_figures(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    """Gas of the settlement calls (printed with ``-s``); bounded so a regression fails the test. Every
    recipient already holds USDC (a first balance costs the token a fresh slot, 17,100 gas more, whoever
    sends it), as do the escrow and the payers funding it."""
    gas: dict[str, int] = {}

    def holding(job: Job) -> Job:
        chain.transact(usdc.functions.mint(job.provider, 1), chain.deployer)
        chain.transact(usdc.functions.mint(job.payer, 1), chain.deployer)
        return job

    def release(job: Job, paid: int) -> int:
        call = escrow.functions.release(
            job.job_id, job.entry, paid, _digest(job), _receipt(escrow, job, amount=paid)
        )
        return int(chain.transact(call, chain.accounts[5])["gasUsed"])

    _fund(chain, usdc, escrow, _new_job(chain))  # the escrow's own balance is no longer fresh
    job = holding(_new_job(chain))
    gas["fund"] = _fund(chain, usdc, escrow, job)
    gas["release (remainder)"] = release(job, 4 * USDC)
    job = holding(_new_job(chain))
    _fund(chain, usdc, escrow, job)
    gas["release (full)"] = release(job, job.amount)

    payer = new_account()
    job = holding(_new_job(chain, payer=payer.address))
    chain.transact(usdc.functions.mint(payer.address, job.amount), chain.deployer)
    now = chain.now()
    v, r, s = sign_funding_authorization(
        payer, token=usdc.address, escrow=escrow.address, job_id=job.job_id, provider=job.provider,
        validator=job.validator.address, amount=job.amount, deadline=job.deadline,
        valid_after=0, valid_before=now + 600,
    )  # fmt: skip
    call = escrow.functions.fundWithAuthorization(*job.terms, payer.address, 0, now + 600, v, r, s)
    gas["fundWithAuthorization"] = int(chain.transact(call, chain.deployer)["gasUsed"])
    failing = _receipt(escrow, job, passed=False)
    refund = escrow.functions.refund(job.job_id, job.entry, _digest(job), failing)
    gas["refund"] = int(chain.transact(refund, chain.deployer)["gasUsed"])
    print("\nHearthEscrow gas used:", ", ".join(f"{k}={v}" for k, v in gas.items()))
    for name, used in gas.items():
        assert 21_000 < used <= MAX_GAS[name.split(" ")[0]], f"{name} used {used} gas"


# --- attacks -----------------------------------------------------------------------------------------


def test_a_job_settles_once(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    signature = _receipt(escrow, job)
    chain.transact(
        escrow.functions.release(job.job_id, job.entry, job.amount, _digest(job), signature), job.payer
    )
    with reverts("JobNotOpen(bytes32)"):  # double release
        escrow.functions.release(job.job_id, job.entry, job.amount, _digest(job), signature).transact(
            {"from": job.payer}
        )
    chain.advance(DEADLINE_SECONDS + 1)
    with reverts("JobNotOpen(bytes32)"):  # refund after release
        escrow.functions.refund(job.job_id, job.entry, bytes(32), b"").transact({"from": job.payer})
    with reverts("JobExists(bytes32)"):  # a settled id cannot be funded afresh
        _fund(
            chain, usdc, escrow, Job(job.job_id, job.payer, job.provider, job.validator, 1, chain.now() + 60)
        )
    assert usdc.functions.balanceOf(job.provider).call() == job.amount


def test_release_after_refund(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    chain.transact(
        escrow.functions.refund(job.job_id, job.entry, _digest(job), _receipt(escrow, job, passed=False)),
        job.payer,
    )
    with reverts("JobNotOpen(bytes32)"):
        escrow.functions.release(
            job.job_id, job.entry, job.amount, _digest(job), _receipt(escrow, job)
        ).transact({"from": job.payer})
    assert usdc.functions.balanceOf(job.provider).call() == 0


def test_settling_needs_the_terms_the_job_was_funded_with(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    payer, provider, validator, amount, deadline = job.entry
    other = new_account().address
    others = {
        "another payer": (other, provider, validator, amount, deadline),
        "another provider": (payer, other, validator, amount, deadline),
        "another validator": (payer, provider, other, amount, deadline),
        "a larger amount": (payer, provider, validator, amount + 1, deadline),
        "an earlier deadline": (payer, provider, validator, amount, deadline - DEADLINE_SECONDS),
    }
    signature = _receipt(escrow, job)
    failing = _receipt(escrow, job, passed=False)
    for why, terms in others.items():
        assert bytes(escrow.functions.termsHash(*terms).call()) != terms_hash(*job.entry), why
        with reverts("TermsMismatch(bytes32)"):
            escrow.functions.release(job.job_id, terms, job.amount, _digest(job), signature).transact(
                {"from": job.payer}
            )
            pytest.fail(f"{why} released the job")
        with reverts("TermsMismatch(bytes32)"):
            escrow.functions.refund(job.job_id, terms, _digest(job), failing).transact({"from": job.payer})
            pytest.fail(f"{why} refunded the job")
    assert _status(escrow, job) == OPEN
    chain.advance(DEADLINE_SECONDS + 1)  # past the real deadline: still only against the real terms
    with reverts("TermsMismatch(bytes32)"):
        escrow.functions.refund(job.job_id, others["another payer"], bytes(32), b"").transact({"from": other})
    chain.transact(escrow.functions.refund(job.job_id, job.entry, bytes(32), b""), chain.accounts[6])
    assert escrow.functions.jobState(job.job_id).call() == [REFUNDED, terms_hash(*job.entry)]


def test_unfunded_job_cannot_settle(chain: Chain, escrow: Contract) -> None:
    job = _new_job(chain)
    assert escrow.functions.jobState(job.job_id).call() == [0, bytes(32)]
    with reverts("JobNotOpen(bytes32)"):
        escrow.functions.release(
            job.job_id, job.entry, 1, _digest(job), _receipt(escrow, job, amount=1)
        ).transact({"from": job.payer})


def test_receipts_that_must_not_release(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    job = _new_job(chain)
    _fund(chain, usdc, escrow, job)
    other_escrow = chain.deploy("HearthEscrow", usdc.address)

    def forge(
        validator: LocalAccount = job.validator,
        escrow: str = escrow.address,
        provider: str = job.provider,
        chain_id: int = CHAIN_ID,
    ) -> bytes:
        return sign_receipt(
            validator, escrow=escrow, job_id=job.job_id, result_digest=_digest(job), passed=True,
            amount=job.amount, provider=provider, chain_id=chain_id,
        )  # fmt: skip

    forged = {
        "another chain id": forge(chain_id=1),
        "another escrow": forge(escrow=other_escrow.address),
        "the wrong validator": forge(validator=new_account()),
        "another provider": forge(provider=job.payer),
        "a garbage signature": b"\x01" * 65,
    }
    for why, signature in forged.items():
        with reverts("InvalidReceipt(address)"):
            escrow.functions.release(job.job_id, job.entry, job.amount, _digest(job), signature).transact(
                {"from": job.payer}
            )
            pytest.fail(f"a receipt for {why} released the job")
    with reverts("InvalidReceipt(address)"):  # a receipt for a smaller amount does not cover a larger one
        small = _receipt(escrow, job, amount=1)
        escrow.functions.release(job.job_id, job.entry, 2, _digest(job), small).transact({"from": job.payer})
    above = _receipt(escrow, job, amount=job.amount + 1)
    with reverts("AmountExceedsFunded(uint256,uint256)"):
        escrow.functions.release(job.job_id, job.entry, job.amount + 1, _digest(job), above).transact(
            {"from": job.payer}
        )
    assert _status(escrow, job) == OPEN
    assert usdc.functions.balanceOf(escrow.address).call() >= job.amount


def test_bad_terms_are_refused(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    for job in (
        _new_job(chain, amount=0),
        Job(
            secrets.token_bytes(32),
            chain.accounts[1],
            "0x" + "00" * 20,
            new_account(),
            USDC,
            chain.now() + 60,
        ),
        Job(
            secrets.token_bytes(32),
            chain.accounts[1],
            new_account().address,
            new_account(),
            USDC,
            chain.now(),
        ),
    ):
        with reverts("InvalidTerms()"):
            escrow.functions.fund(*job.terms).transact({"from": job.payer})


def test_authorizations_bound_to_their_terms_and_window(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    payer = new_account()
    job = _new_job(chain, payer=payer.address)
    chain.transact(usdc.functions.mint(payer.address, 2 * job.amount), chain.deployer)
    now = chain.now()

    def authorize(valid_after: int, valid_before: int) -> tuple[int, bytes, bytes]:
        return sign_funding_authorization(
            payer, token=usdc.address, escrow=escrow.address, job_id=job.job_id, provider=job.provider,
            validator=job.validator.address, amount=job.amount, deadline=job.deadline,
            valid_after=valid_after, valid_before=valid_before,
        )  # fmt: skip

    expired = authorize(0, now - 1)
    with reverts("AuthorizationNotValid(uint256,uint256)"):
        escrow.functions.fundWithAuthorization(*job.terms, payer.address, 0, now - 1, *expired).transact(
            {"from": chain.deployer}
        )
    not_yet = authorize(now + 500, now + 600)
    with reverts("AuthorizationNotValid(uint256,uint256)"):
        escrow.functions.fundWithAuthorization(
            *job.terms, payer.address, now + 500, now + 600, *not_yet
        ).transact({"from": chain.deployer})

    good = authorize(0, now + 600)
    other_terms = {
        "another job": (secrets.token_bytes(32), *job.terms[1:]),
        "another provider": (job.job_id, chain.accounts[7], *job.terms[2:]),
        "another validator": (job.job_id, job.provider, chain.accounts[7], job.amount, job.deadline),
        "a larger amount": (job.job_id, job.provider, job.validator.address, 2 * job.amount, job.deadline),
        "a later deadline": (*job.terms[:4], job.deadline + 1),
    }
    for why, terms in other_terms.items():
        with reverts("InvalidSignature()"):
            escrow.functions.fundWithAuthorization(*terms, payer.address, 0, now + 600, *good).transact(
                {"from": chain.deployer}
            )
            pytest.fail(f"the authorization funded {why}")
    chain.transact(
        escrow.functions.fundWithAuthorization(*job.terms, payer.address, 0, now + 600, *good), chain.deployer
    )
    with reverts("JobExists(bytes32)"):  # replaying it exactly
        escrow.functions.fundWithAuthorization(*job.terms, payer.address, 0, now + 600, *good).transact(
            {"from": chain.deployer}
        )
    assert usdc.functions.balanceOf(payer.address).call() == job.amount


def test_reentrant_token_is_stopped_by_the_guard(chain: Chain, fresh_artifacts: Path, usdc: Contract) -> None:
    evil = chain.deploy("ReentrantToken", artifacts_dir=fresh_artifacts)
    escrow = chain.deploy("HearthEscrow", evil.address)
    jobs = [_new_job(chain), _new_job(chain)]
    for job in jobs:
        chain.transact(evil.functions.mint(job.payer, job.amount), chain.deployer)
        chain.transact(evil.functions.approve(escrow.address, job.amount), job.payer)
        chain.transact(escrow.functions.fund(*job.terms), job.payer)
    a, b = jobs
    release_a = escrow.functions.release(a.job_id, a.entry, a.amount, _digest(a), _receipt(escrow, a))
    release_b = escrow.functions.release(b.job_id, b.entry, b.amount, _digest(b), _receipt(escrow, b))
    refund_b = escrow.functions.refund(b.job_id, b.entry, _digest(b), _receipt(escrow, b, passed=False))
    for reentry in (release_a, release_b, refund_b):
        # The token calls back into the escrow in the middle of paying job a's provider.
        chain.transact(evil.functions.arm(escrow.address, reentry._encode_transaction_data()), chain.deployer)
        with reverts("ReentrancyGuardReentrantCall()"):
            release_a.transact({"from": a.payer})
        chain.transact(evil.functions.arm("0x" + "00" * 20, b""), chain.deployer)
    assert evil.functions.balanceOf(escrow.address).call() == a.amount + b.amount
    chain.transact(release_a, a.payer)
    chain.transact(release_b, b.payer)
    assert evil.functions.balanceOf(a.provider).call() == a.amount
    assert evil.functions.balanceOf(b.provider).call() == b.amount
    assert evil.functions.balanceOf(escrow.address).call() == 0


# --- payments.escrow_build ---------------------------------------------------------------------------


def test_python_typed_data_hashes_as_the_contract_does(chain: Chain, escrow: Contract) -> None:
    job = _new_job(chain)
    for passed, amount in ((True, job.amount), (False, 0)):
        data = receipt_typed_data(
            chain_id=CHAIN_ID, escrow=escrow.address, job_id=job.job_id, result_digest=_digest(job),
            passed=passed, amount=amount, provider=job.provider,
        )  # fmt: skip
        on_chain = escrow.functions.receiptDigest(
            job.job_id, _digest(job), passed, amount, job.provider
        ).call()
        assert bytes(_hash_typed_data(data)) == bytes(on_chain)
    assert bytes(escrow.functions.authorizationNonce(*job.terms).call()) == authorization_nonce(*job.terms)


def test_a_missing_artifact_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "Broken.json").write_text("{not json")
    for name in ("Absent", "Broken"):
        with pytest.raises(ConfigError) as info:
            load_artifact(name, tmp_path)
        assert info.value.code == "contract_artifact_unreadable" and info.value.details["contract"] == name
