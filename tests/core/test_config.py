"""node.toml: validated at start with messages that name the field; env overrides; named defaults."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, get_args

import pytest

import core.config
import core.defaults
from core.config import JobKind, NodeConfig, load_config, parse_config
from core.defaults import DEFAULT_POLICY_KINDS
from core.errors import ConfigError

# What a node ran on with an empty node.toml when the defaults moved to core/defaults.py, written out
# here so that no default can change by accident: a deliberate change edits this too.
EMPTY_CONFIG: dict[str, Any] = {
    "node": {"name": "hearth-node", "key_file": "node.key", "state_dir": "state", "public_url": None},
    "api": {
        "host": "127.0.0.1",
        "port": 8787,
        "max_body_bytes": 262144,
        "clock_skew_seconds": 60,
        "max_token_lifetime_seconds": 3600,
        "quote_ttl_seconds": 300,
        "body_timeout_seconds": 10.0,
        "header_timeout_seconds": 10.0,
        "idle_timeout_seconds": 60.0,
        "max_connections": 1024,
        "reserved_descriptors": 256,
        "max_header_line_bytes": 8190,
    },
    "pricing": {
        "currency": "usdc",
        "cpu_second": "0.00002",
        "gpu_second": "0.0005",
        "gpu_second_by_model": {},
        "output_mb": "0.0001",
        "input_1k_tokens": "0.0002",
        "output_1k_tokens": "0.0006",
        "minimum_per_job": "0.01",
        "surge": {"threshold": 0.5, "max_factor": 2.0},
        "script": None,
    },
    "policy": {
        "allow_dids": [],
        "deny_dids": [],
        "kinds": ["ffmpeg_transcode", "vllm_batch"],
        "max_timeout_seconds": 3600,
        "max_output_mb": 2048,
        "max_cpus": 4,
        "max_memory_mb": 8192,
        "max_gpus": 1,
        "per_did_concurrency": 4,
        "retry_budget": 2,
    },
    "capacity": {
        "cpus": "auto",
        "memory_mb": "auto",
        "gpus": "auto",
        "reserve_cpus": 0.0,
        "reserve_memory_mb": 512,
        "overcommit": 1.0,
        "quote_hold_share": 0.5,
        "per_requester_hold_share": 0.25,
        "busy_retry_after_seconds": 30,
    },
    "journal": {"filename": "journal.sqlite3", "synchronous": "normal"},
    "storage": {
        "blocks_dir": "blocks",
        "max_blob_mb": 2048,
        "upload_stall_seconds": 30.0,
        "max_input_mb": 4096,
        "gateways": [],
        "fetch_timeout_seconds": 600.0,
        "connect_timeout_seconds": 10.0,
        "read_timeout_seconds": 60.0,
        "verify_reads": True,
        "quote_fetch_timeout_seconds": 20.0,
        "allow_private_addresses": False,
        "allow_networks": [],
        "max_redirects": 5,
    },
    "sandbox": {
        "docker_url": "unix:///var/run/docker.sock",
        "ffmpeg_image": "hearth/ffmpeg:latest",
        "vllm_cpu_image": "hearth/vllm-cpu:latest",
        "vllm_gpu_image": "hearth/vllm-gpu:latest",
        "vllm_shm_mb": 512,
        "pids_limit": 256,
        "tmpfs_mb": 256,
        "work_dir": "work",
        "user": "10001:10001",
        "docker_timeout_seconds": 30.0,
        "output_poll_seconds": 0.25,
        "stderr_tail_bytes": 8192,
        "probe_timeout_seconds": 60.0,
        "probe_memory_mb": 256,
    },
    "scheduler": {"paused": False, "drain_grace_seconds": 30.0},
    "gpu": {
        "selftest": True,
        "selftest_hours": 24.0,
        "selftest_timeout_seconds": 180.0,
        "selftest_memory_mb": 8192,
        "max_temperature_c": 85,
        "max_ecc_uncorrected": 0,
        "withhold_throttle_reasons": [
            "hw_slowdown",
            "hw_thermal_slowdown",
            "sw_thermal_slowdown",
            "hw_power_brake",
        ],
        "min_tflops": 0.0,
        "min_memory_bandwidth_gbs": 0.0,
    },
    "logging": {"format": "json", "level": "INFO", "repeat_burst": 10, "repeat_window_seconds": 60.0},
    "webhooks": {
        "timeout_seconds": 10.0,
        "max_attempts": 12,
        "backoff_base_seconds": 1.0,
        "backoff_max_seconds": 300.0,
        "poll_seconds": 0.5,
        "allow_private_addresses": False,
        "allow_networks": [],
    },
    "chain": None,
    "registry": {
        "urls": [],
        "heartbeat_seconds": 60.0,
        "check_seconds": 1.0,
        "timeout_seconds": 10.0,
        "backoff_initial_seconds": 1.0,
        "backoff_max_seconds": 300.0,
    },
    "market": {"registry": None, "endpoint": None, "register": True},
    "cluster": None,
    "models": [],
}

# Defaults no key of node.toml takes: they are used outside a loaded config.
# Named defaults that are not node.toml keys: the devnet's port, and the requester side's (routing, budgets).
NOT_A_KEY = {
    "DEFAULT_DEVNET_PORT",
    "DEFAULT_REQUESTER_WORKFLOW",
    "DEFAULT_ROUTING_MAX_FAILURE_RATE",
    "DEFAULT_ROUTING_MIN_SETTLED",
    "DEFAULT_ROUTING_QUOTE_TIMEOUT_SECONDS",
    "ROUTING_STRATEGIES",
}


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, environ={})
    assert cfg == NodeConfig()
    assert cfg.api.max_body_bytes == 256 * 1024


def test_invalid_values_are_named(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text('[api]\nport = 99999\n[pricing]\ncpu_second = "-1"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, environ={})
    assert exc.value.code == "invalid_config"
    text = " ".join(exc.value.details["problems"])
    assert "api.port" in text and "pricing.cpu_second" in text


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text("[api]\nprot = 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, environ={})
    assert "api.prot" in exc.value.message


def test_broken_toml(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text("[api\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, environ={})
    assert exc.value.code == "invalid_toml"


def test_env_overrides(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text("[api]\nport = 1000\n")
    cfg = load_config(
        tmp_path,
        environ={
            "HEARTH_API__PORT": "2000",
            "HEARTH_PRICING__CPU_SECOND": "0.5",
            "HEARTH_POLICY__KINDS": '["vllm_batch"]',
        },
    )
    assert cfg.api.port == 2000
    assert cfg.pricing.cpu_second == "0.5"
    assert cfg.policy.kinds == ["vllm_batch"]
    with pytest.raises(ConfigError):
        load_config(tmp_path, environ={"HEARTH_API__PORT": "not-a-port"})


def _typed(value: object) -> object:
    """``value`` with every leaf paired with its type, so that 4 and 4.0 (or 1 and True) differ."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def test_an_empty_config_is_the_pinned_defaults() -> None:
    dump = parse_config({}).model_dump()
    assert dump == EMPTY_CONFIG
    assert _typed(dump) == _typed(EMPTY_CONFIG)


def test_the_default_kinds_are_every_kind() -> None:
    assert list(DEFAULT_POLICY_KINDS) == list(get_args(JobKind))


def _section_defaults() -> list[tuple[str, str, ast.expr]]:
    """(class, field, default expression) for every field of every section of core/config.py."""
    tree = ast.parse(Path(core.config.__file__).read_text())
    found: list[tuple[str, str, ast.expr]] = []
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value):
                continue
            value = stmt.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "Field":
                for kw in value.keywords:
                    if kw.arg in ("default", "default_factory"):
                        found.append((cls.name, stmt.target.id, kw.value))
            else:
                found.append((cls.name, stmt.target.id, value))
    return found


def test_sections_take_every_default_from_core_defaults() -> None:
    defaults = _section_defaults()
    assert len(defaults) > 100  # every section was read
    literal = [
        f"{cls}.{field}: {ast.unparse(expr)}"
        for cls, field, expr in defaults
        if any(isinstance(n, ast.Constant) and n.value is not None for n in ast.walk(expr))
    ]
    assert literal == [], "defaults written as literals instead of named in core/defaults.py"


def test_every_named_default_is_used() -> None:
    source = Path(core.config.__file__).read_text()
    named = {n for n in vars(core.defaults) if n.isupper()}
    assert {n for n in named if f"d.{n}" not in source} == NOT_A_KEY


def test_the_offer_and_the_registry_name_one_endpoint(tmp_path: Path) -> None:
    """``[market] endpoint`` is what the signed offer names (else ``[node] public_url``); both set and
    different is refused, naming both keys."""
    market = "https://node.example.org:8787"
    assert parse_config({"market": {"endpoint": market}}).endpoint == market
    assert parse_config({"node": {"public_url": market}}).endpoint == market
    assert parse_config({"node": {"public_url": market}, "market": {"endpoint": market}}).endpoint == market
    assert parse_config({}).endpoint is None
    (tmp_path / "node.toml").write_text(
        f'[node]\npublic_url = "https://other.example.org"\n[market]\nendpoint = "{market}"\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert exc.value.code == "invalid_config"
    [problem] = exc.value.details["problems"]
    assert "market.endpoint" in problem and "node.public_url" in problem and market in problem
