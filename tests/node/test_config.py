"""node.toml: validated at start with messages that name the field; env overrides; defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import NodeConfig, load_config
from core.errors import ConfigError


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
