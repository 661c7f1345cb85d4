"""The example configs in configs/ are valid node.toml files."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core.config import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path: Path) -> None:
    cfg = parse_config(tomllib.loads(path.read_text()), source=str(path))
    assert cfg.api.port == 8787


def test_there_are_examples() -> None:
    assert {p.name for p in CONFIGS} >= {"cpu-only.toml", "gpu.toml", "devnet.toml"}
