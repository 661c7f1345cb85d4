"""What the fault scenarios share: seeded randomness, a daemon home, the journal read back from disk, and
the node's containers on the engine.

The scenarios judge a node by its own records, not by what it says over HTTP: the journal (SQLite) is the
source of truth (docs/architecture.md), so after every fault they read it directly, read-only, beside the
live or
dead daemon. Containers are listed from the Docker engine by the node's label, as recovery finds them.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import load_config, resolve_path
from core.defaults import DEFAULT_DOCKER_URL
from sandbox.runner import LABEL_NODE
from tests.chaos.scoreboard import Row
from tests.conftest import DaemonProcess, free_port, labelled_containers, write_home

SEED_ENV = "HEARTH_CHAOS_SEED"  # set it to replay a run's random moments (each row prints its seed)
NODE_START_TIMEOUT_SECONDS = 60.0  # a start on a loaded 2-core machine, recovery included


def seeded(row: Row) -> random.Random:
    """The row's random source: ``$HEARTH_CHAOS_SEED`` when set, else a fresh seed kept on the row."""
    text = os.environ.get(SEED_ENV, "")
    seed = int(text) if text else secrets.randbits(32)
    row.seed = seed
    return random.Random(seed)


def daemon_home(workdir: Path, config: dict[str, Any]) -> DaemonProcess:
    """A node home under ``workdir`` with ``config`` (sections as in node.toml) and a daemon for it."""
    port = free_port()
    return DaemonProcess(write_home(workdir / "home", config, port=port), port)


def start(daemon: DaemonProcess) -> float:
    """Start the daemon (recovery included) and wait until it is ready; seconds it took."""
    return daemon.start(timeout=NODE_START_TIMEOUT_SECONDS)


def answers_ready(url: str) -> bool:
    """Whether the node at ``url`` answers ``/readyz`` with 200 right now."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def node_did(home: Path) -> str:
    """The node's DID, from its key file (no request needed, and it holds while the daemon is down)."""
    from payments.keys import load_key

    return load_key(home / "node.key").did


# -- the journal, read back --------------------------------------------------------------------------


@dataclass
class JobFacts:
    """One job as the journal has it: its state and every transition it went through, in order."""

    id: str
    job_id: str
    iss: str
    state: str
    attempts: int
    failure_code: str | None
    failure_retryable: bool | None
    has_result: bool
    moves: list[tuple[str | None, str]] = field(default_factory=list)

    def count(self, to_state: str) -> int:
        return sum(1 for _, to in self.moves if to == to_state)

    def resting(self, retry_budget: int) -> bool:
        """True once nothing will move the job without a requester or validator acting on it.

        A failure rests when it is not retryable or its retries are spent; a retryable failure with budget
        left is a job the scheduler dropped, i.e. a lost job.
        """
        if self.state == "failed":
            return not self.failure_retryable or self.attempts >= retry_budget
        return self.state in (
            "completed",
            "validated",
            "settled",
            "refunded",
            "cancelled",
            "rejected",
            "expired",
        )


@dataclass
class JournalView:
    """Every job and every recorded (iss, jti) nonce, read in one go."""

    jobs: dict[str, JobFacts]
    nonces: set[tuple[str, str]]

    def by_job_id(self) -> dict[tuple[str, str], JobFacts]:
        return {(j.iss, j.job_id): j for j in self.jobs.values()}


def journal_path(home: Path) -> Path:
    cfg = load_config(home)
    return resolve_path(resolve_path(home, cfg.node.state_dir), cfg.journal.filename)


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    # Read-only: the scenario must never change what the daemon will find (no checkpoint on close).
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
        yield conn


def read_journal(home: Path) -> JournalView:
    """The journal of the node at ``home`` as it is on disk now (the daemon may be running or dead)."""
    jobs: dict[str, JobFacts] = {}
    with _read_only(journal_path(home)) as conn:
        conn.execute("BEGIN")  # one snapshot for jobs, events and nonces
        for row in conn.execute(
            "SELECT id, job_id, iss, state, attempts, failure_code, failure_retryable, result_json FROM jobs"
        ):
            retryable = None if row[6] is None else bool(row[6])
            jobs[row[0]] = JobFacts(
                row[0], row[1], row[2], row[3], row[4], row[5], retryable, row[7] is not None
            )
        for job, src, dst in conn.execute(
            "SELECT job, from_state, to_state FROM events WHERE type = 'transition' ORDER BY seq"
        ):
            jobs[job].moves.append((src, dst))
        nonces = {(iss, jti) for iss, jti in conn.execute("SELECT iss, jti FROM nonces")}
        conn.execute("COMMIT")
    return JournalView(jobs, nonces)


def count_transitions(conn: sqlite3.Connection, from_state: str, to_state: str) -> int:
    """How many ``from_state -> to_state`` transitions the journal holds (one cheap query, for polling)."""
    sql = "SELECT count(*) FROM events WHERE from_state = ? AND to_state = ?"
    return int(conn.execute(sql, (from_state, to_state)).fetchone()[0])


@contextmanager
def watch_journal(home: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the node's journal, kept open to poll it (each query sees the latest)."""
    with _read_only(journal_path(home)) as conn:
        yield conn


def token_nonce(token: str) -> tuple[str, str]:
    """``(iss, jti)`` of a request token the scenario signed itself (its payload, not verified)."""
    import base64

    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["iss"]), str(claims["jti"])


# -- containers ---------------------------------------------------------------------------------------


def node_containers(did: str) -> set[str]:
    """IDs of every container labelled as this node's, running or not."""
    return labelled_containers(LABEL_NODE, did)


def remove_containers(ids: set[str]) -> None:
    """Remove containers a scenario found left over, so one red row does not leak into the next."""
    import docker

    client = docker.APIClient(base_url=DEFAULT_DOCKER_URL)
    try:
        for cid in ids:
            try:
                client.remove_container(cid, force=True)
            except docker.errors.NotFound:
                continue
    finally:
        client.close()


def stale_temp_blocks(home: Path) -> list[Path]:
    """Half-written block files (``.tmp-*``) in the node's blockstore."""
    cfg = load_config(home)
    return sorted(resolve_path(home, cfg.storage.blocks_dir).glob("*/.tmp-*"))
