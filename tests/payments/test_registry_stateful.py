"""HearthRegistry under random register/update/leave by a few wallets (Hypothesis state machine on anvil).

After every step, paging through ``providers(start, limit)`` with a small limit must list exactly the
model's registered wallets, each with the DID and endpoint it last registered, each once; ``providerCount``
and every wallet's own record must agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from web3.contract import Contract

from tests.payments.contracts.chain import Chain, anvil, events, reverts

MAX_EXAMPLES = 10
STEPS_PER_EXAMPLE = 20
WALLETS = 4
PAGE_LIMITS = (1, 2, 3)
# A few values each, so updates to the same values (no-ops) and shared DIDs both happen.
DIDS = st.sampled_from(["did:key:z6MkA", "did:key:z6MkB", "did:pkh:eip155:31337:0x" + "ab" * 20])
ENDPOINTS = st.sampled_from(["https://a.example", "http://10.0.0.2:8787", "https://b.example/" + "p" * 40])


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


def test_paging_lists_exactly_the_registered_providers(chain: Chain) -> None:
    wallets = chain.accounts[1 : 1 + WALLETS]

    class RegistryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.registry: Contract = chain.deploy("HearthRegistry")  # a fresh one per example
            self.model: dict[str, tuple[str, str]] = {}

        @rule(wallet=st.sampled_from(wallets), did=DIDS, endpoint=ENDPOINTS)
        def register(self, wallet: str, did: str, endpoint: str) -> None:
            receipt = chain.transact(self.registry.functions.register(did, endpoint), wallet)
            emitted = {"wallet": wallet, "did": did, "endpoint": endpoint}
            before = self.model.get(wallet)
            if before is None:
                assert events(self.registry, "Registered", receipt) == [emitted]
            elif before == (did, endpoint):
                assert receipt["logs"] == []
            else:
                assert events(self.registry, "Updated", receipt) == [emitted]
            self.model[wallet] = (did, endpoint)

        @rule(wallet=st.sampled_from(wallets))
        def leave(self, wallet: str) -> None:
            if wallet not in self.model:
                with reverts("NotRegistered(address)"):
                    self.registry.functions.leave().transact({"from": wallet})
                return
            receipt = chain.transact(self.registry.functions.leave(), wallet)
            did, endpoint = self.model.pop(wallet)
            assert events(self.registry, "Left", receipt) == [
                {"wallet": wallet, "did": did, "endpoint": endpoint}
            ]

        @invariant()
        def paging_matches_the_model(self) -> None:
            for limit in PAGE_LIMITS:
                listed: list[tuple[str, str, str]] = []
                while True:
                    page = self.registry.functions.providers(len(listed), limit).call()
                    assert len(page[0]) <= limit
                    if not page[0]:
                        break
                    listed.extend(zip(*page, strict=True))
                assert len(listed) == len(self.model)
                assert {w: (d, e) for w, d, e in listed} == self.model
            assert self.registry.functions.providerCount().call() == len(self.model)
            for wallet in wallets:
                registered, did, endpoint, _, _ = self.registry.functions.provider(wallet).call()
                assert (registered, did, endpoint) == (
                    wallet in self.model,
                    *self.model.get(wallet, ("", "")),
                )

    run_state_machine_as_test(
        RegistryMachine,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
