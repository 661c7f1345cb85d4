"""schemathesis against /openapi.json of a running daemon: the node and its document agree.

schemathesis generates requests from the document (valid and invalid bodies, paths, headers, query
strings) with a fresh random seed each run (printed on failure, to replay it) and checks every answer:
no 5xx, every status, content type, header and body as documented, schema-violating requests refused,
405s with ``Allow``. Left out: ``positive_data_acceptance``, which expects any string shaped like a JWT
to be accepted; a random string of that shape is no signed request, and the node refuses it with 400
``malformed_jwt`` by design (docs/protocol.md).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonProcess

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "unsupported_method",
        "allow_header_conformance",
    ]
)


def test_schemathesis_finds_the_node_as_documented(daemon: DaemonProcess, tmp_path: Path) -> None:
    daemon.start()
    seed = random.randrange(2**32)
    proc = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{daemon.url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "60",
            "--seed",
            str(seed),
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
    output = f"schemathesis --seed {seed}\n" + proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    tally = re.search(r"(\d+) generated, (\d+) passed", output)
    assert tally is not None, output[-3000:]
    generated, passed = int(tally[1]), int(tally[2])
    assert generated == passed and generated >= 200, output[-3000:]
    assert "Tested: 18" in output  # every operation of the document was exercised
