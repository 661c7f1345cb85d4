"""The daemon starts without importing what only some nodes use (restart-to-ready target: <= 1 s).

eth-account (with py_ecc) and web3 take about half a second to import; a node without ``[chain]`` never
needs them, ``rich`` is only for ``hearth status``, and Ray (seconds and hundreds of MiB) only for a node
with ``[cluster]``. A module-level import of any of them in the
daemon's path would put that back on every start. Neither does a node without GPUs load the GPU self-test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# what `hearth run` imports before it serves: the CLI, the server and the node
PROBE = """
import json, sys
import cli.main, node.server, node.daemon
heavy = {"eth_account", "web3", "rich", "py_ecc", "ray"}
gpu = {"provider.gpu_selftest", "provider.gpu_health", "sandbox.gpu_bench", "numpy", "torch"}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in gpu)))
"""


def test_the_daemon_path_imports_no_payment_stack_no_rich_and_no_ray() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == []


def test_a_node_with_a_chain_still_gets_the_payment_stack() -> None:
    probe = "import json, sys\nimport payments.settlement\nprint(json.dumps('eth_account' in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) is True
