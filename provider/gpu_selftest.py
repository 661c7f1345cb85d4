"""The GPU self-test (DESIGN §15): each GPU measured and checked at start and every ``[gpu] selftest_hours``.

One round reads every GPU's NVML health first (milliseconds) and reports it at once, so that a sick GPU is
withheld from capacity before any job lands on it; then it measures the GPUs one at a time with
:mod:`sandbox.gpu_bench` (a short bf16/fp16 matmul and a device memory copy) and reports again with the
figures. :class:`SandboxBench` runs that script inside the sandbox: the vLLM GPU image (which has PyTorch),
the script mounted read-only, one GPU pinned, no network, a short timeout, every control of DESIGN §6. A GPU
a job is using is waited for, not shared: a figure measured beside a job would be wrong and slow the job.

What a round found goes to ``on_report`` (the node puts it in its signed offer and ``/metrics`` and withholds
the GPUs with reasons); :func:`provider.gpu_health.verdict` decides. The task never delays the node's
readiness and never stops on an error: a round that fails is logged and the next one runs on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Literal, Protocol

from core.config import NodeConfig
from core.errors import HearthError
from provider.capacity import GpuInfo, Nvml, load_nvml
from provider.gpu_health import GpuFigures, GpuHealth, GpuReport, figures_from_output, read_health, verdict
from sandbox import gpu_bench
from sandbox.runner import Mount, Runner, RunSpec

log = logging.getLogger("hearth.gpu")

BENCH_TARGET: Final = "/opt/hearth/gpu_bench.py"
"""Where the kernel script is mounted (read-only) in the self-test's container."""
SELFTEST_JOB_PREFIX: Final = "gpu-selftest"
"""The ``hearth.job_id`` label of the self-test's containers: ``gpu-selftest-<index>``."""
BENCH_SECONDS: Final = 2.0
"""Time per kernel on the GPU (the script's own ``--seconds``); start-up of PyTorch and CUDA comes on top."""
BENCH_CPUS: Final = 2.0
CLAIM_POLL_SECONDS: Final = 1.0

Bench = Callable[[GpuInfo], Awaitable[GpuFigures]]
"""Measures one GPU: :class:`SandboxBench` on a node; anything with the same shape in tests."""


class GpuClaims(Protocol):
    """Who pins GPUs to jobs (:class:`node.scheduler.Scheduler`): the self-test borrows a GPU from it."""

    def claim_gpu(self, gpu: str) -> bool: ...
    def release_gpu(self, gpu: str) -> None: ...


class SandboxBench:
    """Runs :mod:`sandbox.gpu_bench` in the vLLM GPU image on one pinned GPU and reads its JSON line.

    ``device="cpu"`` runs the same script, mounts and controls in the CPU image with no GPU pinned, measuring
    the CPU: how the tests exercise the sandboxed path on a machine without a GPU.
    """

    def __init__(
        self,
        runner: Runner,
        cfg: NodeConfig,
        work_dir: Path,
        *,
        seconds: float = BENCH_SECONDS,
        device: Literal["cuda", "cpu"] = "cuda",
    ) -> None:
        self._runner = runner
        self._cfg = cfg
        self._work_dir = work_dir
        self._seconds = seconds
        self._device = device
        self._image: str | None = None

    async def __call__(self, gpu: GpuInfo) -> GpuFigures:
        """The figures of ``gpu``; a run failing around the GPU (image, engine, timeout) is an ``error``."""
        lines: list[str] = []
        exit_code: int | None = None
        try:
            if self._image is None:
                sandbox = self._cfg.sandbox
                tag = sandbox.vllm_gpu_image if self._device == "cuda" else sandbox.vllm_cpu_image
                self._image = await self._runner.image_digest(tag)
            await self._runner.run(self._spec(gpu, self._image), on_stdout=lines.append)
            exit_code = 0
        except HearthError as exc:
            if exc.code != "nonzero_exit":
                return GpuFigures(error=f"{exc.code}: {exc.message}"[:500])
            code = exc.details.get("exit_code")
            exit_code = code if isinstance(code, int) else None
        return figures_from_output(lines[-1] if lines else None, exit_code=exit_code)

    def _spec(self, gpu: GpuInfo, image: str) -> RunSpec:
        sandbox, section = self._cfg.sandbox, self._cfg.gpu
        return RunSpec(
            image=image,
            argv=("python3", BENCH_TARGET, "--device", self._device, "--seconds", str(self._seconds)),
            job_id=f"{SELFTEST_JOB_PREFIX}-{gpu.index}",
            output_dir=self._work_dir / f"{SELFTEST_JOB_PREFIX}-{gpu.index}",
            inputs=(Mount(host=Path(gpu_bench.__file__).resolve(), target=BENCH_TARGET),),
            cpus=BENCH_CPUS,
            memory_mb=section.selftest_memory_mb,
            timeout_seconds=section.selftest_timeout_seconds,
            max_output_bytes=1024 * 1024,
            pids_limit=sandbox.pids_limit,
            tmpfs_mb=sandbox.tmpfs_mb,
            user=sandbox.user,
            gpu_ids=(str(gpu.index),) if self._device == "cuda" else (),
            # CPU threads as many as the run's CPUs (PyTorch would start one per host core, each a pid)
            env={"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(int(BENCH_CPUS))},
        )


class GpuSelfTest:
    """The periodic self-test of a node's GPUs; owned by the node, which starts and stops it.

    ``claims`` returns who pins GPUs to jobs now (None: nobody, e.g. a paused scheduler); ``on_report`` is
    called with every GPU's report after the health reading and again after the measurements of a round.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        gpus: tuple[GpuInfo, ...],
        bench: Bench,
        *,
        on_report: Callable[[tuple[GpuReport, ...]], None],
        claims: Callable[[], GpuClaims | None] = lambda: None,
        nvml: Callable[[], Nvml | None] = load_nvml,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg.gpu
        self._gpus = gpus
        self._bench = bench
        self._on_report = on_report
        self._claims = claims
        self._nvml = nvml
        self._now = now
        self._figures: dict[int, GpuFigures] = {}
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    async def start(self) -> None:
        """Start the rounds in the background: the first at once, then every ``selftest_hours``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="hearth-gpu-selftest")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # keep the schedule; the next round retries
                log.exception("the GPU self-test failed")
            if not self._cfg.selftest_hours:
                return
            await asyncio.sleep(self._cfg.selftest_hours * 3600)

    async def run_once(self) -> tuple[GpuReport, ...]:
        """One round: health of every GPU (reported at once), then the measurements (reported again)."""
        health = await asyncio.to_thread(read_health, self._nvml())
        reports = self._reports(health, self._now())
        self._on_report(reports)
        for gpu, report in zip(self._gpus, reports, strict=True):
            if report.health is not None and verdict(report.health, GpuFigures(), self._cfg):
                # withheld on its health: not heated further, and no job waits for it
                self._figures[gpu.index] = GpuFigures(error="not measured: withheld on its health")
                continue
            self._figures[gpu.index] = await self._measure(gpu)
        reports = self._reports(health, self._now())
        self.rounds += 1
        for report in reports:
            figures = report.figures
            log.log(
                logging.INFO if report.healthy else logging.WARNING,
                "GPU %d self-test: %s TFLOP/s (%s), %s GB/s%s%s",
                report.index,
                figures.tflops,
                figures.dtype,
                figures.memory_bandwidth_gbs,
                f"; not measured: {figures.error}" if figures.error else "",
                f"; withheld: {'; '.join(report.reasons)}" if report.reasons else "",
                extra={"gpu": report.index, "gpu_selftest": report.to_dict()},
            )
        self._on_report(reports)
        return reports

    def _reports(self, health: dict[int, GpuHealth], now: float) -> tuple[GpuReport, ...]:
        reports = []
        for gpu in self._gpus:
            figures = self._figures.get(gpu.index, GpuFigures())
            reading = health.get(gpu.index)
            reports.append(
                GpuReport(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    measured_at=int(now),
                    figures=figures,
                    health=reading,
                    reasons=verdict(reading, figures, self._cfg),
                )
            )
        return tuple(reports)

    async def _measure(self, gpu: GpuInfo) -> GpuFigures:
        """Borrow ``gpu`` from the job pinning (waiting while a job uses it), measure it, give it back."""
        gpu_id = str(gpu.index)
        deadline = time.monotonic() + self._cfg.selftest_timeout_seconds
        claims = self._claims()
        while claims is not None and not claims.claim_gpu(gpu_id):
            if time.monotonic() > deadline:
                return GpuFigures(error="not measured: a job held the GPU for the whole wait")
            await asyncio.sleep(CLAIM_POLL_SECONDS)
            claims = self._claims()
        try:
            return await self._bench(gpu)
        finally:
            if claims is not None:
                claims.release_gpu(gpu_id)
