"""The example configs in configs/ and the one `hearth init` writes are valid node.toml files.

The file `hearth init` writes says its values are the defaults; each is checked against the named
default in core/defaults.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from cli.operator import NODE_TOML_TEMPLATE
from core import defaults as d
from core.config import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))

# Every key the `hearth init` template sets, and the named default it claims to show.
TEMPLATE_DEFAULTS: dict[tuple[str, ...], object] = {
    ("node", "name"): d.DEFAULT_NODE_NAME,
    ("node", "key_file"): d.KEY_FILENAME,
    ("node", "state_dir"): d.DEFAULT_NODE_STATE_DIR,
    ("api", "host"): d.DEFAULT_HOST,
    ("api", "port"): d.DEFAULT_PORT,
    ("api", "max_body_bytes"): d.DEFAULT_MAX_BODY_BYTES,
    ("api", "clock_skew_seconds"): d.DEFAULT_CLOCK_SKEW_SECONDS,
    ("api", "max_token_lifetime_seconds"): d.DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
    ("api", "quote_ttl_seconds"): d.DEFAULT_QUOTE_TTL_SECONDS,
    ("pricing", "cpu_second"): d.DEFAULT_PRICING_CPU_SECOND,
    ("pricing", "gpu_second"): d.DEFAULT_PRICING_GPU_SECOND,
    ("pricing", "output_mb"): d.DEFAULT_PRICING_OUTPUT_MB,
    ("pricing", "input_1k_tokens"): d.DEFAULT_PRICING_INPUT_1K_TOKENS,
    ("pricing", "output_1k_tokens"): d.DEFAULT_PRICING_OUTPUT_1K_TOKENS,
    ("pricing", "minimum_per_job"): d.DEFAULT_PRICING_MINIMUM_PER_JOB,
    ("pricing", "surge", "threshold"): d.DEFAULT_PRICING_SURGE_THRESHOLD,
    ("pricing", "surge", "max_factor"): d.DEFAULT_PRICING_SURGE_MAX_FACTOR,
    ("policy", "allow_dids"): list(d.DEFAULT_POLICY_ALLOW_DIDS),
    ("policy", "deny_dids"): list(d.DEFAULT_POLICY_DENY_DIDS),
    ("policy", "kinds"): list(d.DEFAULT_POLICY_KINDS),
    ("policy", "max_timeout_seconds"): d.DEFAULT_POLICY_MAX_TIMEOUT_SECONDS,
    ("policy", "max_output_mb"): d.DEFAULT_POLICY_MAX_OUTPUT_MB,
    ("policy", "max_cpus"): d.DEFAULT_POLICY_MAX_CPUS,
    ("policy", "max_memory_mb"): d.DEFAULT_POLICY_MAX_MEMORY_MB,
    ("policy", "max_gpus"): d.DEFAULT_POLICY_MAX_GPUS,
    ("policy", "per_did_concurrency"): d.DEFAULT_PER_DID_CONCURRENCY,
    ("capacity", "cpus"): d.DEFAULT_CAPACITY_CPUS,
    ("capacity", "memory_mb"): d.DEFAULT_CAPACITY_MEMORY_MB,
    ("capacity", "gpus"): d.DEFAULT_CAPACITY_GPUS,
    ("journal", "synchronous"): d.DEFAULT_JOURNAL_SYNCHRONOUS,
}


def _leaves(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every value of a decoded TOML document under its dotted path (arrays are values)."""
    out: dict[tuple[str, ...], object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _init_file() -> dict[str, Any]:
    """The node.toml `hearth init` writes when given no --name, --host or --port."""
    text = NODE_TOML_TEMPLATE.format(
        name=d.DEFAULT_NODE_NAME, host=d.DEFAULT_HOST, port=d.DEFAULT_PORT, key_file=d.KEY_FILENAME
    )
    return tomllib.loads(text)


def test_init_file_shows_the_named_defaults() -> None:
    shown = _leaves(_init_file())
    assert set(shown) == set(TEMPLATE_DEFAULTS), "a key of the template has no named default to check"
    wrong = {
        ".".join(path): (value, TEMPLATE_DEFAULTS[path])
        for path, value in shown.items()
        if value != TEMPLATE_DEFAULTS[path] or type(value) is not type(TEMPLATE_DEFAULTS[path])
    }
    assert wrong == {}, "template value != named default"


def test_init_file_configures_what_an_empty_file_does() -> None:
    assert parse_config(_init_file()) == parse_config({})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path: Path) -> None:
    cfg = parse_config(tomllib.loads(path.read_text()), source=str(path))
    assert cfg.api.port == d.DEFAULT_PORT


def test_cpu_only_example_shows_the_connection_defaults() -> None:
    # cpu-only.toml shows the HTTP connection limits of a node facing the internet as "the defaults, shown"
    path = next(p for p in CONFIGS if p.name == "cpu-only.toml")
    api = parse_config(tomllib.loads(path.read_text()), source=str(path)).api
    assert (api.max_connections, api.header_timeout_seconds, api.idle_timeout_seconds) == (
        d.DEFAULT_MAX_CONNECTIONS,
        d.DEFAULT_HEADER_TIMEOUT_SECONDS,
        d.DEFAULT_IDLE_TIMEOUT_SECONDS,
    )
    assert api.body_timeout_seconds == d.DEFAULT_BODY_TIMEOUT_SECONDS


def test_there_are_examples() -> None:
    assert {p.name for p in CONFIGS} >= {"cpu-only.toml", "gpu.toml", "devnet.toml"}
