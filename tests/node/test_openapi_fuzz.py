"""schemathesis against /openapi.json of a running daemon: no input makes the node fail with a 5xx.

The document itself must describe every route; schemathesis generates requests from it (valid and
invalid bodies, paths, query strings) and the ``not_a_server_error`` check fails on any 500.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonProcess

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_schemathesis_finds_no_server_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    daemon.start()
    proc = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{daemon.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "60",
            "--generation-deterministic",
            "--request-timeout",
            "10",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    tally = re.search(r"(\d+) generated, (\d+) passed", output)
    assert tally is not None, output[-3000:]
    generated, passed = int(tally[1]), int(tally[2])
    assert generated == passed and generated >= 200, output[-3000:]
    assert "Tested: 18" in output  # every operation of the document was exercised
