"""HearthRegistry on a real local chain (anvil): listing, updating, leaving, paging, bounds, gas; and the
typed client (:mod:`payments.registry_chain`) reading it.

The contract is the committed build in ``payments/contracts/artifacts``; one test recompiles it with the
pinned solc-js and checks the committed artifact matches byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from web3 import AsyncHTTPProvider, AsyncWeb3, Web3
from web3.contract import Contract

from core.config import load_config
from core.errors import ChainError, ConfigError
from payments import devnet
from payments.escrow_build import ARTIFACTS_DIR, load_artifact
from payments.registry_chain import MAX_DID_BYTES, MAX_ENDPOINT_BYTES, MAX_PAGE, Listing, RegistryChain
from tests.conftest import free_port
from tests.payments.contracts.chain import Chain, anvil, compile_contracts, events, reverts

ROOT = Path(__file__).resolve().parents[2]
# Typical values: a did:key of an Ed25519 key (56 characters) and a short public URL.
DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
ENDPOINT = "https://node-1.example.org:8787"
MOVED = "https://node-1.example.org:9797"  # the same node on another port: an update of the same size
# Upper bounds that catch a gas regression without pinning exact figures to one compiler release.
MAX_GAS = {"register": 180_000, "update": 50_000, "leave": 65_000}


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


@pytest.fixture
def registry(chain: Chain) -> Contract:
    return chain.deploy("HearthRegistry")


def _record(registry: Contract, wallet: str) -> tuple[bool, str, str, int, int]:
    registered, did, endpoint, since, updated = registry.functions.provider(wallet).call()
    return bool(registered), str(did), str(endpoint), int(since), int(updated)


def _all(registry: Contract, limit: int) -> list[tuple[str, str, str]]:
    """Every listing, read page by page with ``limit``."""
    found: list[tuple[str, str, str]] = []
    while True:
        wallets, dids, endpoints = registry.functions.providers(len(found), limit).call()
        assert len(wallets) <= limit
        if not wallets:
            return found
        found.extend(zip(wallets, dids, endpoints, strict=True))


def test_committed_artifact_matches_a_fresh_compile(tmp_path: Path) -> None:
    compile_contracts(tmp_path, ROOT / "payments" / "contracts")
    committed = (ARTIFACTS_DIR / "HearthRegistry.json").read_bytes()
    assert (tmp_path / "HearthRegistry.json").read_bytes() == committed, "HearthRegistry.json is stale"
    art = load_artifact("HearthRegistry")
    assert art.compiler_version.startswith("0.8.28+commit.") and str(ROOT) not in committed.decode()


def test_register_update_leave_with_their_events(chain: Chain, registry: Contract) -> None:
    wallet = chain.accounts[1]
    receipt = chain.transact(registry.functions.register(DID, ENDPOINT), wallet)
    assert events(registry, "Registered", receipt) == [{"wallet": wallet, "did": DID, "endpoint": ENDPOINT}]
    assert events(registry, "Updated", receipt) == []
    since = chain.now()
    assert _record(registry, wallet) == (True, DID, ENDPOINT, since, since)
    assert registry.functions.providerCount().call() == 1

    chain.advance(100)
    moved = "https://node-1.example.net"
    receipt = chain.transact(registry.functions.register(DID, moved), wallet)
    assert events(registry, "Updated", receipt) == [{"wallet": wallet, "did": DID, "endpoint": moved}]
    assert events(registry, "Registered", receipt) == []
    updated = chain.now()
    assert updated > since
    assert _record(registry, wallet) == (True, DID, moved, since, updated)

    other_did = DID[:-1] + "X"
    receipt = chain.transact(registry.functions.register(other_did, moved), wallet)
    assert events(registry, "Updated", receipt) == [{"wallet": wallet, "did": other_did, "endpoint": moved}]

    # The same values again: nothing changes and nothing is emitted.
    chain.advance(100)
    before = _record(registry, wallet)
    receipt = chain.transact(registry.functions.register(other_did, moved), wallet)
    assert receipt["logs"] == []
    assert _record(registry, wallet) == before
    assert registry.functions.providerCount().call() == 1

    receipt = chain.transact(registry.functions.leave(), wallet)
    assert events(registry, "Left", receipt) == [{"wallet": wallet, "did": other_did, "endpoint": moved}]
    assert _record(registry, wallet) == (False, "", "", 0, 0)
    assert registry.functions.providerCount().call() == 0
    assert _all(registry, 2) == []


def test_leave_without_a_record_is_refused(chain: Chain, registry: Contract) -> None:
    wallet = chain.accounts[2]
    with reverts("NotRegistered(address)"):
        registry.functions.leave().transact({"from": wallet})
    chain.transact(registry.functions.register(DID, ENDPOINT), wallet)
    chain.transact(registry.functions.leave(), wallet)
    with reverts("NotRegistered(address)"):
        registry.functions.leave().transact({"from": wallet})


def test_register_again_after_leaving_is_a_new_registration(chain: Chain, registry: Contract) -> None:
    wallet = chain.accounts[3]
    chain.transact(registry.functions.register(DID, ENDPOINT), wallet)
    first = chain.now()
    chain.transact(registry.functions.leave(), wallet)
    chain.advance(50)
    receipt = chain.transact(registry.functions.register(DID, "http://10.0.0.7:8787"), wallet)
    assert events(registry, "Registered", receipt) == [
        {"wallet": wallet, "did": DID, "endpoint": "http://10.0.0.7:8787"}
    ]
    again = chain.now()
    assert again > first
    assert _record(registry, wallet) == (True, DID, "http://10.0.0.7:8787", again, again)
    assert _all(registry, 2) == [(wallet, DID, "http://10.0.0.7:8787")]


def test_two_wallets_naming_one_did_are_both_listed(chain: Chain, registry: Contract) -> None:
    a, b = chain.accounts[4], chain.accounts[5]
    chain.transact(registry.functions.register(DID, ENDPOINT), a)
    chain.transact(registry.functions.register(DID, "https://squatter.example"), b)
    assert registry.functions.providerCount().call() == 2
    assert sorted(_all(registry, MAX_PAGE)) == sorted(
        [(a, DID, ENDPOINT), (b, DID, "https://squatter.example")]
    )


def test_paging_across_leaves_lists_exactly_the_registered(chain: Chain, registry: Contract) -> None:
    wallets = chain.accounts[1:6]
    for n, wallet in enumerate(wallets):
        chain.transact(registry.functions.register(f"{DID}{n}", f"{ENDPOINT}/{n}"), wallet)
    chain.transact(registry.functions.leave(), wallets[1])  # a middle one: the last takes its place
    chain.transact(registry.functions.leave(), wallets[4])  # the last one of the original five
    expected = {(w, f"{DID}{n}", f"{ENDPOINT}/{n}") for n, w in enumerate(wallets) if n not in (1, 4)}
    listed = _all(registry, 2)
    assert len(listed) == 3 and set(listed) == expected
    assert registry.functions.providerCount().call() == 3
    # past the end: an empty page, not a revert
    assert registry.functions.providers(3, 2).call() == [[], [], []]
    assert registry.functions.providers(10**30, MAX_PAGE).call() == [[], [], []]
    with reverts("PageTooLarge(uint256,uint256)"):
        registry.functions.providers(0, MAX_PAGE + 1).call()


@pytest.mark.parametrize(
    "did, endpoint, error",
    [
        ("", ENDPOINT, "DidLength(uint256)"),
        ("d" * (MAX_DID_BYTES + 1), ENDPOINT, "DidLength(uint256)"),
        (DID, "", "EndpointLength(uint256)"),
        (DID, "h" * (MAX_ENDPOINT_BYTES + 1), "EndpointLength(uint256)"),
        ("é" * 129, ENDPOINT, "DidLength(uint256)"),  # 129 characters but 258 bytes
    ],
)
def test_out_of_bounds_values_are_refused(
    chain: Chain, registry: Contract, did: str, endpoint: str, error: str
) -> None:
    with reverts(error):
        registry.functions.register(did, endpoint).transact({"from": chain.accounts[6]})
    assert registry.functions.providerCount().call() == 0


def test_the_largest_values_are_accepted(chain: Chain, registry: Contract) -> None:
    did, endpoint = "d" * MAX_DID_BYTES, "h" * MAX_ENDPOINT_BYTES
    chain.transact(registry.functions.register(did, endpoint), chain.accounts[7])
    assert _record(registry, chain.accounts[7])[:3] == (True, did, endpoint)
    assert _all(registry, 1) == [(chain.accounts[7], did, endpoint)]


def test_gas_of_register_update_leave(chain: Chain, registry: Contract) -> None:
    a, b = chain.accounts[8], chain.accounts[9]
    chain.transact(registry.functions.register(DID, ENDPOINT), b)  # not the first listing: a typical one
    gas = {
        "register": chain.transact(registry.functions.register(DID, ENDPOINT), a)["gasUsed"],
        "update": chain.transact(registry.functions.register(DID, MOVED), a)["gasUsed"],
        "leave": chain.transact(registry.functions.leave(), a)["gasUsed"],
    }
    print(f"HearthRegistry gas (did {len(DID)} bytes, endpoint {len(ENDPOINT)} bytes): {gas}")
    for name, used in gas.items():
        assert 21_000 < used <= MAX_GAS[name], f"{name} used {used} gas"


# -- the client ------------------------------------------------------------------------------------------


@pytest.fixture
async def client(chain: Chain, registry: Contract) -> AsyncIterator[RegistryChain]:
    url = str(getattr(chain.w3.provider, "endpoint_uri", ""))
    w3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(url, exception_retry_configuration=None))
    yield RegistryChain(w3, registry.address, rpc_url=url)
    await w3.provider.disconnect()


async def test_client_reads_records_and_every_page(chain: Chain, client: RegistryChain) -> None:
    wallets = chain.accounts[1:6]
    assert await client.provider(wallets[0]) is None
    assert await client.listings(page_size=2) == (await client.w3.eth.block_number, [])
    for n, wallet in enumerate(wallets):
        await client.register(f"{DID}{n}", f"{ENDPOINT}/{n}").transact({"from": wallet})
    await client.leave().transact({"from": wallets[2]})

    record = await client.provider(wallets[0].lower())
    assert record is not None
    assert (record.wallet, record.did, record.endpoint) == (wallets[0], f"{DID}0", f"{ENDPOINT}/0")
    assert record.since == record.updated > 0
    assert not record.differs(f"{DID}0", f"{ENDPOINT}/0") and record.differs(f"{DID}0", ENDPOINT)
    assert await client.count() == 4
    block, listed = await client.listings(page_size=2)
    assert block == await client.w3.eth.block_number
    expected = {Listing(w, f"{DID}{n}", f"{ENDPOINT}/{n}") for n, w in enumerate(wallets) if n != 2}
    assert len(listed) == 4 and set(listed) == expected
    assert await client.page(4, 2) == []
    with pytest.raises(ValueError):
        await client.page(0, MAX_PAGE + 1)


def test_client_checks_the_bounds_before_building_a_call(client: RegistryChain) -> None:
    for did, endpoint in [("", ENDPOINT), ("d" * 257, ENDPOINT), (DID, ""), (DID, "h" * 2049)]:
        with pytest.raises(ValueError, match="the registry takes"):
            client.register(did, endpoint)
    client.register("d" * 256, "h" * 2048)  # the largest values build


async def test_client_reports_a_missing_contract_and_a_dead_rpc(chain: Chain, client: RegistryChain) -> None:
    nothing_there = RegistryChain(client.w3, chain.accounts[9], rpc_url=client.rpc_url)
    with pytest.raises(ConfigError) as info:
        await nothing_there.count()
    assert info.value.code == "invalid_config" and "market.registry" in info.value.message

    url = f"http://127.0.0.1:{free_port()}"
    dead = RegistryChain(
        AsyncWeb3(AsyncHTTPProvider(url, exception_retry_configuration=None)), chain.deployer
    )
    with pytest.raises(ChainError) as err:
        await dead.provider(chain.deployer)
    assert err.value.code == "chain_unavailable" and err.value.retryable
    await dead.w3.provider.disconnect()


# -- hearth devnet ---------------------------------------------------------------------------------------


def test_devnet_deploys_records_and_configures_the_registry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.toml").write_text('[market]\nendpoint = "https://node.example"  # kept\nregister = false\n')
    port = free_port()
    try:
        net = devnet.up(home, port=port)
        assert net.to_dict()["registry"] == net.registry
        w3 = Web3(Web3.HTTPProvider(net.rpc_url))
        assert len(w3.eth.get_code(Web3.to_checksum_address(net.registry))) > 0
        market = load_config(home, environ={}).market
        assert (market.registry, market.endpoint, market.register) == (
            net.registry,
            "https://node.example",
            False,
        )
        assert 'endpoint = "https://node.example"  # kept' in (home / "node.toml").read_text()
        record = json.loads((devnet.devnet_dir(home) / devnet.DEPLOYMENT_FILENAME).read_text())
        assert (record["token"], record["escrow"], record["registry"]) == (
            net.token,
            net.escrow,
            net.registry,
        )

        text = (home / "node.toml").read_text()
        again = devnet.up(home, port=port)
        assert again.reused and again.registry == net.registry
        assert (home / "node.toml").read_text() == text  # nothing to change: not a byte changes

        # A deployment recorded before the registry existed: token and escrow are reused, a registry added.
        del record["registry"]
        (devnet.devnet_dir(home) / devnet.DEPLOYMENT_FILENAME).write_text(json.dumps(record))
        third = devnet.up(home, port=port)
        assert third.reused and (third.token, third.escrow) == (net.token, net.escrow)
        assert third.registry != net.registry
        assert len(w3.eth.get_code(Web3.to_checksum_address(third.registry))) > 0
        assert load_config(home, environ={}).market.registry == third.registry
    finally:
        devnet.stop(home)


def test_devnet_puts_a_new_market_table_after_the_chain_keys(tmp_path: Path) -> None:
    chain = f'[chain]\nrpc_url = "http://127.0.0.1:1"\nchain_id = 1\nescrow = "0x{"11" * 20}"\n'
    chain += f'token = "0x{"22" * 20}"\n\n# Jobs.\n[journal]\nsynchronous = "full"\n'
    (tmp_path / "node.toml").write_text(chain)
    registry = "0x" + "33" * 20
    devnet.set_market_registry(tmp_path, registry)
    text = (tmp_path / "node.toml").read_text()
    assert text.endswith(f'[market]\nregistry = "{registry}"\n\n# Jobs.\n[journal]\nsynchronous = "full"\n')
    cfg = load_config(tmp_path, environ={})
    assert (cfg.market.registry, cfg.journal.synchronous) == (registry, "full")

    (tmp_path / "node.toml").write_text('market = { registry = "0x' + "44" * 20 + '" }\n')
    with pytest.raises(ConfigError) as info:
        devnet.set_market_registry(tmp_path, registry)
    assert info.value.code == "config_not_editable" and "[market]" in info.value.message
