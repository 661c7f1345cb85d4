"""``bench/market.py`` at a small scale, so the suite runs its code: the escrow history built on anvil, the
reputation cache checked against it cold and cached, and the routing harness with two real node daemons.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

BENCH_TIMEOUT_SECONDS = 240


def _bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the bench with ``--json``; its document, its exit code checked against its targets."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "market.py"), *args, "--dir", str(tmp_path), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.stdout, f"no result ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    assert proc.returncode == (0 if all(result["targets"].values()) else 1), proc.stderr[-4000:]
    return result


def test_the_reputation_bench_counts_every_job_it_built(tmp_path: Path) -> None:
    r = _bench(tmp_path, "--part", "reputation", "--jobs", "200", "--payers", "40")["reputation"]
    assert r["totals_match"] and r["jobs"] == 200
    outcomes = r["outcomes"]
    assert sum(outcomes.values()) == 200
    assert min(outcomes["released"], outcomes["refunded_failed"], outcomes["refunded_expired"]) > 0
    assert r["cold"]["logs"] == r["raw_get_logs"]["logs"] == 400  # a Funded and a settlement each
    assert r["cached"]["logs"] == 2 * r["jobs_after_cold"] and 0 < r["cached"]["blocks"] < r["cold"]["blocks"]
    assert r["cold"]["blocks_per_s"] > 0 and r["cached_over_cold"] > 0
    assert list(tmp_path.iterdir()) == []  # the cache's directory is gone with the run


def test_the_routing_bench_funds_a_routed_job_at_each_market_size(tmp_path: Path) -> None:
    r = _bench(tmp_path, "--part", "routing", "--nodes", "1,2", "--repeat", "1")["routing"]
    assert set(r["sizes"]) == {"1", "2"} and r["ratio_sizes"] == [1, 2]
    for size in r["sizes"].values():
        assert len(size["runs"]) == 1
        assert min(size["discover"], size["route"], size["funded"]) > 0
        assert size["total"] == pytest.approx(size["discover"] + size["route"] + size["funded"])
    assert r["ratio"] == r["sizes"]["2"]["total"] / r["sizes"]["1"]["total"]
    assert list(tmp_path.iterdir()) == []  # node homes and the devnet removed
    assert _running_under(tmp_path) == []  # every daemon and the anvil stopped


def _running_under(root: Path) -> list[int]:
    """Live processes whose command line names a path under ``root``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and str(root).encode() in cmdline:
            found.append(int(proc.name))
    return found
