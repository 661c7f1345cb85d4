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
node    a real daemon (``python -m cli.main run``, scheduler on). The clip is uploaded first
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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _common import (  # first: importing it puts the repository on sys.path for the project imports
    DOCKER_BASELINE,
    RUN_TIMEOUT_SECONDS,
    Daemon,
    JobRun,
    add_run_options,
    argv_hash_equals,
    bind,
    docker_run_argv,
    ensure_images,
    finish,
    http_session,
    interleave,
    job_envelope,
    median,
    node_summary,
    overhead_ms,
    parse_args,
    print_argv_hash,
    print_overhead,
    print_stages,
    print_walls,
    run_job,
    sandbox_output_dir,
    unique,
    upload,
)

from core.envelope import FfmpegTranscodeEnvelope, Mp4Spec, parse_envelope
from payments.keys import Signer, new_ed25519
from sandbox.ffmpeg import (
    CONTAINER_INPUT_PATH,
    CONTAINER_OUTPUT_DIR,
    Plan,
    ffmpeg_threads,
    make_test_clip,
    probe_file,
    run_plan,
    transcode_argv,
)
from storage import import_path

TARGET_NODE_OVER_DOCKER = 1.05
IMAGE_TAG = "hearth/ffmpeg:latest"
CLIP_WIDTH, CLIP_HEIGHT, CLIP_FPS = 1280, 720, 30
WARMUP_CLIP_SECONDS = 1.0
WARMUP_WIDTH, WARMUP_HEIGHT = 320, 240
DEFAULT_CLIP_SECONDS = 30.0
DEFAULT_MEMORY_MB = 1024
CLIP_TIMEOUT_SECONDS = 600.0
DAEMON_READY_TIMEOUT_SECONDS = 30.0
OUTPUT_FILE = "output.mp4"


@dataclass(frozen=True, slots=True)
class Job:
    """The one job all three runs do: its envelope and the plans compiled for host and container paths."""

    envelope: dict[str, Any]
    host: Plan
    container: Plan


# -- setup ---------------------------------------------------------------------------------------------


def envelope(job_id: str, cid: str, *, seconds: float, cpus: float, memory_mb: int) -> dict[str, Any]:
    """The measured preset as a requester sends it: mp4 720p H.264/AAC, the whole clip."""
    return job_envelope(
        job_id,
        "ffmpeg_transcode",
        cid,
        output_spec={"format": "mp4", "resolution": "720p", "codec": "h264", "audio_codec": "aac"},
        validation={"min_duration_seconds": seconds * 0.9, "required_streams": ["video", "audio"]},
        cpus=cpus,
        memory_mb=memory_mb,
        max_output_mb=200,
        max_price="5.00",
    )


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


# -- host and docker -------------------------------------------------------------------------------------


def time_host(job: Job, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    run_plan(job.host, timeout_seconds=RUN_TIMEOUT_SECONDS)
    return time.perf_counter() - t0


def docker_argv(job: Job, image: str, clip: Path, out: Path, *, cpus: float, memory_mb: int) -> list[str]:
    """``docker run`` of the container plan under the same controls the node's runner applies."""
    return docker_run_argv(
        job.container.argv,
        image,
        cpus=cpus,
        memory_mb=memory_mb,
        ipc=("--ipc", "none"),
        mounts=(bind(clip, CONTAINER_INPUT_PATH, readonly=True), bind(out, CONTAINER_OUTPUT_DIR)),
        workdir=CONTAINER_OUTPUT_DIR,
    )


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


async def node_job(daemon: Daemon, requester: Signer, env: dict[str, Any]) -> JobRun:
    """Submit ``env`` (its input an uploaded blob) and follow the job to its end; timed from the submit."""
    async with http_session() as session:
        return await run_job(session, daemon, requester, env)


# -- the bench -------------------------------------------------------------------------------------------


def cid_of(path: Path) -> str:
    return str(import_path(path).cid)


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
    node: list[JobRun] = field(default_factory=list)
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
        with s.daemon.running():
            self.warmups.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.warmup))).seconds)
            os.sync()
            self.node.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.job.envelope))))


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
    daemon = Daemon(tmpdir / "node", ready_timeout_seconds=DAEMON_READY_TIMEOUT_SECONDS)
    with daemon.running():
        (warm_cid,) = upload(daemon, warmup_clip.read_bytes())
        t0 = time.perf_counter()
        (cid,) = upload(daemon, clip.read_bytes())
        uploaded = time.perf_counter() - t0
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
    image = ensure_images(IMAGE_TAG)
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
        interleave(ways, args.repeat)
    return summarize(args, setup, facts, runs)


def summarize(args: argparse.Namespace, setup: Setup, facts: dict[str, Any], runs: Runs) -> dict[str, Any]:
    """The result document: medians, ratios, overheads, CIDs and targets."""
    node = node_summary(runs.node, facts["upload_seconds"])
    node_cids = {str(r.result["artifact_cid"]) for r in runs.node}
    h, d, n = median(runs.host), median(runs.docker), node["seconds"]
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
        "docker_baseline": DOCKER_BASELINE,
        "host": {"seconds": h, "runs": runs.host},
        "docker": {"seconds": d, "runs": runs.docker},
        "node": {**node, "warmup_seconds": [round(w, 3) for w in runs.warmups]},
        "ratio": ratio,
        "overhead_ms": overhead_ms(node, d),
        "cid": {
            "host": sorted(runs.host_cids),
            "docker": sorted(runs.docker_cids),
            "node": sorted(node_cids),
            "node_equals_host": node_cids == runs.host_cids and len(node_cids) == 1,
            "docker_equals_host": runs.docker_cids == runs.host_cids and len(runs.docker_cids) == 1,
        },
        "argv_hash_equals_node": argv_hash_equals(runs.node, setup.job.container.argv_hash),
        "targets": {
            f"node/docker<={TARGET_NODE_OVER_DOCKER:.2f}": ratio["node/docker"] <= TARGET_NODE_OVER_DOCKER
        },
    }


def report(r: dict[str, Any]) -> None:
    clip, ratio, cid = r["clip"], r["ratio"], r["cid"]
    print(
        f"clip           : {clip['seconds']:g} s {clip['width']}x{clip['height']}@{clip['fps']}, "
        f"{clip['bytes'] / 1e6:.1f} MB; preset mp4 720p h264/aac; cpus {r['cpus']:g}, threads {r['threads']}"
    )
    print(f"host ffmpeg    : {r['host']['seconds']:8.3f} s")
    print_walls(r)
    warm = ", ".join(f"{w:.2f}" for w in r["node"]["warmup_seconds"])
    print(f"                 (median of {r['repeat']}; warm-up jobs {warm} s, not counted)")
    print(f"node/docker    : {ratio['node/docker']:.3f}   (target <= {TARGET_NODE_OVER_DOCKER:.2f})")
    print(f"node/host      : {ratio['node/host']:.3f}")
    print(f"docker/host    : {ratio['docker/host']:.3f}")
    print_overhead(r["overhead_ms"])
    print_stages(r["node"])
    print(f"artifact CID   : {', '.join(cid['node'])}")
    print(f"node == host   : {str(cid['node_equals_host']).lower()}  (host CID {', '.join(cid['host'])})")
    print(f"docker == host : {str(cid['docker_equals_host']).lower()}")
    print_argv_hash(r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=DEFAULT_CLIP_SECONDS, help="length of the test clip")
    add_run_options(ap, ways="all three ways", memory_mb=DEFAULT_MEMORY_MB, dir_holds="the clip and outputs")
    args = parse_args(ap)
    return finish(run(args), as_json=args.json, report=report)


if __name__ == "__main__":
    sys.exit(main())
