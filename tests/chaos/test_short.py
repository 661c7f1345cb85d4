"""Every scoreboard scenario at its short count, so CI guards each fault the long run counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.scoreboard import load_all, run_scenario

SCENARIOS = load_all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_short(name: str, tmp_path: Path) -> None:
    sc = SCENARIOS[name]
    row = run_scenario(sc, sc.short, tmp_path)
    assert row.ok, row.as_dict()
    assert row.runs >= sc.short
