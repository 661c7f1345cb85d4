"""Rounds of attack on a real daemon's execution path, each judged against a wall-clock bound.

A round returns a :class:`Tally`: the problems it saw (an outcome name and a note; every one is a defect)
and informative counts. The focused tests assert a round has no problem; the fault scoreboard runs many
rounds and counts them (tests/chaos/scenario_sandbox.py).

- :func:`resource_round`: three real transcodes that overrun their typed limits (memory, time, output)
  end as ``oom_killed``, ``timeout`` and ``output_cap_exceeded``, while /healthz keeps answering.
- :func:`quote_round`: hostile inputs (noise, truncated and fuzzed containers, playlists, absurd headers,
  a frame too deep to probe) are refused at quote time within a bound, and two real decompression bombs
  run and are stopped by the job's own limits.
- :func:`run_round`: the same hostile inputs met by the run instead (accepted before the node had them),
  each failing cleanly within a bound.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.envelope import node_job_id
from storage import import_bytes
from tests.sandbox.faultnode import (
    RUN_CONFIG,
    Answer,
    AttackedNode,
    HealthWatch,
    containers_of,
    transcode_envelope,
)
from tests.sandbox.hostile_media import (
    PLAYLIST_TRICKS,
    Bomb,
    deep_png,
    fuzzed,
    h264_bomb,
    mkv_claiming,
    noise_clip,
    plain_clip,
    wav_claiming,
)
from tests.sandbox.media import random_bytes, rawvideo_avi, truncated

# A hostile input is refused (or quoted) within this, its sandboxed probe included.
QUOTE_BOUND_SECONDS = 20.0
# A job ends within its own timeout plus this: container start, probe, kill and clean-up.
RUN_SLACK_SECONDS = 30.0
# Jobs that are refused by their probe end within this once the scheduler takes them.
REFUSED_RUN_BOUND_SECONDS = 45.0
QUOTED = "quoted"  # an acceptable quote-time outcome: the input is usable media (the run will judge it)
ANY_CLEAN = frozenset({"*"})  # fuzzed input: any structured outcome, as long as it is clean and in time
# Failures that are never clean: the node's own crash, whatever the input.
UNCLEAN_CODES = frozenset({"executor_crashed", "internal_error"})
PAUSED_CONFIG: dict[str, Any] = {**RUN_CONFIG, "scheduler": {"paused": True}}


@dataclass
class Tally:
    """What a round saw: problems (outcome, note), each a defect, and counts of what went as it should."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    good: Counter[str] = field(default_factory=Counter)

    def bad(self, outcome: str, note: str) -> None:
        self.problems.append((outcome, note))

    def add(self, other: Tally) -> None:
        self.problems += other.problems
        self.good.update(other.good)


@dataclass(frozen=True, slots=True)
class Hostile:
    """One hostile input and the outcomes allowed at quote time and in the run (codes, QUOTED, completed)."""

    name: str
    data: bytes
    at_quote: frozenset[str]
    in_run: frozenset[str]


@dataclass(frozen=True, slots=True)
class MediaKit:
    """The inputs every round uses, made once per workdir (seconds of host ffmpeg)."""

    small: Path  # a tiny valid clip, the base of the malformed variants
    hd: Path  # 1080p: its encoder does not fit in 64 MB
    noise: Path  # small on disk, large and slow to encode
    bomb: Bomb
    deep: Path

    @classmethod
    def make(cls, folder: Path) -> MediaKit:
        folder.mkdir(parents=True, exist_ok=True)
        return cls(
            small=plain_clip(folder / "small.mp4", seconds=2, width=160, height=90),
            hd=plain_clip(folder / "hd.mp4", seconds=2, width=1920, height=1080),
            noise=noise_clip(folder / "noise.mp4", seconds=12),
            bomb=h264_bomb(folder / "bomb.mkv"),
            deep=deep_png(folder / "deep.mkv"),
        )


def hostile_inputs(kit: MediaKit, folder: Path, seed: int, salt: str) -> list[Hostile]:
    """Hostile inputs: fixed tricks plus variants drawn from ``seed``, every one ending in ``salt``.

    The salt (trailing bytes no demuxer reads) makes each input new to the node, so that no earlier probe
    of the same bytes can stand in for this one.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    not_media = frozenset({"input_not_media"})
    refused_format = frozenset({"input_format_not_allowed"})
    too_big = frozenset({"input_dimensions_too_large", "input_no_usable_stream"})
    width, height = rng.choice([(100_000, 100_000), (65_536, 16), (16, 65_536), (9000, 9000), (8192, 4321)])
    claimed = rng.choice([1e9, 21_601.0, 1e12])
    unknown = rng.choice([float("inf"), float("nan"), 1e300, -5.0, 0.0])

    def made(path: Path) -> bytes:
        return path.read_bytes()

    def salted(case: Hostile) -> Hostile:
        return replace(case, data=case.data + f"\n#{salt}\n".encode())

    cases = [
        Hostile("noise", made(random_bytes(folder / "noise.bin", seed=seed)), not_media, not_media),
        Hostile(
            "truncated",
            made(truncated(kit.small, folder / "cut.mp4", rng.uniform(0.2, 0.9))),
            not_media,
            not_media,
        ),
        Hostile(
            f"dimensions {width}x{height}",
            made(rawvideo_avi(folder / "dims.avi", width=width, height=height)),
            too_big,
            too_big,
        ),
        Hostile(
            f"duration {claimed:g}s",
            made(mkv_claiming(kit.small, folder / "long.mkv", seconds=claimed)),
            frozenset({"input_too_long"}),
            frozenset({"input_too_long"}),
        ),
        Hostile(
            f"duration {unknown:g}",
            made(mkv_claiming(kit.small, folder / "unknown.mkv", seconds=unknown)),
            frozenset({"input_duration_unknown"}),
            frozenset({"input_duration_unknown"}),
        ),
        # ffmpeg trusts the file's size over the header's 74 hours: usable audio, but no video to transcode.
        Hostile(
            "wav claiming 74 h",
            made(wav_claiming(folder / "claim.wav", seconds=1e9)),
            frozenset({QUOTED}),
            frozenset({"input_no_video"}),
        ),
        Hostile(
            "deep 8K frame",
            made(kit.deep),
            frozenset({"input_probe_memory"}),
            frozenset({"input_probe_memory"}),
        ),
    ]
    for trick, body in PLAYLIST_TRICKS.items():
        codes = refused_format | not_media if trick == "dash" else refused_format
        cases.append(Hostile(f"playlist {trick}", body, codes, codes))
    for k in range(3):
        fuzz_seed = rng.randrange(2**32)
        skip = rng.choice([0, 64, 2000])  # headers too, or only the media data
        flips = rng.choice([8, 64, 512])
        path = fuzzed(kit.small, folder / f"fuzz{k}.mp4", seed=fuzz_seed, skip=skip, flips=flips)
        cases.append(Hostile(f"fuzzed seed {fuzz_seed} skip {skip}", made(path), ANY_CLEAN, ANY_CLEAN))
    return [salted(case) for case in cases]


async def resource_round(node: AttackedNode, kit: MediaKit, round_no: int) -> Tally:
    """OOM, timeout and output cap, one real job each, at once; /healthz watched during and checked after."""
    cases: dict[str, tuple[Path, str, dict[str, Any]]] = {
        "oom_killed": (kit.hd, "1080p", {"memory_mb": 64}),
        "timeout": (kit.noise, "1080p", {"cpus": 0.25, "timeout_seconds": 2}),
        "output_cap_exceeded": (kit.noise, "480p", {"max_output_mb": 1}),
    }
    tally = Tally()
    async with node.session() as (session, watch):
        jobs: dict[str, tuple[str, float]] = {}
        for code, (path, resolution, limits) in cases.items():
            cid = await node.upload(session, path.read_bytes())
            env = transcode_envelope(f"r{round_no}-{code}", cid, resolution=resolution, limits=limits)
            answer = await node.post_signed(session, "/v1/jobs", env, limit=QUOTE_BOUND_SECONDS)
            if answer.status != 201:
                tally.bad("not_accepted", f"{code}: {answer.status} {answer.body}")
                continue
            jobs[code] = (answer.body["job"]["id"], env["limits"].get("timeout_seconds", 120))
        ends = await asyncio.gather(
            *(_ended(node, session, job, timeout + RUN_SLACK_SECONDS) for job, timeout in jobs.values())
        )
        for (code, (job, _)), (view, seconds) in zip(jobs.items(), ends, strict=True):
            _judge_kill(tally, code, job, view, seconds)
    await _judge_health(tally, node, watch)
    return tally


async def quote_round(node: AttackedNode, kit: MediaKit, folder: Path, round_no: int, seed: int) -> Tally:
    """Every hostile input quoted within the bound, then both bombs run into their limits."""
    tally = Tally()
    async with node.session() as (session, watch):
        for i, case in enumerate(hostile_inputs(kit, folder, seed, f"quote-{seed}-{round_no}")):
            cid = await node.upload(session, case.data)
            env = transcode_envelope(f"q{round_no}-{i}", cid)
            try:
                answer = await node.post_signed(session, "/v1/quotes", env, limit=QUOTE_BOUND_SECONDS * 3)
            except TimeoutError:
                tally.bad("hang", f"{case.name}: no answer to its quote in {QUOTE_BOUND_SECONDS * 3:.0f}s")
                continue
            _judge_quote(tally, case, answer)
            if answer.status != 201:  # a refusal leaves nothing behind: no job under that job_id
                async with session.get(
                    f"{node.url}/v1/jobs/{node_job_id(node.signer.did, env['job_id'])}"
                ) as r:
                    if r.status != 404:
                        tally.bad(
                            "refusal_side_effect", f"{case.name}: refused, yet the job answers {r.status}"
                        )
        await _bombs(tally, node, session, kit, round_no)
    await _judge_health(tally, node, watch)
    return tally


def run_round(node: AttackedNode, kit: MediaKit, folder: Path, round_no: int, seed: int) -> Tally:
    """Hostile inputs met by the run: jobs accepted while paused, inputs uploaded, then the node unpaused.

    Accepted before the node has their input, the jobs are priced on their limits and nothing probes them
    until they run. The daemon is restarted (SIGTERM) twice: that it comes back clean is part of the round.
    """
    cases = hostile_inputs(kit, folder, seed, f"run-{seed}-{round_no}")
    node.restart(PAUSED_CONFIG)
    jobs = asyncio.run(_accept_unprobed(node, cases, round_no))
    node.restart(RUN_CONFIG)
    return asyncio.run(_judge_runs(node, cases, jobs))


async def _accept_unprobed(node: AttackedNode, cases: list[Hostile], round_no: int) -> list[str]:
    jobs = []
    async with node.session() as (session, _):
        for i, case in enumerate(cases):
            cid = str(import_bytes(case.data).cid)  # the blob's CID, computed here: the node has it not yet
            env = transcode_envelope(f"run{round_no}-{i}", cid)
            answer = await node.post_signed(session, "/v1/jobs", env, limit=QUOTE_BOUND_SECONDS)
            if answer.status != 201:
                raise AssertionError(f"{case.name}: not accepted unprobed: {answer.status} {answer.body}")
            jobs.append(str(answer.body["job"]["id"]))
            if await node.upload(session, case.data) != cid:
                raise AssertionError(f"{case.name}: the node stored the blob under another CID")
    return jobs


async def _judge_runs(node: AttackedNode, cases: list[Hostile], jobs: list[str]) -> Tally:
    tally = Tally()
    async with node.session() as (session, watch):
        ends = await asyncio.gather(*(_ended(node, session, job, REFUSED_RUN_BOUND_SECONDS) for job in jobs))
        for case, job, (view, _) in zip(cases, jobs, ends, strict=True):
            if view is None:
                tally.bad("hang", f"{case.name}: job {job} not finished in {REFUSED_RUN_BOUND_SECONDS:.0f}s")
                continue
            outcome = "completed" if view["state"] == "completed" else (view.get("failure") or {}).get("code")
            clean = _clean_run(view)
            if clean and (case.in_run is ANY_CLEAN or outcome in case.in_run):
                tally.good["failed_cleanly_in_run" if outcome != "completed" else "fuzz_completed"] += 1
            else:
                tally.bad("wrong_outcome", f"{case.name} (run): {view['state']} {view.get('failure')}")
            _judge_leftovers(tally, case.name, job)
    await _judge_health(tally, node, watch)
    return tally


async def _bombs(tally: Tally, node: AttackedNode, session: Any, kit: MediaKit, round_no: int) -> None:
    """The H.264 bomb twice: stopped by its time limit, and by its memory limit, each with its own code."""
    cid = await node.upload(session, kit.bomb.path.read_bytes())
    limits = {"timeout": {"timeout_seconds": 6}, "oom_killed": {"memory_mb": 128}}
    jobs = {}
    for code, lim in limits.items():
        env = transcode_envelope(f"bomb{round_no}-{code}", cid, limits=lim)
        answer = await node.post_signed(session, "/v1/jobs", env, limit=QUOTE_BOUND_SECONDS)
        if answer.status != 201:
            tally.bad("bomb_refused_unexpectedly", f"{code}: {answer.status} {answer.body}")
            continue
        jobs[code] = (str(answer.body["job"]["id"]), float(env["limits"]["timeout_seconds"]))
    ends = await asyncio.gather(
        *(_ended(node, session, job, t + RUN_SLACK_SECONDS) for job, t in jobs.values())
    )
    for (code, (job, _)), (view, seconds) in zip(jobs.items(), ends, strict=True):
        _judge_kill(tally, code, job, view, seconds, name=f"bomb ({code})")


async def _ended(
    node: AttackedNode, session: Any, job: str, bound: float
) -> tuple[dict[str, Any] | None, float]:
    """The job's final view and the seconds it took to get there, or None when ``bound`` passed first."""
    t0 = time.monotonic()
    try:
        view = await node.wait_finished(session, job, bound)
    except AssertionError:
        return None, time.monotonic() - t0
    return view, time.monotonic() - t0


def _judge_kill(
    tally: Tally, code: str, job: str, view: dict[str, Any] | None, seconds: float, *, name: str = ""
) -> None:
    name = name or code
    if view is None:
        tally.bad("hang", f"{name}: job {job} not finished after {seconds:.0f}s")
        return
    failure = view.get("failure") or {}
    if view["state"] != "failed" or failure.get("code") != code or failure.get("domain") != "execution":
        tally.bad("wrong_code", f"{name}: {view['state']} {failure}")
    elif failure.get("retryable") is not (code == "timeout"):  # a timeout may pass on a calmer machine
        tally.bad("wrong_retryable", f"{name}: {failure}")
    else:
        tally.good[code] += 1
    _judge_leftovers(tally, name, job)


def _judge_quote(tally: Tally, case: Hostile, answer: Answer) -> None:
    if answer.status >= 500 or answer.body is None:
        tally.bad("http_5xx", f"{case.name}: {answer.status} {answer.body}")
        return
    if answer.seconds > QUOTE_BOUND_SECONDS:
        tally.bad("over_time_bound", f"{case.name}: quote took {answer.seconds:.1f}s")
    err = answer.error
    if answer.status == 201:
        outcome = QUOTED
    elif answer.well_formed_refusal() and err is not None and err["domain"] == "validation":
        outcome = str(err["code"])
    else:
        tally.bad("malformed_refusal", f"{case.name}: {answer.status} {answer.body}")
        return
    if case.at_quote is ANY_CLEAN or outcome in case.at_quote:
        tally.good["refused_at_quote" if outcome != QUOTED else "quoted"] += 1
    else:
        tally.bad("wrong_outcome", f"{case.name} (quote): {outcome}, expected one of {sorted(case.at_quote)}")


def _clean_run(view: dict[str, Any]) -> bool:
    if view["state"] == "completed":
        return True
    failure = view.get("failure") or {}
    return (
        view["state"] == "failed"
        and failure.get("domain") in ("validation", "execution")
        and failure.get("code") not in UNCLEAN_CODES
    )


def _judge_leftovers(tally: Tally, name: str, job: str) -> None:
    left = containers_of(job)
    if left:
        tally.bad("orphan_container", f"{name}: {len(left)} container(s) of {job} left behind")


async def _judge_health(tally: Tally, node: AttackedNode, watch: HealthWatch) -> None:
    """/healthz answered promptly all along (``watch``) and still does; the log holds no error."""
    if not watch.prompt:
        tally.bad("healthz_slow_or_failing", watch.summary())
    else:
        tally.good["healthz_answers"] += watch.samples
    async with node.session() as (_, after):
        await asyncio.sleep(0.5)
    if not after.prompt:
        tally.bad("healthz_after", after.summary())
    for line in node.new_log_lines():
        if '"level":"error"' in line or '"level":"critical"' in line or "Traceback" in line:
            tally.bad("log_error", line[:300])
