"""Transcode benchmark: one 720p clip through the whole node path against the same ffmpeg run bare, same run.

Three runs of one job, on the same synthetic clip (``--seconds`` long, 1280x720 at 30 fps, made at start in
a temporary directory), with the same preset (mp4 720p, H.264/AAC), the same argv (``transcode_argv`` on
the probed input, with the thread count the node uses for ``--cpus``) and the same CPU limit:

host    bare host ffmpeg running the plan's argv on host paths (``sandbox.ffmpeg.run_plan``).
docker  the plain ``docker run`` CLI running the same argv (container paths) in the same image, by ID,
        under the node's sandbox controls: ``--cpus``, ``--memory`` without swap, read-only root, the input
        mounted read-only, ``--network none``, every capability dropped, ``no-new-privileges``, the
        non-root sandbox user, pids limit, tmpfs ``/tmp``, ``--init``, ``--rm``. The honest baseline: what
        the node adds is everything the node does around that one container.
node    a real daemon (``python -m node.cli run``, scheduler on). The clip is uploaded first
        (``PUT /v1/blobs``, not timed); then timed from the signed submit (a bare request JWT: bid and
        accept in one step) until the job's event stream reports ``completed``: admission, queueing, the
        blob fetch, the sandboxed ffprobe, the container, the output checks and the blockstore import.

Each node run starts the daemon afresh (same home) and runs a warm-up job on a small clip first, so the
once-per-process work (imports, the image ID, the tool versions) is not billed to the measured job, while
the measured job is the first the daemon sees on its input, as a requester's new job is: the node caches
its quote-time probe of an input, which a second job on the same clip would skip. Each docker run
likewise follows a throwaway container of the image. The three ways are
interleaved ``--repeat`` times in a rotating order, after an ``os.sync()`` each; medians count.

Prints seconds for each, the ratios node/docker, node/host and docker/host, the node's fixed per-job
overhead in ms (node - docker wall; and the result's ``runtime_seconds - container_seconds``), and whether
the node's artifact CID equals the CID of the host run's output (bit-exact presets; host and image both
carry Debian bookworm's ffmpeg 5.1, so the bytes are expected equal; reported, not a target).

Target: node/docker <= 1.05. Exits 1 when it is missed; a failed run raises.

    .venv/bin/python bench/transcode.py [--seconds 30] [--cpus 2] [--memory-mb 1024] [--repeat 1]
                                        [--dir DIR] [--json]
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
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.client import sign_request  # noqa: E402
from node.config import DEFAULT_PIDS_LIMIT, DEFAULT_SANDBOX_USER, DEFAULT_TMPFS_MB  # noqa: E402
from node.envelope import FfmpegTranscodeEnvelope, Mp4Spec, parse_envelope  # noqa: E402
from node.executor import ffmpeg_threads  # noqa: E402
from payments.keys import Signer, new_ed25519, save_key  # noqa: E402
from sandbox.ffmpeg import (  # noqa: E402
    CONTAINER_INPUT_PATH,
    CONTAINER_OUTPUT_DIR,
    Plan,
    make_test_clip,
    probe_file,
    run_plan,
    transcode_argv,
)
from storage import import_path  # noqa: E402

TARGET_NODE_OVER_DOCKER = 1.05
IMAGE_TAG = "hearth/ffmpeg:latest"
CLIP_WIDTH, CLIP_HEIGHT, CLIP_FPS = 1280, 720, 30
WARMUP_CLIP_SECONDS = 1.0
WARMUP_WIDTH, WARMUP_HEIGHT = 320, 240
DEFAULT_CLIP_SECONDS = 30.0
DEFAULT_CPUS = float(min(2, os.cpu_count() or 1))
DEFAULT_MEMORY_MB = 1024
SETUP_TIMEOUT_SECONDS = 1800  # scripts/docker.sh on a fresh machine runs debootstrap and an image build
CLIP_TIMEOUT_SECONDS = 600.0
RUN_TIMEOUT_SECONDS = 600  # one transcode, any of the three ways
DAEMON_READY_TIMEOUT_SECONDS = 30.0
DAEMON_STOP_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 60.0
LOG_TAIL_CHARS = 4000
FINISHED = frozenset({"completed", "failed", "cancelled", "rejected", "expired"})
OUTPUT_FILE = "output.mp4"


@dataclass(frozen=True, slots=True)
class Job:
    """The one job all three runs do: its envelope and the plans compiled for host and container paths."""

    envelope: dict[str, Any]
    host: Plan
    container: Plan


@dataclass(frozen=True, slots=True)
class NodeRun:
    """One job through the daemon: submit-to-completed wall time, the result and when each stage began."""

    seconds: float
    submit_seconds: float
    result: dict[str, Any]
    stages: dict[str, float]


# -- setup ---------------------------------------------------------------------------------------------


def ensure_images() -> str:
    """Make sure the engine runs and the images exist (``scripts/docker.sh``); the ffmpeg image's ID."""
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
        ["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE_TAG],
        capture_output=True,
        text=True,
        check=True,
    )
    return inspect.stdout.strip()


def envelope(job_id: str, cid: str, *, seconds: float, cpus: float, memory_mb: int) -> dict[str, Any]:
    """The measured preset as a requester sends it: mp4 720p H.264/AAC, the whole clip."""
    return {
        "job_id": job_id,
        "kind": "ffmpeg_transcode",
        "input_uri": cid,
        "output_spec": {"format": "mp4", "resolution": "720p", "codec": "h264", "audio_codec": "aac"},
        "limits": {
            "timeout_seconds": RUN_TIMEOUT_SECONDS,
            "max_output_mb": 200,
            "cpus": cpus,
            "memory_mb": memory_mb,
            "gpus": 0,
        },
        "validation": {"min_duration_seconds": seconds * 0.9, "required_streams": ["video", "audio"]},
        "payment": {
            "max_price": "5.00",
            "currency": "usdc",
            "chain_id": 31337,
            "escrow": "0x" + "e" * 40,
            "payer": "0x" + "a" * 40,
            "validator": "did:pkh:eip155:31337:0x" + "b" * 40,
        },
    }


def compile_job(clip: Path, host_out: Path, env: dict[str, Any]) -> Job:
    """Both plans of ``env`` for ``clip``, with the threads the node derives from the CPU limit."""
    parsed = parse_envelope(env)
    if not (isinstance(parsed, FfmpegTranscodeEnvelope) and isinstance(parsed.output_spec, Mp4Spec)):
        raise TypeError("the bench measures an mp4 ffmpeg_transcode job")
    info = probe_file(str(clip))
    threads = ffmpeg_threads(parsed.limits.cpus)
    spec = parsed.output_spec
    return Job(
        envelope=env,
        host=transcode_argv(spec, info=info, input_path=str(clip), output_dir=str(host_out), threads=threads),
        container=transcode_argv(spec, info=info, threads=threads),
    )


def unique(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` under a new job id: a fresh job, not a resubmission of an earlier one."""
    return {**env, "job_id": f"{env['job_id']}-{secrets.token_hex(6)}"}


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- host and docker -------------------------------------------------------------------------------------


def time_host(job: Job, out: Path) -> float:
    fresh_dir(out)
    t0 = time.perf_counter()
    run_plan(job.host, timeout_seconds=RUN_TIMEOUT_SECONDS)
    return time.perf_counter() - t0


def sandbox_output_dir(path: Path) -> None:
    """Let the sandbox user write ``path``, as the node's runner does for its output directories."""
    fresh_dir(path)
    uid, gid = (int(part) for part in DEFAULT_SANDBOX_USER.split(":"))
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
        os.chmod(path, 0o700)
    else:
        os.chmod(path, 0o2770)  # shared through the caller's group, which the container user joins


def group_add() -> list[str]:
    """``--group-add`` flags matching :func:`sandbox_output_dir`: the caller's group unless it is root."""
    return [] if os.geteuid() == 0 else ["--group-add", str(os.getegid())]


def docker_argv(job: Job, image: str, clip: Path, out: Path, *, cpus: float, memory_mb: int) -> list[str]:
    """``docker run`` of the container plan under the same controls the node's runner applies."""
    plan = job.container.argv
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
        "--ipc",
        "none",
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
        "--mount",
        f"type=bind,source={clip.resolve()},target={CONTAINER_INPUT_PATH},readonly",
        "--mount",
        f"type=bind,source={out.resolve()},target={CONTAINER_OUTPUT_DIR}",
        "--workdir",
        CONTAINER_OUTPUT_DIR,
        "--entrypoint",
        plan[0],
        image,
        *plan[1:],
    ]


def warm_docker(image: str) -> None:
    """A throwaway container of the image, so the measured one starts as warm as the node's does."""
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "ffmpeg", image, "-version"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=RUN_TIMEOUT_SECONDS,
        check=True,
    )


def time_docker(argv: list[str]) -> float:
    # stdout (ffmpeg's progress) is attached and read, as the node reads it; here nobody parses it.
    t0 = time.perf_counter()
    subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=RUN_TIMEOUT_SECONDS, check=True
    )
    return time.perf_counter() - t0


# -- the node --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``python -m node.cli run`` on a home of its own, scheduler on, log to a file; restartable."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "daemon.log"
        home.mkdir(parents=True)
        node_key = new_ed25519()
        save_key(node_key, home / "node.key")
        self.did = node_key.did
        (home / "node.toml").write_text(
            f'[api]\nhost = "127.0.0.1"\nport = {self.port}\n[scheduler]\npaused = false\n'
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe would stall the daemon
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "run", "--home", str(self.home), "--port", str(self.port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HEARTH_LOGGING__LEVEL": "WARNING"},
            )
        deadline = time.monotonic() + DAEMON_READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"the daemon was not ready in {DAEMON_READY_TIMEOUT_SECONDS:.0f} s")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(DAEMON_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


async def upload(session: aiohttp.ClientSession, url: str, data: bytes) -> str:
    async with session.put(f"{url}/v1/blobs", data=io.BytesIO(data)) as r:
        if r.status != 201:
            raise RuntimeError(f"upload failed ({r.status}): {await r.text()}")
        return str((await r.json())["cid"])


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
    """When each state and executor stage began, in seconds after ``origin`` (the node's clock is ours)."""
    offsets: dict[str, float] = {}
    for event in events:
        name = event["to"] if event["type"] == "transition" else (event.get("data") or {}).get("stage")
        if name and name not in offsets:
            offsets[name] = round(event["at"] - origin, 3)
    return offsets


async def node_job(daemon: Daemon, requester: Signer, env: dict[str, Any]) -> NodeRun:
    """Submit ``env`` (its input an uploaded blob) and follow the job to its end; timed from the submit."""
    token = sign_request(requester, daemon.did, {"job": env})
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        origin, t0 = time.time(), time.perf_counter()
        async with session.post(
            f"{daemon.url}/v1/jobs", data=token, headers={"Content-Type": "application/jwt"}
        ) as r:
            body = await r.json()
        submitted = time.perf_counter() - t0
        if r.status != 201:
            raise RuntimeError(f"submit refused ({r.status}): {body}")
        job = str(body["job"]["id"])
        events = await follow(session, daemon.url, job)
        seconds = time.perf_counter() - t0
        if events[-1]["to"] != "completed":
            raise RuntimeError(f"job {job} ended {events[-1]['to']}: {events[-1]}\n{daemon.tail()}")
        async with session.get(f"{daemon.url}/v1/jobs/{job}/result") as r:
            result: dict[str, Any] = (await r.json())["result"]
    return NodeRun(
        seconds=seconds, submit_seconds=submitted, result=result, stages=stage_offsets(events, origin)
    )


async def upload_file(daemon: Daemon, data: bytes) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session:
        return await upload(session, daemon.url, data)


# -- the bench -------------------------------------------------------------------------------------------


def cid_of(path: Path) -> str:
    return str(import_path(path).cid)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


@dataclass(frozen=True, slots=True)
class Setup:
    """What every repeat shares: the clip, the job, the image, the output folders and the node's home."""

    clip: Path
    job: Job
    image: str
    warmup: dict[str, Any]
    host_out: Path
    docker_out: Path
    daemon: Daemon
    requester: Signer


@dataclass(slots=True)
class Runs:
    """What the repeats measured, way by way, and the output CIDs they made."""

    host: list[float] = field(default_factory=list)
    docker: list[float] = field(default_factory=list)
    node: list[NodeRun] = field(default_factory=list)
    warmups: list[float] = field(default_factory=list)
    host_cids: set[str] = field(default_factory=set)
    docker_cids: set[str] = field(default_factory=set)

    def run_host(self, s: Setup) -> None:
        self.host.append(time_host(s.job, s.host_out))
        self.host_cids.add(cid_of(s.host_out / OUTPUT_FILE))

    def run_docker(self, s: Setup, argv: list[str]) -> None:
        warm_docker(s.image)  # the counterpart of the node's warm-up job
        sandbox_output_dir(s.docker_out)
        os.sync()
        self.docker.append(time_docker(argv))
        self.docker_cids.add(cid_of(s.docker_out / OUTPUT_FILE))

    def run_node(self, s: Setup) -> None:
        # A fresh daemon each time: the measured job is then the first on its input, as a requester's new
        # job is (the node caches quote-time probes by input), and the warm-up job takes the once-per-process
        # costs. Job ids are new each time, or the node would answer with the earlier job.
        s.daemon.start()
        try:
            self.warmups.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.warmup))).seconds)
            os.sync()
            self.node.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.job.envelope))))
        finally:
            s.daemon.stop()


def prepare(tmpdir: Path, args: argparse.Namespace, image: str) -> tuple[Setup, dict[str, Any]]:
    """Make the clips, upload them to a fresh node home and compile the job; also what setup measured."""
    limits = {"cpus": args.cpus, "memory_mb": args.memory_mb}
    t0 = time.perf_counter()
    clip = make_test_clip(
        tmpdir / "clip.mp4",
        seconds=args.seconds,
        width=CLIP_WIDTH,
        height=CLIP_HEIGHT,
        fps=CLIP_FPS,
        timeout_seconds=CLIP_TIMEOUT_SECONDS,
    )
    made = time.perf_counter() - t0
    warmup_clip = make_test_clip(
        tmpdir / "warmup.mp4", seconds=WARMUP_CLIP_SECONDS, width=WARMUP_WIDTH, height=WARMUP_HEIGHT
    )
    daemon = Daemon(tmpdir / "node")
    daemon.start()
    try:
        warm_cid = asyncio.run(upload_file(daemon, warmup_clip.read_bytes()))
        t0 = time.perf_counter()
        cid = asyncio.run(upload_file(daemon, clip.read_bytes()))
        uploaded = time.perf_counter() - t0
    finally:
        daemon.stop()
    host_out = tmpdir / "host-out"
    setup = Setup(
        clip=clip,
        job=compile_job(clip, host_out, envelope("bench", cid, seconds=args.seconds, **limits)),
        image=image,
        warmup=envelope("warmup", warm_cid, seconds=WARMUP_CLIP_SECONDS, **limits),
        host_out=host_out,
        docker_out=tmpdir / "docker-out",
        daemon=daemon,
        requester=new_ed25519(),
    )
    facts = {"bytes": clip.stat().st_size, "made_in_seconds": round(made, 3), "upload_seconds": uploaded}
    return setup, facts


def run(args: argparse.Namespace) -> dict[str, Any]:
    image = ensure_images()
    runs = Runs()
    with tempfile.TemporaryDirectory(prefix="hearth-bench-transcode-", dir=args.dir) as tmp:
        setup, facts = prepare(Path(tmp), args, image)
        argv = docker_argv(
            setup.job, image, setup.clip, setup.docker_out, cpus=args.cpus, memory_mb=args.memory_mb
        )
        ways: list[Callable[[], None]] = [
            partial(runs.run_host, setup),
            partial(runs.run_docker, setup, argv),
            partial(runs.run_node, setup),
        ]
        for i in range(args.repeat):
            for way in ways[i % 3 :] + ways[: i % 3]:
                # Nothing left to write back: another run's dirty output would otherwise be flushed on
                # this run's time (the node fsyncs its journal and its blocks).
                os.sync()
                way()
    return summarize(args, setup, facts, runs)


def summarize(args: argparse.Namespace, setup: Setup, facts: dict[str, Any], runs: Runs) -> dict[str, Any]:
    """The result document: medians, ratios, overheads, CIDs and targets."""
    node_s = [r.seconds for r in runs.node]
    runtime = [float(r.result["runtime_seconds"]) for r in runs.node]
    container = [float(r.result["container_seconds"]) for r in runs.node]
    node_cids = {str(r.result["artifact_cid"]) for r in runs.node}
    argv_hashes = {str(r.result["provenance"]["argv_hash"]) for r in runs.node}
    h, d, n = median(runs.host), median(runs.docker), median(node_s)
    ratio = {"node/docker": n / d, "node/host": n / h, "docker/host": d / h}
    return {
        "clip": {
            "seconds": args.seconds,
            "width": CLIP_WIDTH,
            "height": CLIP_HEIGHT,
            "fps": CLIP_FPS,
            "bytes": facts["bytes"],
            "made_in_seconds": facts["made_in_seconds"],
        },
        "preset": setup.job.envelope["output_spec"],
        "cpus": args.cpus,
        "memory_mb": args.memory_mb,
        "threads": setup.job.container.threads,
        "repeat": args.repeat,
        "image": setup.image,
        "docker_baseline": "docker CLI (docker run --rm) with the node's sandbox controls",
        "host": {"seconds": h, "runs": runs.host},
        "docker": {"seconds": d, "runs": runs.docker},
        "node": {
            "seconds": n,
            "runs": node_s,
            "submit_seconds": [round(r.submit_seconds, 4) for r in runs.node],
            "runtime_seconds": runtime,
            "container_seconds": container,
            "stages": [r.stages for r in runs.node],
            "upload_seconds": round(facts["upload_seconds"], 3),
            "warmup_seconds": [round(w, 3) for w in runs.warmups],
        },
        "ratio": ratio,
        "overhead_ms": {
            "node_minus_docker": (n - d) * 1000,
            "runtime_minus_container": median([r - c for r, c in zip(runtime, container, strict=True)])
            * 1000,
            "node_minus_runtime": median([w - r for w, r in zip(node_s, runtime, strict=True)]) * 1000,
        },
        "cid": {
            "host": sorted(runs.host_cids),
            "docker": sorted(runs.docker_cids),
            "node": sorted(node_cids),
            "node_equals_host": node_cids == runs.host_cids and len(node_cids) == 1,
            "docker_equals_host": runs.docker_cids == runs.host_cids and len(runs.docker_cids) == 1,
        },
        "argv_hash_equals_node": argv_hashes == {setup.job.container.argv_hash},
        "targets": {
            f"node/docker<={TARGET_NODE_OVER_DOCKER:.2f}": ratio["node/docker"] <= TARGET_NODE_OVER_DOCKER
        },
    }


def report(r: dict[str, Any]) -> None:
    clip, ratio, ov, cid = r["clip"], r["ratio"], r["overhead_ms"], r["cid"]
    print(
        f"clip           : {clip['seconds']:g} s {clip['width']}x{clip['height']}@{clip['fps']}, "
        f"{clip['bytes'] / 1e6:.1f} MB; preset mp4 720p h264/aac; cpus {r['cpus']:g}, threads {r['threads']}"
    )
    print(f"host ffmpeg    : {r['host']['seconds']:8.3f} s")
    print(f"docker run     : {r['docker']['seconds']:8.3f} s  ({r['docker_baseline']})")
    print(f"hearth node    : {r['node']['seconds']:8.3f} s  (signed submit -> completed)")
    warm = ", ".join(f"{w:.2f}" for w in r["node"]["warmup_seconds"])
    print(f"                 (median of {r['repeat']}; warm-up jobs {warm} s, not counted)")
    print(f"node/docker    : {ratio['node/docker']:.3f}   (target <= {TARGET_NODE_OVER_DOCKER:.2f})")
    print(f"node/host      : {ratio['node/host']:.3f}")
    print(f"docker/host    : {ratio['docker/host']:.3f}")
    print(f"node overhead  : {ov['node_minus_docker']:8.0f} ms  node wall - docker wall")
    print(f"                 {ov['runtime_minus_container']:8.0f} ms  runtime_seconds - container_seconds")
    print(f"                 {ov['node_minus_runtime']:8.0f} ms  node wall - runtime_seconds")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in r["node"]["stages"][0].items())
    print(f"node stages    : {stages}  (s after the submit, first run)")
    print(f"artifact CID   : {', '.join(cid['node'])}")
    print(f"node == host   : {str(cid['node_equals_host']).lower()}  (host CID {', '.join(cid['host'])})")
    print(f"docker == host : {str(cid['docker_equals_host']).lower()}")
    print(f"argv == node's : {str(r['argv_hash_equals_node']).lower()}  (argv hash the node recorded)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=DEFAULT_CLIP_SECONDS, help="length of the test clip")
    ap.add_argument("--cpus", type=float, default=DEFAULT_CPUS, help="the job's CPU limit, all three ways")
    ap.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB, help="the job's memory limit")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each way; the median counts")
    ap.add_argument("--dir", default=None, help="where the clip and outputs go (default: $TMPDIR)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        report(r)
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
