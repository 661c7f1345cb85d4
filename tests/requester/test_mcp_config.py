"""``hearth mcp``'s requester home, without a chain: requester.toml's ``[agent]`` read strictly, the server
refusing to start without a key or a place to send jobs, and a tool call that is not one answered as a
structured tool error (never a protocol error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from payments.keys import EthSigner, new_ed25519, save_key
from requester.agent_tools import AgentTools
from requester.budgets import load_requester_config
from requester.mcp import call, tool_list
from tests.conftest import REPO


def _home(root: Path, agent_toml: str) -> Path:
    (root / "requester").mkdir(parents=True)
    (root / "requester" / "requester.toml").write_text(agent_toml)
    return root


def test_the_agent_section_is_read_strictly(tmp_path: Path) -> None:
    home = _home(
        tmp_path / "a", '[agent]\nkey_file = "agent.key"\ngrant = 2\nallow_private_endpoints = true\n'
    )
    agent = load_requester_config(home).agent
    assert (agent.key_file, agent.grant, agent.allow_private_endpoints) == ("agent.key", 2, True)
    for n, bad in enumerate(
        ("[agent]\ngrant = 0\n", "[agent]\nwallet = 'x'\n", '[agent]\nregistry = "0x12"\n')
    ):
        home = _home(tmp_path / f"bad-{n}", bad)
        with pytest.raises(ConfigError) as exc:
            load_requester_config(home)
        assert exc.value.code == "invalid_requester_config"


def test_the_server_needs_an_ethereum_key_and_a_node_or_a_market(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        AgentTools.open(_home(tmp_path / "nokey", "[budgets]\n"), node="http://127.0.0.1:1")
    assert exc.value.code == "agent_key_missing"
    home = _home(tmp_path / "nomarket", '[agent]\nkey_file = "agent.key"\n')
    save_key(EthSigner.generate(31337), home / "requester" / "agent.key")
    with pytest.raises(ConfigError) as exc:
        AgentTools.open(home)
    assert exc.value.code == "no_market"
    ed = _home(tmp_path / "ed", '[agent]\nkey_file = "agent.key"\n')
    save_key(new_ed25519(), ed / "requester" / "agent.key")
    with pytest.raises(Exception) as err:
        AgentTools.open(ed, node="http://127.0.0.1:1")
    assert getattr(err.value, "code", None) == "wallet_not_ethereum"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "mcp", "--home", str(tmp_path / "nokey"), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "agent_key_missing" in done.stdout + done.stderr


async def test_unknown_tools_and_bad_arguments_are_tool_errors(tmp_path: Path) -> None:
    home = _home(tmp_path / "h", '[agent]\nkey_file = "agent.key"\n')
    save_key(EthSigner.generate(31337), home / "requester" / "agent.key")
    tools = AgentTools.open(home, node="http://127.0.0.1:1")
    try:
        result = await call(tools, "rm_rf", {})
        assert result.isError and json.loads(result.content[0].text)["error"]["code"] == "unknown_tool"
        result = await call(tools, "wait_job", {"job": "hj_x", "timeout_seconds": -1})
        err = json.loads(result.content[0].text)["error"]
        assert result.isError and err["code"] == "invalid_arguments"
        assert err["details"]["problems"][0]["loc"] == "timeout_seconds"
        result = await call(tools, "put_input", {"path": str(tmp_path / "absent"), "idempotency_key": "k"})
        assert result.isError and json.loads(result.content[0].text)["error"]["code"] == "os_error"
        result = await call(tools, "job_status", {"job": "hj_x"})  # the node is down: refused, not raised
        assert result.isError and json.loads(result.content[0].text)["error"]["retryable"] is True
    finally:
        tools.close()
    schemas = {t.name: t.inputSchema for t in tool_list()}
    assert schemas["put_input"]["required"] == ["path", "idempotency_key"]
    assert schemas["cancel_job"]["additionalProperties"] is False
