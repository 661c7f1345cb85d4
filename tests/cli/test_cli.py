"""The hearth CLI as a user runs it: init, keys, and the job commands against a live daemon."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO, DaemonProcess, make_envelope


def hearth(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"hearth {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_init_writes_valid_config_and_private_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = as_json(hearth("init", "--home", str(home), "--port", "9911", "--json"))
    assert out["did"].startswith("did:key:z6Mk")
    assert stat.S_IMODE((home / "node.key").stat().st_mode) == 0o600
    assert "port = 9911" in (home / "node.toml").read_text()
    again = hearth("init", "--home", str(home), "--json", check=False)
    assert again.returncode == 2 and as_json(again)["error"]["code"] == "already_initialised"


def test_keys_new_and_show(tmp_path: Path) -> None:
    ed = as_json(hearth("keys", "new", "--out", str(tmp_path / "a.key"), "--json"))
    eth = as_json(
        hearth(
            "keys", "new", "--type", "eth", "--chain-id", "8453", "--out", str(tmp_path / "b.key"), "--json"
        )
    )
    assert ed["did"].startswith("did:key:z6Mk")
    assert eth["did"].startswith("did:pkh:eip155:8453:0x") and eth["address"] in eth["did"]
    for name in ("a.key", "b.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    shown = as_json(hearth("keys", "show", str(tmp_path / "b.key"), "--json"))
    assert shown["did"] == eth["did"]
    secret = json.loads((tmp_path / "b.key").read_text())["private_key"]
    assert secret not in json.dumps(shown)


def test_job_round_trip_and_refusals(daemon: DaemonProcess, tmp_path: Path) -> None:
    daemon.start()
    node = ["--node", daemon.url]
    key = tmp_path / "me.key"
    hearth("keys", "new", "--out", str(key))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(make_envelope("cli-1")))
    quote_file = tmp_path / "q.jwt"
    quote = as_json(
        hearth("job", "quote", str(job), "--key", str(key), *node, "--save-quote", str(quote_file), "--json")
    )
    assert quote_file.read_text() == quote["jwt"]
    sub = as_json(
        hearth("job", "submit", str(job), "--key", str(key), *node, "--quote", str(quote_file), "--json")
    )
    job_key = sub["job"]["id"]
    assert sub["job"]["state"] == "accepted"
    human = hearth("job", "status", job_key, *node).stdout
    assert "accepted" in human and job_key in human
    events = [
        json.loads(line) for line in hearth("job", "events", job_key, *node, "--json").stdout.splitlines()
    ]
    assert [e["to"] for e in events] == ["created", "priced", "accepted"]

    cheap = tmp_path / "cheap.yaml"
    cheap.write_text(yaml.safe_dump(make_envelope("cli-2", max_price="0.000001")))
    refused = hearth("job", "quote", str(cheap), "--key", str(key), *node, "--json", check=False)
    assert refused.returncode == 1
    assert as_json(refused)["error"]["code"] == "price_above_max"
    assert "ask" in as_json(refused)["error"]["details"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**make_envelope("cli-3"), "kind": "rm -rf"}))
    local = hearth("job", "quote", str(bad), "--key", str(key), *node, "--json", check=False)
    assert local.returncode == 2 and as_json(local)["error"]["code"] == "invalid_envelope"

    cancelled = as_json(hearth("job", "cancel", job_key, "--key", str(key), *node, "--json"))
    assert cancelled["outcome"] == "cancelled"


def test_unreachable_node_is_exit_3(tmp_path: Path) -> None:
    proc = hearth("job", "status", "hj_x", "--node", "http://127.0.0.1:9", "--json", check=False)
    assert proc.returncode == 3
    assert as_json(proc)["error"]["code"] == "node_unreachable"


def test_replay_reads_the_config_file_named_by_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    hearth("init", "--home", str(home), "--json")
    # the service's layout: the config in /etc/hearth, the journal under the home
    replay = ("job", "replay", "hj_x", "--home", str(home), "--json", "--config")
    missing = hearth(*replay, str(tmp_path / "no.toml"), check=False)
    assert missing.returncode == 2 and as_json(missing)["error"]["code"] == "config_missing"
    etc = tmp_path / "etc-node.toml"
    etc.write_text((home / "node.toml").read_text())
    found = hearth(*replay, str(etc), check=False)
    assert found.returncode == 2 and as_json(found)["error"]["code"] == "job_not_found"  # read, then looked
