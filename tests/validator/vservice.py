"""``hearth validator run`` as a real child process, for the validator service's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import REPO


class ValidatorProcess:
    """The validator service on ``port`` with ``key`` and ``home``; ``kill()`` is SIGKILL, ``stop()`` SIGTERM.

    ``crash_at`` runs it through :mod:`tests.crashvalidator`, which kills it at that fault point.
    """

    def __init__(self, key: Path, home: Path, port: int) -> None:
        self.key, self.home, self.port = key, home, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "validator.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, crash_at: str | None = None, timeout: float = 30.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        launcher = ["-m", "tests.crashvalidator", crash_at] if crash_at else ["-m", "cli.main"]
        argv = [
            sys.executable,
            *launcher,
            "validator",
            "run",
            "--home",
            str(self.home),
            "--key",
            str(self.key),
            "--port",
            str(self.port),
            "--json-logs",
            "--allow-private-addresses",
            "--retry-max-seconds",
            "1",
        ]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"validator exited: {self.log.read_text()[-4000:]}")
            try:
                self.healthz()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("the validator did not start")

    def healthz(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
            return dict(json.loads(resp.read()))

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=2) as resp:
            return str(resp.read().decode())

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (other lines, e.g. the ready line, skipped)."""
        lines = []
        for line in self.log.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "level" in doc:
                lines.append(doc)
        return lines
