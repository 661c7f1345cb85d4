"""``python -m cluster.devcluster``, as ``hearth demo --cluster`` drives it: a cluster left running by one
process (``up``), a raylet killed (``kill-raylet``) and everything stopped (``down``) by later ones that only
have the state file. Real Ray: a head and one worker."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.devcluster import _group
from tests.conftest import REPO

TIMEOUT_SECONDS = 180


def devcluster(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.devcluster", *args],
        capture_output=True, text=True, check=False, timeout=TIMEOUT_SECONDS, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_up_kill_raylet_and_down_reach_the_cluster_through_its_state_file(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    name = f"cli-{secrets.token_hex(3)}"  # a joining worker removes containers labelled with its name
    up = devcluster("up", "--root", str(tmp_path / "ray"), "--state", str(state), "--worker", name)
    saved = json.loads(state.read_text())
    groups = [saved["head_pgid"], saved["workers"][name]["pgid"]]
    try:
        assert up["address"] == saved["address"] and set(up["workers"]) == {name}
        assert Path(up["env"]["RAY_AUTH_TOKEN_PATH"]).is_file()  # what the script's driver exports
        assert all(any(_group(pgid)) for pgid in groups)
        raylet = devcluster("kill-raylet", "--state", str(state), name)["raylet_pid"]
        assert raylet not in {p.pid for p in _group(groups[1])}
        assert devcluster("down", "--state", str(state)) == {"stopped": True, "address": up["address"]}
        assert not state.exists()
        assert [p.pid for pgid in groups for p in _group(pgid)] == []
        assert not Path(saved["temp_dir"]).exists()
        assert devcluster("down", "--state", str(state)) == {"stopped": False, "state": str(state)}
    finally:
        if state.exists():
            devcluster("down", "--state", str(state))
