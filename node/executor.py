"""The transcode pipeline: one attempt of one ``ffmpeg_transcode`` job, from input to published artifact.

fetch the input (verified: CID or sha256; a mismatch fails in ``storage`` before any container starts)
-> probe it with ffprobe in a sandbox (hostile files are refused there) -> compile the preset to argv
-> run ffmpeg in a sandbox, streaming progress -> check the outputs (ffprobe, sizes, hashes) -> publish
them to the blockstore (a CID is recorded only once every block is stored) -> the result document.

Every container runs under the controls of the README's Execution (see :mod:`sandbox.runner`); the attempt's
folder holds the input and the outputs and is removed when the attempt ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import ROUND_UP, Decimal
from pathlib import Path
from typing import Any, Protocol

from core.config import NodeConfig
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope, canonical_json, parse_envelope
from core.errors import ExecutionError, HearthError, StorageError
from core.journal import JobRecord
from node.scheduler import ProgressReport
from payments.jwt import decode_unverified
from provider.estimate import MIB, InputProbe, WorkEstimate
from provider.pricing import ASK_QUANTUM, Pricer
from sandbox.ffmpeg import (
    CONTAINER_INPUT_PATH,
    CONTAINER_OUTPUT_DIR,
    MediaInfo,
    Plan,
    ProgressParser,
    check_output,
    collect_outputs,
    ffmpeg_threads,
    parse_probe,
    probe_argv,
    raise_for_checks,
    sandboxed_probe_refusal,
    transcode_argv,
)
from sandbox.runner import Mount, Runner, RunResult, RunSpec
from storage import CID, Blockstore, FetchedInput, fetch_input, import_path

log = logging.getLogger("hearth.executor")

PROBE_MAX_OUTPUT_BYTES = 1024 * 1024
QUOTE_PROBE_CACHE_SIZE = 1024
_MB = Decimal(MIB)
AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope


@dataclass(frozen=True, slots=True)
class Artifact:
    """What an attempt published: the root CID, the files under it and their checks."""

    cid: str
    size: int
    sha256: str
    files: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Workspace:
    """What every executor works with: the sandbox, the blockstore, a folder for attempts, the node's DID."""

    runner: Runner  # this machine's sandbox, or the cluster's workers (cluster.RemoteRunner)
    store: Blockstore
    work_dir: Path
    node_did: str


class WorkloadExecutor:
    """What every kind's executor shares: attempt folders, verified inputs, clean-up and the charge."""

    def __init__(self, cfg: NodeConfig, pricer: Pricer, space: Workspace) -> None:
        self._cfg = cfg
        self._pricer = pricer
        self._runner = space.runner
        self._store = space.store
        self._work = space.work_dir
        self._did = space.node_did

    def reconfigure(self, cfg: NodeConfig, pricer: Pricer) -> None:
        self._cfg = cfg
        self._pricer = pricer

    async def recover(self, running: list[JobRecord]) -> None:
        """Remove every container of this node (none can be live at start) and every attempt folder."""
        removed = await self._runner.remove_containers()
        if removed:
            log.warning("removed %d orphan container(s) left by a previous run", len(removed))
        if self._work.exists():
            await asyncio.to_thread(shutil.rmtree, self._work, True)

    def _attempt_dir(self, job: JobRecord) -> Path:
        path = self._work / job.id / f"attempt-{job.attempts + 1}"
        shutil.rmtree(path, ignore_errors=True)
        (path / "in").mkdir(parents=True)
        return path

    async def _fetch_for(self, env: AnyEnvelope, dest: Path) -> FetchedInput:
        fetched = await fetch_input(
            env.input_uri,
            dest,
            store=self._store,
            config=self._cfg.storage,
            sha256=env.input_sha256,
        )
        # An ipfs:// or blob input is verified by its CID; a sha256 the requester added binds it too.
        if env.input_sha256 is not None and fetched.sha256 != env.input_sha256:
            raise StorageError(
                "sha256_mismatch",
                f"the input has sha256 {fetched.sha256}, not the envelope's input_sha256",
                details={"expected": env.input_sha256, "actual": fetched.sha256, "cid": str(fetched.cid)},
                retryable=False,
            )
        return fetched

    def _reachable(self, uri: str) -> bool:
        """Worth fetching at quote time: gateways to ask, or the input's root block already here."""
        if uri.startswith("https://") or (uri.startswith("ipfs://") and self._cfg.storage.gateways):
            return True
        text = uri.removeprefix("ipfs://").split("/", 1)[0]
        try:
            return self._store.has(CID.parse(text))
        except HearthError:
            return False

    @contextlib.asynccontextmanager
    async def _quote_input(self, env: AnyEnvelope, name: str) -> AsyncIterator[FetchedInput | None]:
        """The job's input, fetched for its quote into a temporary folder removed afterwards; None when
        the node cannot get it (not here, no gateway, an error) within the quote-time budget. An input
        URL the address policy refuses (``input_not_allowed``) refuses the quote.
        """
        if not self._reachable(env.input_uri):
            yield None
            return
        folder = self._work / "quotes"
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            dest = Path(tmp) / "in" / name
            dest.parent.mkdir()
            fetched: FetchedInput | None = None
            try:
                async with asyncio.timeout(self._cfg.storage.quote_fetch_timeout_seconds):
                    fetched = await self._fetch_for(env, dest)
            except (StorageError, TimeoutError) as exc:
                if isinstance(exc, StorageError) and exc.code == "input_not_allowed":
                    raise  # the address policy refuses the URL: a refusal of the job, not a miss
                log.info("quote for %s priced without its input: not fetched (%s)", env.job_id, exc)
            yield fetched

    def _charge(self, job: JobRecord, env: AnyEnvelope, used: WorkEstimate) -> str:
        """What the node will claim: measured work at the quote's rates and surge, never above the quote."""
        surge = Decimal(1)
        if job.quote_jwt:
            with contextlib.suppress(HearthError, ArithmeticError, TypeError, KeyError):
                surge = Decimal(decode_unverified(job.quote_jwt)[1]["quote"]["surge_factor"])
        measured = (self._pricer.base_price(env, used).base * surge).quantize(ASK_QUANTUM, rounding=ROUND_UP)
        quoted = Decimal(job.price or "0")
        return format(min(measured, quoted), "f")


class KindExecutor(Protocol):
    """One kind's executor, as :class:`Executors` routes to it."""

    async def execute(
        self, job: JobRecord, report: ProgressReport, *, gpu_ids: tuple[str, ...] = ()
    ) -> dict[str, Any]: ...

    async def recover(self, running: list[JobRecord]) -> None: ...


class Executors:
    """The scheduler's executor (:class:`node.scheduler.Executor`): each job goes to its kind's executor."""

    def __init__(self, by_kind: Mapping[str, KindExecutor]) -> None:
        self._by_kind = dict(by_kind)

    async def execute(
        self, job: JobRecord, report: ProgressReport, *, gpu_ids: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        executor = self._by_kind.get(job.kind)
        if executor is None:
            raise ExecutionError(
                "kind_not_runnable",
                f"this node does not run {job.kind} jobs",
                details={"kind": job.kind, "runs": sorted(self._by_kind)},
                retryable=False,
            )
        return await executor.execute(job, report, gpu_ids=gpu_ids)

    async def recover(self, running: list[JobRecord]) -> None:
        # The executors share the sandbox and the work folder: one clears both for all.
        first = next(iter(self._by_kind.values()), None)
        if first is not None:
            await first.recover(running)


class TranscodeExecutor(WorkloadExecutor):
    """Runs ``ffmpeg_transcode`` attempts for the scheduler (see :class:`node.scheduler.Executor`)."""

    def __init__(self, cfg: NodeConfig, pricer: Pricer, space: Workspace) -> None:
        super().__init__(cfg, pricer, space)
        self._image: str | None = None
        # ffprobe's answer per input content (CID) and image: the quote's probe serves the run too
        self._probes: OrderedDict[tuple[str, str], MediaInfo] = OrderedDict()
        self._tool_versions: dict[str, str] | None = None
        # jobs starting together ask once: one probe container, one output folder
        self._tools_lock = asyncio.Lock()

    # -- the scheduler's interface --------------------------------------------------------------------

    async def execute(
        self, job: JobRecord, report: ProgressReport, *, gpu_ids: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        env = _transcode_envelope(job)
        attempt = self._attempt_dir(job)
        try:
            started = time.monotonic()
            report({"stage": "fetching", "percent": 0.0})
            fetched = await self._fetch_for(env, attempt / "in" / "input")
            report({"stage": "probing", "percent": 0.0})
            info = await self._probe_cached(fetched, job_id=job.id, attempt=job.attempts)
            plan = transcode_argv(env.output_spec, info=info, threads=ffmpeg_threads(env.limits.cpus))
            ran = await self._transcode(job, env, plan, fetched, attempt / "out", report, gpu_ids)
            run = ran.wall_seconds
            report({"stage": "checking", "percent": 100.0})
            checks, artifact = await self._check_and_publish(env, plan, attempt / "out", store=True)
            runtime = time.monotonic() - started
            return {
                "job_id": env.job_id,
                "job": job.id,
                "status": "completed",
                "artifact_uri": f"ipfs://{artifact.cid}",
                "artifact_cid": artifact.cid,
                "artifact_sha256": artifact.sha256,
                "artifact_size": artifact.size,
                "files": artifact.files,
                "runtime_seconds": round(runtime, 3),
                "container_seconds": round(run, 3),
                "cost": self._cost(job, env, run, artifact.size),
                "currency": "usdc",
                "checks": checks,
                "provenance": {
                    "node_did": self._did,
                    "image_digest": await self._image_id(),
                    "tool_versions": await self._tools(),
                    "argv_hash": plan.argv_hash,
                    "threads": plan.threads,
                    "input_cid": str(fetched.cid),
                    "input_sha256": fetched.sha256,
                    "input_size": fetched.size,
                    "attempt": job.attempts + 1,
                }
                | ({"worker": ran.worker} if ran.worker else {}),
            }
        finally:
            await asyncio.to_thread(shutil.rmtree, attempt, True)

    async def replay(self, job: JobRecord) -> dict[str, Any]:
        """Run a completed job again from its records and say whether the artifact CID comes out the same.

        Uses the recorded envelope, input CID and thread count; the artifact is computed, not stored.
        """
        env = _transcode_envelope(job)
        recorded = job.result or {}
        provenance = recorded.get("provenance") or {}
        attempt = self._work / job.id / "replay"
        await asyncio.to_thread(shutil.rmtree, attempt, True)
        (attempt / "in").mkdir(parents=True)
        try:
            uri = str(provenance.get("input_cid") or env.input_uri)
            fetched = await fetch_input(
                uri, attempt / "in" / "input", store=self._store, config=self._cfg.storage, sha256=None
            )
            info = await self.probe(fetched.path, job_id=job.id, attempt=job.attempts, cid=str(fetched.cid))
            threads = int(provenance.get("threads") or ffmpeg_threads(env.limits.cpus))
            plan = transcode_argv(env.output_spec, info=info, threads=threads)
            await self._transcode(job, env, plan, fetched, attempt / "out", lambda _: None, ())
            checks, artifact = await self._check_and_publish(env, plan, attempt / "out", store=False)
        finally:
            await asyncio.to_thread(shutil.rmtree, attempt, True)
        return {
            "job": job.id,
            "recorded_cid": recorded.get("artifact_cid"),
            "replay_cid": artifact.cid,
            "match": artifact.cid == recorded.get("artifact_cid"),
            "argv_hash_match": plan.argv_hash == provenance.get("argv_hash"),
            "image_match": (await self._image_id()) == provenance.get("image_digest"),
            "checks": checks,
        }

    # -- steps ----------------------------------------------------------------------------------------

    async def probe(self, path: Path, *, job_id: str, attempt: int = 0, cid: str | None = None) -> MediaInfo:
        """ffprobe ``path`` (content ``cid``) inside a sandbox (the file is untrusted) and parse what it
        says, or refuse it."""
        lines: list[str] = []
        out = path.parent.parent / "probe"
        try:
            await self._probe_run(
                Mount(host=path, target=CONTAINER_INPUT_PATH, cid=cid), out, job_id, attempt, lines
            )
        except ExecutionError as exc:
            # An input that fails, outgrows or outlasts its probe is refused (422), not a node failure (500).
            refusal = sandboxed_probe_refusal(exc)
            if refusal is exc:
                raise
            raise refusal from None
        return parse_probe("\n".join(lines))

    async def _probe_run(self, mount: Mount, out: Path, job_id: str, attempt: int, lines: list[str]) -> None:
        await self._runner.run(
            RunSpec(
                image=await self._image_id(),
                argv=tuple(probe_argv(CONTAINER_INPUT_PATH)),
                job_id=job_id,
                attempt=attempt,
                output_dir=out,
                inputs=(mount,),
                cpus=1.0,
                memory_mb=self._cfg.sandbox.probe_memory_mb,
                timeout_seconds=self._cfg.sandbox.probe_timeout_seconds,
                max_output_bytes=PROBE_MAX_OUTPUT_BYTES,
                pids_limit=self._cfg.sandbox.pids_limit,
                tmpfs_mb=min(self._cfg.sandbox.tmpfs_mb, 64),
                user=self._cfg.sandbox.user,
            ),
            on_stdout=lines.append,
        )

    async def quote_probe(self, env: FfmpegTranscodeEnvelope) -> InputProbe | None:
        """Duration and frame size of a job's input for its quote, or None to price on the envelope.

        The input is probed when the node can get it: already in the blockstore (an uploaded blob, or an
        ipfs:// input fetched before) or from a configured gateway, within the quote-time budget. The
        answer is cached by content, so the run does not probe again. A file that is not usable media is
        refused here, before any bid.
        """
        known = self._known_probe(env.input_uri)
        if known is not None:
            return InputProbe(duration_seconds=known.duration_seconds, width=known.width, height=known.height)
        if not self._reachable(env.input_uri):  # the usual quote: nothing to fetch, priced on the envelope
            return None
        async with self._quote_input(env, "input") as fetched:
            if fetched is None:
                return None
            info = await self._probe_cached(fetched, job_id=f"quote-{env.job_id}")
        return InputProbe(duration_seconds=info.duration_seconds, width=info.width, height=info.height)

    async def _probe_cached(self, fetched: FetchedInput, *, job_id: str, attempt: int = 0) -> MediaInfo:
        """The probe of this exact content (its CID, verified on fetch) under this image, once."""
        key = (str(fetched.cid), await self._image_id())
        info = self._probes.get(key)
        if info is not None:
            self._probes.move_to_end(key)
            return info
        info = await self.probe(fetched.path, job_id=job_id, attempt=attempt, cid=str(fetched.cid))
        self._probes[key] = info
        if len(self._probes) > QUOTE_PROBE_CACHE_SIZE:
            self._probes.popitem(last=False)
        return info

    def _known_probe(self, uri: str) -> MediaInfo | None:
        """A cached probe for an input named by its CID alone, without fetching it again."""
        text = uri.removeprefix("ipfs://")
        if "/" in text or self._image is None or text.startswith("https:"):
            return None
        try:
            key = (str(CID.parse(text)), self._image)
        except HearthError:
            return None
        return self._probes.get(key)

    async def _transcode(
        self,
        job: JobRecord,
        env: FfmpegTranscodeEnvelope,
        plan: Plan,
        fetched: FetchedInput,
        out: Path,
        report: ProgressReport,
        gpu_ids: tuple[str, ...],
    ) -> RunResult:
        parser = ProgressParser(plan.expected_duration_seconds)

        def on_line(line: str) -> None:
            progress = parser.feed(line)
            if progress is not None:
                report(
                    {
                        "stage": "transcoding",
                        "percent": progress.percent,
                        "fps": progress.fps,
                        "speed": progress.speed,
                        "out_time_seconds": progress.out_time_seconds,
                        "done": progress.done,
                    }
                )

        result = await self._runner.run(
            RunSpec(
                image=await self._image_id(),
                argv=plan.argv,
                job_id=job.id,
                attempt=job.attempts,
                output_dir=out,
                inputs=(Mount(host=fetched.path, target=CONTAINER_INPUT_PATH, cid=str(fetched.cid)),),
                cpus=env.limits.cpus,
                memory_mb=env.limits.memory_mb,
                timeout_seconds=env.limits.timeout_seconds,
                max_output_bytes=env.limits.max_output_mb * MIB,
                pids_limit=self._cfg.sandbox.pids_limit,
                tmpfs_mb=self._cfg.sandbox.tmpfs_mb,
                workdir=CONTAINER_OUTPUT_DIR,
                user=self._cfg.sandbox.user,
                gpu_ids=gpu_ids,
            ),
            on_stdout=on_line,
        )
        return result

    async def _check_and_publish(
        self, env: FfmpegTranscodeEnvelope, plan: Plan, out: Path, *, store: bool
    ) -> tuple[Mapping[str, Any], Artifact]:
        files = await asyncio.to_thread(collect_outputs, plan, out)
        checks = check_output(files, plan=plan, validation=env.validation, limits=env.limits)
        raise_for_checks(checks)
        listed = [{"name": f.name, "size": f.size_bytes, "sha256": f.sha256} for f in files]
        if len(files) == 1:
            target, digest = out / files[0].name, files[0].sha256
        else:
            target = out
            digest = hashlib.sha256(canonical_json({f.name: f.sha256 for f in files})).hexdigest()
        imported = await asyncio.to_thread(import_path, target, self._store if store else None)
        artifact = Artifact(cid=str(imported.cid), size=imported.size, sha256=digest, files=listed)
        return dict(checks), artifact

    def _cost(self, job: JobRecord, env: FfmpegTranscodeEnvelope, wall: float, size: int) -> str:
        used = WorkEstimate(
            cpu_seconds=wall * env.limits.cpus,
            gpu_seconds=wall * env.limits.gpus,
            output_mb=float(Decimal(size) / _MB),
            input_tokens=0,
            output_tokens=0,
            basis="ffprobe",
        )
        return self._charge(job, env, used)

    async def _image_id(self) -> str:
        if self._image is None:
            self._image = await self._runner.image_digest(self._cfg.sandbox.ffmpeg_image)
        return self._image

    async def _tools(self) -> dict[str, str]:
        """The ffmpeg version inside the image, asked once per daemon run."""
        async with self._tools_lock:
            if self._tool_versions is None:
                self._tool_versions = await self._ask_tools()
        return self._tool_versions

    async def _ask_tools(self) -> dict[str, str]:
        """Run ``ffmpeg -version`` in the image (a probe-sized container) and read the version."""
        lines: list[str] = []
        out = self._work / "tool-versions"
        try:
            await self._runner.run(
                RunSpec(
                    image=await self._image_id(),
                    argv=("ffmpeg", "-hide_banner", "-version"),
                    job_id="tool-versions",
                    output_dir=out,
                    cpus=0.5,
                    memory_mb=self._cfg.sandbox.probe_memory_mb,
                    timeout_seconds=self._cfg.sandbox.probe_timeout_seconds,
                    max_output_bytes=PROBE_MAX_OUTPUT_BYTES,
                    user=self._cfg.sandbox.user,
                ),
                on_stdout=lines.append,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, out, True)
        first = lines[0] if lines else ""
        return {"ffmpeg": first.split(" ")[2] if first.count(" ") >= 2 else first}


def _transcode_envelope(job: JobRecord) -> FfmpegTranscodeEnvelope:
    env = parse_envelope(job.envelope)
    if not isinstance(env, FfmpegTranscodeEnvelope):
        raise ExecutionError(
            "replay_not_supported" if isinstance(env, VllmBatchEnvelope) else "kind_not_runnable",
            f"{env.kind} jobs are not replayed: sampled completions are not bit-exact from run to run",
            details={"kind": env.kind},
            retryable=False,
        )
    return env
