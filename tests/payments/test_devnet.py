"""``hearth devnet`` against a real anvil: deploy, fund, configure, reuse, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from cli.main import main
from core.config import ChainSection, load_config, parse_config
from core.errors import ConfigError
from payments import devnet, devnet_anvil
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, load_key
from tests.payments.contracts.chain import free_port

FOREGROUND_TIMEOUT_SECONDS = 30


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A node home made by ``hearth init``; any devnet anvil left in it is stopped afterwards."""
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--port", str(free_port())]) == 0
    yield home
    devnet.stop(home)


def run_devnet(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = main(["devnet", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_devnet_deploys_funds_configures_reuses_and_stops(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = str(free_port())
    init_text = (home / "node.toml").read_text()
    api_port = load_config(home).api.port

    rc, first = run_devnet(capsys, "--home", str(home), "--port", port, "--detach")
    assert rc == 0, first
    assert first["started"] is True and first["reused"] is False
    assert first["rpc_url"] == f"http://127.0.0.1:{port}" and first["chain_id"] == 31337

    cfg = load_config(home)
    assert cfg.chain is not None
    assert (cfg.chain.rpc_url, cfg.chain.chain_id) == (first["rpc_url"], 31337)
    assert (cfg.chain.escrow, cfg.chain.token) == (first["escrow"], first["token"])
    assert cfg.chain.confirmations == devnet.DEVNET_CONFIRMATIONS
    assert cfg.api.port == api_port  # the other sections are untouched, comments included
    assert (home / "node.toml").read_text().startswith(init_text.rstrip("\n"))

    w3 = Web3(Web3.HTTPProvider(first["rpc_url"]))
    assert len(w3.eth.get_code(first["escrow"])) > 0
    assert len(w3.eth.get_code(first["token"])) > 0
    escrow = w3.eth.contract(address=first["escrow"], abi=load_artifact("HearthEscrow").abi)
    assert escrow.functions.token().call() == first["token"]
    usdc = w3.eth.contract(address=first["token"], abi=load_artifact("TestUSDC").abi)
    accounts = first["accounts"]
    assert usdc.functions.balanceOf(accounts["requester"]["address"]).call() == devnet.REQUESTER_USDC
    assert w3.eth.get_balance(accounts["node"]["address"]) == devnet.NODE_GAS_WEI
    assert w3.eth.get_balance(accounts["validator"]["address"]) == devnet.VALIDATOR_GAS_WEI

    assert accounts["node"]["key_file"] == str(home / "wallet.key")
    for account in accounts.values():
        assert mode(account["key_file"]) == 0o600
        signer = load_key(account["key_file"])
        assert isinstance(signer, EthSigner)
        assert (signer.address, signer.did) == (account["address"], account["did"])

    rc, second = run_devnet(capsys, "--home", str(home), "--port", port, "--detach")
    assert rc == 0, second
    assert second["started"] is False and second["reused"] is True
    assert second["pid"] == first["pid"]
    assert {k: second[k] for k in ("escrow", "token", "accounts")} == {
        k: first[k] for k in ("escrow", "token", "accounts")
    }
    # topped up, not funded twice
    assert usdc.functions.balanceOf(accounts["requester"]["address"]).call() == devnet.REQUESTER_USDC

    rc, stopped = run_devnet(capsys, "--home", str(home), "--stop")
    assert (rc, stopped) == (0, {"stopped": True, "pid": first["pid"]})
    assert devnet.running_pid(home) is None
    with pytest.raises(ConfigError) as info:
        devnet.connect(first["rpc_url"], timeout=0.3)
    assert info.value.code == "devnet_rpc_unreachable"
    assert run_devnet(capsys, "--home", str(home), "--stop") == (0, {"stopped": False, "pid": None})

    # anvil dumped its state on SIGTERM, so a fresh start finds the same contracts
    rc, third = run_devnet(capsys, "--home", str(home), "--port", port, "--detach")
    assert rc == 0, third
    assert third["started"] is True and third["reused"] is True
    assert (third["escrow"], third["token"]) == (first["escrow"], first["token"])


def test_a_second_home_joins_a_running_devnet_and_only_the_first_stops_it(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    assert main(["init", "--home", str(other), "--port", str(free_port())]) == 0
    rc, refused = run_devnet(capsys, "--home", str(other), "--join", str(home), "--detach")
    assert rc == 2 and refused["error"]["code"] == "devnet_not_running"
    assert load_config(other).chain is None  # nothing written

    rc, first = run_devnet(capsys, "--home", str(home), "--port", str(free_port()), "--detach")
    assert rc == 0, first
    rc, joined = run_devnet(capsys, "--home", str(other), "--join", str(home), "--detach")
    assert rc == 0, joined
    assert joined["started"] is False and joined["pid"] == first["pid"]
    same = ("rpc_url", "escrow", "token", "registry")
    assert {k: joined[k] for k in same} == {k: first[k] for k in same}
    for role in ("requester", "validator"):  # one requester and one validator for the whole devnet
        assert joined["accounts"][role] == first["accounts"][role]
    node = joined["accounts"]["node"]
    assert node["key_file"] == str(other / "wallet.key")
    assert node["address"] != first["accounts"]["node"]["address"]
    w3 = Web3(Web3.HTTPProvider(first["rpc_url"]))
    assert w3.eth.get_balance(node["address"]) == devnet.NODE_GAS_WEI
    cfg = load_config(other)
    assert cfg.chain is not None and cfg.chain.rpc_url == first["rpc_url"]
    assert cfg.market.registry == first["registry"]

    # the joining home holds no anvil of its own: stopping it stops nothing
    assert run_devnet(capsys, "--home", str(other), "--stop") == (0, {"stopped": False, "pid": None})
    assert devnet.running_pid(home) == first["pid"]


def test_foreground_devnet_stops_anvil_on_sigterm(home: Path) -> None:
    port = str(free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "devnet", "--home", str(home), "--port", port, "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # the JSON document ends with a lone closing brace
            lines.append(line)
            if line == "}\n":
                break
        data = json.loads("".join(lines))
        assert data["started"] is True
        assert devnet.running_pid(home) == data["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(FOREGROUND_TIMEOUT_SECONDS) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert devnet.running_pid(home) is None
    assert (
        not Path(f"/proc/{data['pid']}").exists()
        or b"anvil" not in Path(f"/proc/{data['pid']}/cmdline").read_bytes()
    )


def test_port_in_use_is_a_clear_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, body = run_devnet(capsys, "--home", str(home), "--port", str(busy.getsockname()[1]))
    assert rc == 2
    assert body["error"]["code"] == "devnet_port_in_use"
    assert devnet.running_pid(home) is None
    assert load_config(home).chain is None


def test_missing_anvil_says_run_make_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devnet_anvil, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(devnet_anvil, "ANVIL", tmp_path / "node_modules" / ".bin" / "anvil")
    with pytest.raises(ConfigError) as info:
        devnet.spawn_anvil(free_port())
    assert info.value.code == "anvil_missing"
    assert "make setup" in info.value.message


def test_rpc_not_answering_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        devnet.connect(f"http://127.0.0.1:{free_port()}", timeout=0.2)
    assert info.value.code == "devnet_rpc_unreachable"
    assert info.value.retryable


CHAIN = ChainSection(
    rpc_url="https://rpc.example.org",
    chain_id=8453,
    escrow="0x" + "ab" * 20,
    token="0x" + "cd" * 20,
)


def test_set_chain_config_replaces_the_table_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text(
        '[api]\nport = 9000  # kept\n\n[chain]\nrpc_url = "http://old:1"\nchain_id = 1\n'
        f'escrow = "0x{"11" * 20}"\ntoken = "0x{"22" * 20}"\n\n[journal]\nsynchronous = "full"\n'
    )
    devnet.set_chain_config(tmp_path, CHAIN)
    cfg = load_config(tmp_path, environ={})
    assert cfg.chain == CHAIN
    assert (cfg.api.port, cfg.journal.synchronous) == (9000, "full")
    assert "port = 9000  # kept" in (tmp_path / "node.toml").read_text()


OPERATOR_CHAIN = f"""# The settlement chain, tuned by hand.
[chain]
rpc_url = "http://127.0.0.1:1"  # the chain this node used before
chain_id = 1
escrow = "0x{"11" * 20}"
token = "0x{"22" * 20}"
confirmations = 3              # reorgs here have run two blocks deep
# Settlement gets a week.
settlement_window_seconds = 604800

"""


def test_devnet_edits_an_existing_chain_table_in_place(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_text = (home / "node.toml").read_text()
    (home / "node.toml").write_text(OPERATOR_CHAIN + init_text)
    rc, net = run_devnet(capsys, "--home", str(home), "--port", str(free_port()), "--detach")
    assert rc == 0, net

    text = (home / "node.toml").read_text()
    assert text.endswith(init_text)  # the sections after [chain], comments included, as written
    old, new = OPERATOR_CHAIN.splitlines(), text.splitlines()
    # Only the lines holding where the chain is changed; the operator's comments and knobs stay put, and
    # the keys the table lacked are added to it.
    assert [line for line in old if line not in new] == old[2:6]
    assert new[2] == f'rpc_url = "{net["rpc_url"]}"  # the chain this node used before'
    assert new[3:6] == ["chain_id = 31337", f'escrow = "{net["escrow"]}"', f'token = "{net["token"]}"']
    assert text.count("[chain]") == 1 and devnet.CHAIN_TABLE_COMMENT not in text
    chain = load_config(home).chain
    assert chain is not None
    assert (chain.rpc_url, chain.chain_id, chain.escrow, chain.token) == (
        net["rpc_url"],
        31337,
        net["escrow"],
        net["token"],
    )
    assert (chain.confirmations, chain.settlement_window_seconds) == (3, 604800)
    assert chain.token_name == devnet.TOKEN_NAME

    devnet.set_chain_config(home, chain)  # the same values again: not a byte changes
    assert (home / "node.toml").read_text() == text


def test_set_chain_config_refuses_chain_outside_a_table(tmp_path: Path) -> None:
    original = 'chain = { rpc_url = "http://x:1" }\n[api]\nport = 9000\n'
    (tmp_path / "node.toml").write_text(original)
    with pytest.raises(ConfigError) as info:
        devnet.set_chain_config(tmp_path, CHAIN)
    assert info.value.code == "config_not_editable"
    assert (tmp_path / "node.toml").read_text() == original


@pytest.mark.parametrize(
    "field, value",
    [("escrow", "0x1234"), ("token", "0x" + "zz" * 20), ("rpc_url", "ftp://x"), ("chain_id", 0)],
)
def test_chain_section_rejects_bad_values(field: str, value: object) -> None:
    chain = {**CHAIN.model_dump(), field: value}
    with pytest.raises(ConfigError) as info:
        parse_config({"chain": chain})
    assert info.value.code == "invalid_config"
    assert f"chain.{field}" in info.value.message
