"""What the end-to-end benchmarks (``transcode.py``, ``inference.py``) share: one job, node against docker.

Private to ``bench/``, not a benchmark itself. The scripts import it as ``_common`` (Python puts a script's
own directory first on ``sys.path``) and import it before any project module: importing it puts the
repository on ``sys.path``.

- setup: :func:`ensure_images` (``scripts/docker.sh``, then the image's ID), the requester's envelope
  skeleton (:func:`job_envelope`) and :func:`unique` job ids;
- docker: :func:`docker_run_argv`, ``docker run`` under the node's sandbox controls, and the output
  directory the sandbox user can write (:func:`sandbox_output_dir`);
- the node: :class:`Daemon` (``python -m cli.main run`` on a home of its own), blob uploads, and
  :func:`run_job`, a signed submit followed on the job's event stream to ``completed``;
- the bench: medians, the rotating interleave of the ways (:func:`interleave`), the parts of the result
  document and of the printed report that both write, and :func:`finish` (print, exit code).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.defaults import DEFAULT_PIDS_LIMIT, DEFAULT_SANDBOX_USER, DEFAULT_TMPFS_MB  # noqa: E402
from payments.keys import Signer, new_ed25519, save_key  # noqa: E402
from requester.client import sign_request  # noqa: E402
from sandbox._outdir import prepare_output_dir  # noqa: E402

DEFAULT_CPUS = float(min(2, os.cpu_count() or 1))
SETUP_TIMEOUT_SECONDS = 1800  # scripts/docker.sh on a fresh machine runs debootstrap and builds the images
RUN_TIMEOUT_SECONDS = 600  # one job, any way
DAEMON_STOP_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 60.0
LOG_TAIL_CHARS = 4000
FINISHED = frozenset({"completed", "failed", "cancelled", "rejected", "expired"})
DOCKER_BASELINE = "docker CLI (docker run --rm) with the node's sandbox controls"
JWT_HEADERS = {"Content-Type": "application/jwt"}


# -- setup ---------------------------------------------------------------------------------------------


def ensure_images(tag: str) -> str:
    """Make sure the engine runs and the images exist (``scripts/docker.sh``); the ID of image ``tag``."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "docker.sh")],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_SECONDS,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/docker.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    inspect = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        check=True,
    )
    return inspect.stdout.strip()


def job_envelope(
    job_id: str,
    kind: str,
    cid: str,
    *,
    output_spec: dict[str, Any],
    validation: dict[str, Any],
    cpus: float,
    memory_mb: int,
    max_output_mb: int,
    max_price: str,
) -> dict[str, Any]:
    """A job as a requester sends it: CPU only, the bench's timeout, a local-chain payment block."""
    return {
        "job_id": job_id,
        "kind": kind,
        "input_uri": cid,
        "output_spec": output_spec,
        "limits": {
            "timeout_seconds": RUN_TIMEOUT_SECONDS,
            "max_output_mb": max_output_mb,
            "cpus": cpus,
            "memory_mb": memory_mb,
            "gpus": 0,
        },
        "validation": validation,
        "payment": {
            "max_price": max_price,
            "currency": "usdc",
            "chain_id": 31337,
            "escrow": "0x" + "e" * 40,
            "payer": "0x" + "a" * 40,
            "validator": "did:pkh:eip155:31337:0x" + "b" * 40,
        },
    }


def unique(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` under a new job id: a fresh job, not a resubmission of an earlier one."""
    return {**env, "job_id": f"{env['job_id']}-{secrets.token_hex(6)}"}


# -- docker ----------------------------------------------------------------------------------------------


def sandbox_output_dir(path: Path) -> None:
    """A fresh output directory the sandbox user can write, made as the node's runner makes it."""
    shutil.rmtree(path, ignore_errors=True)
    prepare_output_dir(path, DEFAULT_SANDBOX_USER)


def group_add() -> list[str]:
    """``--group-add`` flags matching :func:`sandbox_output_dir`: the caller's group unless it is root."""
    return [] if os.geteuid() == 0 else ["--group-add", str(os.getegid())]


def bind(source: Path, target: str, *, readonly: bool = False) -> str:
    """A ``--mount`` value: ``source`` (resolved) bound at ``target``."""
    return f"type=bind,source={source.resolve()},target={target}" + (",readonly" if readonly else "")


def docker_run_argv(
    argv: Sequence[str],
    image: str,
    *,
    cpus: float,
    memory_mb: int,
    ipc: Sequence[str],
    mounts: Sequence[str],
    workdir: str,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """``docker run`` of ``argv`` in ``image`` under the same controls the node's runner applies.

    ``ipc`` holds the IPC flags (the mode, and ``--shm-size`` where there is one), ``mounts`` the
    ``--mount`` values (:func:`bind`), ``env`` the container's environment.
    """
    env_flags = [flag for key, value in (env or {}).items() for flag in ("--env", f"{key}={value}")]
    return [
        "docker",
        "run",
        "--rm",
        "--init",
        "--read-only",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--user",
        DEFAULT_SANDBOX_USER,
        *group_add(),
        *ipc,
        "--pids-limit",
        str(DEFAULT_PIDS_LIMIT),
        "--memory",
        f"{memory_mb}m",
        "--memory-swap",
        f"{memory_mb}m",
        "--cpus",
        f"{cpus:g}",
        "--ulimit",
        "core=0",
        "--log-driver",
        "none",
        "--tmpfs",
        f"/tmp:rw,noexec,nosuid,nodev,size={DEFAULT_TMPFS_MB}m",
        *(flag for mount in mounts for flag in ("--mount", mount)),
        "--workdir",
        workdir,
        *env_flags,
        "--entrypoint",
        argv[0],
        image,
        *argv[1:],
    ]


# -- the node --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``python -m cli.main run`` on a home of its own, scheduler on, log to a file; restartable.

    ``config`` is appended to the ``node.toml`` written at construction (after ``[api]`` and
    ``[scheduler]``).
    """

    def __init__(self, home: Path, *, ready_timeout_seconds: float, config: str = "") -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "daemon.log"
        self.ready_timeout_seconds = ready_timeout_seconds
        home.mkdir(parents=True)
        node_key = new_ed25519()
        save_key(node_key, home / "node.key")
        self.did = node_key.did
        (home / "node.toml").write_text(
            f'[api]\nhost = "127.0.0.1"\nport = {self.port}\n[scheduler]\npaused = false\n' + config
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe would stall the daemon
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "run", "--home", str(self.home), "--port", str(self.port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HEARTH_LOGGING__LEVEL": "WARNING"},
            )
        deadline = time.monotonic() + self.ready_timeout_seconds
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"the daemon was not ready in {self.ready_timeout_seconds:.0f} s")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(DAEMON_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @contextmanager
    def running(self) -> Iterator[Daemon]:
        """Started for the ``with`` block, stopped after it however it ends."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS))


async def _upload(session: aiohttp.ClientSession, url: str, data: bytes) -> str:
    async with session.put(f"{url}/v1/blobs", data=io.BytesIO(data)) as r:
        if r.status != 201:
            raise RuntimeError(f"upload failed ({r.status}): {await r.text()}")
        return str((await r.json())["cid"])


async def _upload_all(daemon: Daemon, blobs: list[bytes]) -> list[str]:
    async with http_session() as session:
        return [await _upload(session, daemon.url, data) for data in blobs]


def upload(daemon: Daemon, *blobs: bytes) -> list[str]:
    """``PUT /v1/blobs`` each of ``blobs`` in turn, on one connection pool; their CIDs."""
    return asyncio.run(_upload_all(daemon, list(blobs)))


async def follow(session: aiohttp.ClientSession, url: str, job: str) -> list[dict[str, Any]]:
    """The job's events, from the SSE stream, up to its first terminal transition."""
    seen: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=RUN_TIMEOUT_SECONDS)
    async with session.get(f"{url}/v1/jobs/{job}/events", timeout=timeout) as r:
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: ") :])
            seen.append(event)
            if event["type"] == "transition" and event["to"] in FINISHED:
                return seen
    raise RuntimeError(f"the event stream of {job} ended before the job did")


def stage_offsets(events: list[dict[str, Any]], origin: float) -> dict[str, float]:
    """When each state and executor stage began, in seconds after ``origin`` (the node's clock is ours).

    A stage whose progress reached its end has a ``"<stage> done"`` entry too (the workload's own progress
    report at 100 %): from there to the next stage the container is finishing, not the node working. For a
    vLLM batch that is run_batch writing its output and shutting its engine down, some 2-7 s here, which a
    bare ``docker run`` spends as well.
    """
    offsets: dict[str, float] = {}
    for event in events:
        data = event.get("data") or {}
        name = event["to"] if event["type"] == "transition" else data.get("stage")
        names = [name, f"{name} done"] if event["type"] == "progress" and data.get("done") else [name]
        for key in names:
            if key and key not in offsets:
                offsets[key] = round(event["at"] - origin, 3)
    return offsets


@dataclass(frozen=True, slots=True)
class JobRun:
    """One job through the daemon: its id, submit-to-completed wall time, the result, stage starts."""

    job: str
    seconds: float
    submit_seconds: float
    result: dict[str, Any]
    stages: dict[str, float]


async def run_job(
    session: aiohttp.ClientSession, daemon: Daemon, requester: Signer, env: dict[str, Any]
) -> JobRun:
    """Submit ``env`` (its input an uploaded blob) and follow the job to its end; timed from the submit."""
    token = sign_request(requester, daemon.did, {"job": env})
    origin, t0 = time.time(), time.perf_counter()
    async with session.post(f"{daemon.url}/v1/jobs", data=token, headers=JWT_HEADERS) as r:
        body = await r.json()
    submitted = time.perf_counter() - t0
    if r.status != 201:
        raise RuntimeError(f"submit refused ({r.status}): {body}")
    return await completed(session, daemon, str(body["job"]["id"]), origin=origin, t0=t0, submitted=submitted)


async def completed(
    session: aiohttp.ClientSession,
    daemon: Daemon,
    job: str,
    *,
    origin: float,
    t0: float,
    submitted: float = 0.0,
) -> JobRun:
    """Follow a submitted ``job`` to its end (it must complete) and fetch its result; timed from ``t0``
    (``time.perf_counter``), stages from ``origin`` (``time.time``)."""
    events = await follow(session, daemon.url, job)
    seconds = time.perf_counter() - t0
    if events[-1]["to"] != "completed":
        raise RuntimeError(f"job {job} ended {events[-1]['to']}: {events[-1]}\n{daemon.tail()}")
    async with session.get(f"{daemon.url}/v1/jobs/{job}/result") as r:
        result: dict[str, Any] = (await r.json())["result"]
    return JobRun(
        job=job,
        seconds=seconds,
        submit_seconds=submitted,
        result=result,
        stages=stage_offsets(events, origin),
    )


# -- the bench -------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleave(ways: list[Callable[[], None]], repeat: int) -> None:
    """Run every way ``repeat`` times, the order rotating by one each round, after an ``os.sync()`` each."""
    for i in range(repeat):
        k = i % len(ways)
        for way in ways[k:] + ways[:k]:
            # Nothing left to write back: another run's dirty output would otherwise be flushed on
            # this run's time (the node fsyncs its journal and its blocks).
            os.sync()
            way()


def node_summary(runs: list[JobRun], upload_seconds: float) -> dict[str, Any]:
    """The node's part of the result document that both benches write: walls, median, result times."""
    walls = [r.seconds for r in runs]
    return {
        "seconds": median(walls),
        "runs": walls,
        "submit_seconds": [round(r.submit_seconds, 4) for r in runs],
        "runtime_seconds": [float(r.result["runtime_seconds"]) for r in runs],
        "container_seconds": [float(r.result["container_seconds"]) for r in runs],
        "stages": [r.stages for r in runs],
        "upload_seconds": round(upload_seconds, 3),
    }


def overhead_ms(node: dict[str, Any], docker_seconds: float) -> dict[str, float]:
    """The node's overheads, from :func:`node_summary`: over the docker wall, and inside its own result."""
    runtime, container = node["runtime_seconds"], node["container_seconds"]
    return {
        "node_minus_docker": (node["seconds"] - docker_seconds) * 1000,
        "runtime_minus_container": median([r - c for r, c in zip(runtime, container, strict=True)]) * 1000,
        "node_minus_runtime": median([w - r for w, r in zip(node["runs"], runtime, strict=True)]) * 1000,
    }


def argv_hash_equals(runs: list[JobRun], argv_hash: str) -> bool:
    """Whether every run's provenance recorded ``argv_hash``, the hash of the baseline's argv."""
    return {str(r.result["provenance"]["argv_hash"]) for r in runs} == {argv_hash}


def print_walls(r: dict[str, Any]) -> None:
    print(f"docker run     : {r['docker']['seconds']:8.3f} s  ({r['docker_baseline']})")
    print(f"hearth node    : {r['node']['seconds']:8.3f} s  (signed submit -> completed)")


def print_overhead(ov: dict[str, float]) -> None:
    print(f"node overhead  : {ov['node_minus_docker']:8.0f} ms  node wall - docker wall")
    print(f"                 {ov['runtime_minus_container']:8.0f} ms  runtime_seconds - container_seconds")
    print(f"                 {ov['node_minus_runtime']:8.0f} ms  node wall - runtime_seconds")


def print_stages(node: dict[str, Any]) -> None:
    stages = ", ".join(f"{k} {v:.2f}" for k, v in node["stages"][0].items())
    print(f"node stages    : {stages}  (s after the submit, first run)")


def print_argv_hash(r: dict[str, Any]) -> None:
    print(f"argv == node's : {str(r['argv_hash_equals_node']).lower()}  (argv hash the node recorded)")


def add_run_options(ap: argparse.ArgumentParser, *, ways: str, memory_mb: int, dir_holds: str) -> None:
    """``--cpus``, ``--memory-mb``, ``--repeat``, ``--dir`` and ``--json``, in that order."""
    ap.add_argument("--cpus", type=float, default=DEFAULT_CPUS, help=f"the job's CPU limit, {ways}")
    ap.add_argument("--memory-mb", type=int, default=memory_mb, help="the job's memory limit")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each way; the median counts")
    ap.add_argument("--dir", default=None, help=f"where {dir_holds} go (default: $TMPDIR)")
    ap.add_argument("--json", action="store_true")


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def finish(r: dict[str, Any], *, as_json: bool, report: Callable[[dict[str, Any]], None]) -> int:
    """Print the result document (JSON, or ``report``'s lines); 0 when every target is met, else 1."""
    if as_json:
        print(json.dumps(r, indent=2))
    else:
        report(r)
    return 0 if all(r["targets"].values()) else 1
