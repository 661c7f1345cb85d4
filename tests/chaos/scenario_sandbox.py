"""Scoreboard rows for the sandbox and the media path: escapes, resource kills, hostile media and bombs.

- ``sandbox battery``: every escape check of tests/sandbox/battery.py (engine socket, kernel interfaces,
  devices and mknod, setuid, namespaces, the engine's own view) in the real hardened container, per run.
- ``resource kills through the daemon``: per run, three real transcodes that overrun memory, time and
  output end as ``oom_killed``, ``timeout`` and ``output_cap_exceeded`` while /healthz answers promptly.
- ``hostile media and decompression bomb``: per run, ~17 hostile inputs (seeded variants change every
  run) refused at quote time within a bound, the same met by the run, and an 8K H.264 bomb (~140 KB that
  decodes to ~106 GB) stopped by its time limit and by its memory limit, each with its own code.

Tests in tests/sandbox/ hold the per-case logic; this module only repeats it and counts.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import docker

from core.defaults import DEFAULT_DOCKER_URL
from core.errors import HearthError
from payments.keys import new_ed25519
from sandbox.runner import LABEL_NODE, SandboxRunner
from tests.chaos.harness import seeded
from tests.chaos.scoreboard import Row, scenario
from tests.sandbox.attacks import MediaKit, Tally, quote_round, resource_round, run_round
from tests.sandbox.battery import BATTERY, Arena
from tests.sandbox.faultnode import AttackedNode

FFMPEG_IMAGE = "hearth/ffmpeg:latest"


@scenario("sandbox battery", stated=15, short=1)
def sandbox_battery(count: int, workdir: Path) -> Row:
    row = Row("sandbox battery", count)
    asyncio.run(_battery(row, count, workdir))
    return row


@scenario("resource kills through the daemon", stated=8, short=1)
def resource_kills(count: int, workdir: Path) -> Row:
    row = Row("resource kills through the daemon", count)
    kit = MediaKit.make(workdir / "media")
    node = AttackedNode(workdir / "home", new_ed25519())
    node.start()
    try:
        for i in range(count):
            _record(row, asyncio.run(resource_round(node, kit, i)))
    finally:
        node.stop()
    return row


@scenario("hostile media and decompression bomb", stated=4, short=1)
def hostile_media(count: int, workdir: Path) -> Row:
    row = Row("hostile media and decompression bomb", count)
    kit = MediaKit.make(workdir / "media")
    row.good["bomb_kb"] = kit.bomb.file_bytes // 1024
    row.good["bomb_decoded_gb"] = kit.bomb.decoded_bytes // 10**9
    rng = seeded(row)
    node = AttackedNode(workdir / "home", new_ed25519())
    node.start()
    try:
        for i in range(count):
            seed = rng.randrange(2**32)
            tally = asyncio.run(quote_round(node, kit, workdir / f"round-{i}", i, seed))
            tally.add(run_round(node, kit, workdir / f"round-{i}-run", i, seed))
            _record(row, tally)
    finally:
        node.stop()
    return row


def _record(row: Row, tally: Tally) -> None:
    """Count one run of a row: its problems as bad outcomes, its good counts as tallies."""
    for outcome, note in tally.problems:
        row.fail(outcome, note)
    for name, n in tally.good.items():
        row.good[name] = row.good.get(name, 0) + n
    row.runs += 1


async def _battery(row: Row, count: int, workdir: Path) -> None:
    client = docker.DockerClient(base_url=DEFAULT_DOCKER_URL)
    node = f"did:test:chaos-{uuid.uuid4().hex[:12]}"
    runner = SandboxRunner(node=node, output_poll_seconds=0.05)
    try:
        image = str(client.images.get(FFMPEG_IMAGE).id)
        arena = Arena(runner=runner, image=image, workdir=workdir, docker=client)
        for _ in range(count):
            tally = Tally()
            for name, check in BATTERY.items():
                try:
                    problems = await check(arena)
                except HearthError as exc:  # the check's own container failed: it proved nothing
                    problems = [f"the check did not run: {exc.code} {exc.message}"]
                for problem in problems:
                    tally.bad(f"escape:{name}", problem)
                if not problems:
                    tally.good["checks_held"] += 1
            _record(row, tally)
    finally:
        runner.close()
        for container in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node}"}):
            container.remove(force=True)
        client.close()
