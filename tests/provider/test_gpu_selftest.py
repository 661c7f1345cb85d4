"""The GPU self-test: NVML health against recorded answers, the kernel script run for real on the CPU
(directly and in the sandbox), the rounds of :class:`GpuSelfTest`, and the figures in the signed offer
and /metrics.

No GPU here: health is read from recorded NVML answers (tests/provider/fixtures/nvml_health.json: one healthy
GPU, one hot, one with ECC errors, one throttled), and the kernels run on their CPU fallback, which goes
through the same timing and reporting code as on a GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config import NodeConfig, parse_config
from node.metrics import Metrics
from payments.jwt import verify_node_token
from payments.keys import new_ed25519
from provider.capacity import CapacityLedger, GpuInfo, MachineInfo, Resources, discover
from provider.catalog import ModelCatalog
from provider.gpu_health import (
    GpuFigures,
    GpuReport,
    figures_from_output,
    read_health,
    throttle_names,
    verdict,
)
from provider.gpu_selftest import SELFTEST_JOB_PREFIX, GpuSelfTest, SandboxBench
from provider.offers import OfferIssuer
from sandbox import gpu_bench
from sandbox.runner import SandboxRunner
from tests.promtext import sample
from tests.provider.nvml_fake import FakeNvml, recorded_answers

BENCH = Path(gpu_bench.__file__)
FIGURE_KEYS = {
    "backend",
    "device",
    "device_name",
    "dtype",
    "matmul_n",
    "tflops",
    "bandwidth_mb",
    "memory_bandwidth_gbs",
    "seconds",
}


def four_gpus() -> FakeNvml:
    return FakeNvml(recorded_answers("nvml_health"))


def machine_of(fake: FakeNvml, tmp_path: Path) -> MachineInfo:
    return discover(NodeConfig().capacity, disk_path=tmp_path, nvml=lambda: fake)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """The kernel script as the node and `make gpu-check` start it: a program, not an import."""
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120, check=False
    )


async def cpu_bench(gpu: GpuInfo) -> GpuFigures:
    """A bench that runs the real script on the CPU (what a GPU run does, minus the GPU)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), "--device", "cpu", "--seconds", "0.1", stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled mid-run (a test stopping the rounds): leave no process
            proc.kill()
            await proc.wait()
    return figures_from_output(out.decode().strip().splitlines()[-1], exit_code=proc.returncode)


# ------------------------------------------------------------------------------------------- NVML health


def test_health_from_recorded_answers_withholds_the_hot_the_erring_and_the_throttled() -> None:
    health = read_health(four_gpus())
    assert sorted(health) == [0, 1, 2, 3]
    ok, hot, ecc, throttled = (health[i] for i in range(4))
    assert ok.uuid == "GPU-1a2b3c4d-0000-4e9a-9c71-2d5e8f0a7b10"
    assert (ok.temperature_c, ok.ecc_uncorrected, ok.ecc_corrected) == (34, 0, 0)
    assert (ok.sm_clock_mhz, ok.sm_clock_max_mhz, ok.memory_clock_mhz, ok.memory_clock_max_mhz) == (
        345,
        1980,
        2619,
        2619,
    )
    assert ok.throttle_reasons == ("gpu_idle",) and ok.remap_pending is False and ok.remap_failed is False

    cfg = NodeConfig().gpu
    none = GpuFigures()
    assert verdict(ok, none, cfg) == ()
    assert verdict(hot, none, cfg) == ("temperature 91 C above 85 C",)  # a power cap alone is load
    assert verdict(ecc, none, cfg) == (
        "3 uncorrected ECC errors since the driver loaded (at most 0)",
        "a memory row remap is pending (the GPU needs a reset)",
    )
    assert throttled.throttle_reasons == ("sw_power_cap", "hw_thermal_slowdown")
    assert verdict(throttled, none, cfg) == ("clocks throttled: hw_thermal_slowdown",)


def test_the_thresholds_are_the_operators() -> None:
    health = read_health(four_gpus())
    lenient = parse_config(
        {"gpu": {"max_temperature_c": 95, "max_ecc_uncorrected": 5, "withhold_throttle_reasons": []}}
    ).gpu
    assert verdict(health[1], GpuFigures(), lenient) == ()
    assert verdict(health[3], GpuFigures(), lenient) == ()
    assert verdict(health[2], GpuFigures(), lenient) == (
        "a memory row remap is pending (the GPU needs a reset)",
    )
    floors = parse_config({"gpu": {"min_tflops": 500, "min_memory_bandwidth_gbs": 2000}}).gpu
    slow = GpuFigures(tflops=310.5, memory_bandwidth_gbs=1500.0, dtype="bfloat16")
    assert verdict(health[0], slow, floors) == (
        "matmul 310.5 TFLOP/s below 500",
        "memory bandwidth 1500 GB/s below 2000",
    )
    # off by default: figures are reported, not judged
    assert verdict(health[0], slow, NodeConfig().gpu) == ()


def test_readings_a_card_lacks_judge_nothing() -> None:
    recorded = recorded_answers("nvml_health")
    recorded["devices"][2]["health"] |= {
        "ecc_volatile_uncorrected": "not_supported",
        "ecc_volatile_corrected": "not_supported",
        "remapped_rows": "not_supported",
    }
    health = read_health(FakeNvml(recorded))
    assert health[2].ecc_uncorrected is None and health[2].remap_pending is None
    assert verdict(health[2], GpuFigures(), NodeConfig().gpu) == ()
    # the H100 recording predates the health readings: a driver without those calls reports no health
    (old,) = read_health(FakeNvml(recorded_answers("nvml_h100"))).values()
    assert old.temperature_c is None and old.throttle_reasons == ()
    assert verdict(old, GpuFigures(), NodeConfig().gpu) == ()


def test_nvml_failing_reads_no_health_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hearth.gpu")
    assert read_health(FakeNvml(recorded_answers("nvml_health"), fail="nvmlInit")) == {}
    assert read_health(FakeNvml(recorded_answers("nvml_health"), fail="nvmlDeviceGetCount")) == {}
    assert read_health(None) == {}
    assert [r.message for r in caplog.records] == [
        "GPU health not read: NVML did not start (NVMLError: recorded failure of nvmlInit)",
        "GPU health not read: NVML failed (NVMLError: recorded failure of nvmlDeviceGetCount)",
    ]


def test_throttle_reason_bits_are_named() -> None:
    assert throttle_names(0) == ()
    assert throttle_names(0x1 | 0x8 | 0x80) == ("gpu_idle", "hw_slowdown", "hw_power_brake")
    assert throttle_names(0x20 | 0x1000) == ("sw_thermal_slowdown", "bit_0x1000")


# ------------------------------------------------------------------------------------------- the kernels


def test_the_kernel_script_measures_the_cpu_and_prints_one_json_line() -> None:
    done = run_bench("--device", "cpu", "--seconds", "0.2")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    figures = json.loads(line)
    assert set(figures) == FIGURE_KEYS
    assert figures["device"] == "cpu" and figures["backend"] in ("torch", "numpy")
    assert figures["tflops"] > 0 and figures["memory_bandwidth_gbs"] > 0
    assert (
        figures["matmul_n"] == gpu_bench.CPU_MATMUL_N
        and figures["bandwidth_mb"] == gpu_bench.CPU_BANDWIDTH_MB
    )
    parsed = figures_from_output(line, exit_code=0)
    assert parsed == GpuFigures(
        tflops=figures["tflops"], memory_bandwidth_gbs=figures["memory_bandwidth_gbs"], dtype=figures["dtype"]
    )


def test_the_numpy_fallback_runs_in_process() -> None:
    figures = gpu_bench._numpy_bench(pytest.importorskip("numpy"), 0.05, 64, 4)
    assert figures["backend"] == "numpy" and figures["tflops"] > 0 and figures["memory_bandwidth_gbs"] > 0


def test_asking_for_cuda_without_one_fails_rather_than_measure_a_cpu() -> None:
    done = run_bench("--device", "cuda", "--seconds", "0.1")
    assert done.returncode == gpu_bench.EXIT_NO_CUDA, done.stdout
    assert json.loads(done.stdout)["error"].startswith("no CUDA device")
    figures = figures_from_output(done.stdout.strip(), exit_code=done.returncode)
    assert figures.error is not None and not figures.faulty  # the container's fault, not the GPU's


def test_bad_arguments_are_refused() -> None:
    assert run_bench("--device", "tpu").returncode == 2
    assert run_bench("--seconds", "0").returncode == 2


def test_results_are_read_defensively() -> None:
    assert (
        figures_from_output(None, exit_code=137).error == "the self-test printed no result (exit status 137)"
    )
    assert figures_from_output("not json", exit_code=0).error is not None
    assert (
        figures_from_output('{"tflops": "fast"}', exit_code=0).error
        == "the self-test's result has no figures"
    )
    faulty = figures_from_output('{"error": "CUDA error: uncorrectable ECC error encountered"}', exit_code=4)
    assert faulty.faulty and faulty.error == "CUDA error: uncorrectable ECC error encountered"
    assert verdict(None, faulty, NodeConfig().gpu) == (
        "the self-test failed on the GPU: CUDA error: uncorrectable ECC error encountered",
    )


# ------------------------------------------------------------------------------------------- the rounds


class Claims:
    """Stands in for the scheduler's GPU pinning: GPU ``busy`` is held by a job for ``busy_for`` claims."""

    def __init__(self, busy: str, busy_for: int) -> None:
        self.busy, self.busy_for = busy, busy_for
        self.held: set[str] = set()
        self.log: list[str] = []

    def claim_gpu(self, gpu: str) -> bool:
        self.log.append(f"claim {gpu}")
        if gpu == self.busy and self.busy_for > 0:
            self.busy_for -= 1
            return False
        self.held.add(gpu)
        return True

    def release_gpu(self, gpu: str) -> None:
        self.log.append(f"release {gpu}")
        self.held.remove(gpu)


async def test_a_round_reports_health_at_once_then_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("provider.gpu_selftest.CLAIM_POLL_SECONDS", 0.01)
    fake = four_gpus()
    machine = machine_of(fake, tmp_path)
    rounds: list[tuple[GpuReport, ...]] = []
    claims = Claims(busy="0", busy_for=2)
    test = GpuSelfTest(
        NodeConfig(),
        machine.gpus,
        cpu_bench,
        on_report=rounds.append,
        claims=lambda: claims,
        nvml=lambda: fake,
        now=lambda: 1_800_000_000.0,
    )
    reports = await test.run_once()
    first, second = rounds
    assert second == reports and test.rounds == 1
    # the health verdict comes first, before anything is measured
    assert [r.healthy for r in first] == [True, False, False, False]
    assert all(r.figures == GpuFigures() for r in first)
    # then the healthy GPU is measured, once the job holding it let go; the withheld ones are not heated
    ok = second[0]
    assert ok.healthy and ok.figures.tflops is not None and ok.figures.tflops > 0
    assert ok.figures.memory_bandwidth_gbs is not None and ok.figures.memory_bandwidth_gbs > 0
    assert claims.log == ["claim 0", "claim 0", "claim 0", "release 0"] and claims.held == set()
    assert [r.figures.error for r in second[1:]] == ["not measured: withheld on its health"] * 3
    assert second[1].reasons == ("temperature 91 C above 85 C",)
    shown = second[0].to_dict()
    assert shown["measured_at"] == 1_800_000_000 and shown["withheld"] is None and shown["healthy"] is True
    assert set(shown) == {
        "index",
        "uuid",
        "measured_at",
        "tflops",
        "memory_bandwidth_gbs",
        "dtype",
        "error",
        "healthy",
        "withheld",
        "health",
    }
    assert second[2].to_dict()["withheld"] == (
        "3 uncorrected ECC errors since the driver loaded (at most 0); "
        "a memory row remap is pending (the GPU needs a reset)"
    )


async def test_a_gpu_a_job_never_lets_go_is_reported_unmeasured(tmp_path: Path) -> None:
    fake = FakeNvml(recorded_answers("nvml_h100"))
    machine = machine_of(fake, tmp_path)
    cfg = parse_config({"gpu": {"selftest_timeout_seconds": 0.01}})
    claims = Claims(busy="0", busy_for=1_000_000)
    test = GpuSelfTest(
        cfg, machine.gpus, cpu_bench, on_report=lambda _: None, claims=lambda: claims, nvml=lambda: fake
    )
    (report,) = await test.run_once()
    assert report.figures.error == "not measured: a job held the GPU for the whole wait"
    assert report.healthy  # busy is not sick


async def test_rounds_repeat_and_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(recorded_answers("nvml_h100"))
    machine = machine_of(fake, tmp_path)
    seen: list[int] = []
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fast_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("provider.gpu_selftest.asyncio.sleep", fast_sleep)
    cfg = parse_config({"gpu": {"selftest_hours": 0.5}})
    test = GpuSelfTest(
        cfg, machine.gpus, cpu_bench, on_report=lambda r: seen.append(len(r)), nvml=lambda: fake
    )
    await test.start()
    deadline = time.monotonic() + 30
    while test.rounds < 2 and time.monotonic() < deadline:
        await real_sleep(0.05)
    await test.stop()
    assert test.rounds >= 2 and 1800.0 in sleeps
    once = GpuSelfTest(
        parse_config({"gpu": {"selftest_hours": 0}}),
        machine.gpus,
        cpu_bench,
        on_report=lambda _: None,
        nvml=lambda: fake,
    )
    await once.start()
    assert once._task is not None
    await asyncio.wait_for(once._task, 30)  # 0 hours: one round at start, then the task ends by itself
    assert once.rounds == 1


# ----------------------------------------------------------------------------------- in the real sandbox


@pytest.fixture
def runner(sandbox_images: dict[str, str]) -> Iterator[SandboxRunner]:
    runner = SandboxRunner(node=f"did:test:{uuid.uuid4().hex[:12]}", output_poll_seconds=0.05)
    try:
        yield runner
    finally:
        runner.close()


async def test_the_kernels_run_in_the_sandbox(runner: SandboxRunner, tmp_path: Path) -> None:
    """The self-test's container for real: the script mounted read-only into the CPU image, every control on;
    only the device differs from a GPU node's (no GPU to pin here)."""
    gpu = GpuInfo(
        index=0,
        name="cpu",
        uuid=None,
        memory_total_mb=0,
        memory_used_mb=0,
        utilisation_gpu_pct=None,
        utilisation_memory_pct=None,
    )
    bench = SandboxBench(runner, NodeConfig(), tmp_path / "work", seconds=0.2, device="cpu")
    figures = await bench(gpu)
    assert figures.error is None, figures
    assert figures.tflops is not None and figures.tflops > 0
    assert figures.memory_bandwidth_gbs is not None and figures.memory_bandwidth_gbs > 0
    assert figures.dtype == "float32"
    assert await runner.list_containers() == []  # removed after the run
    spec = SandboxBench(runner, NodeConfig(), tmp_path / "work")._spec(gpu, "sha256:0")
    assert spec.gpu_ids == ("0",) and spec.job_id == f"{SELFTEST_JOB_PREFIX}-0"
    assert spec.argv[:4] == ("python3", "/opt/hearth/gpu_bench.py", "--device", "cuda")
    assert spec.timeout_seconds == NodeConfig().gpu.selftest_timeout_seconds


async def test_a_missing_image_is_an_error_of_the_run_not_of_the_gpu(
    runner: SandboxRunner, tmp_path: Path
) -> None:
    cfg = parse_config({"sandbox": {"vllm_gpu_image": "hearth/no-such-image:never"}})
    (gpu,) = machine_of(FakeNvml(recorded_answers("nvml_h100")), tmp_path).gpus
    figures = await SandboxBench(runner, cfg, tmp_path / "work")(gpu)
    assert figures.error is not None and figures.error.startswith("image_missing") and not figures.faulty
    assert verdict(None, figures, cfg.gpu) == ()


# ------------------------------------------------------------------------------- the offer and /metrics


def reports_of(tmp_path: Path) -> tuple[MachineInfo, tuple[GpuReport, ...]]:
    fake = four_gpus()
    machine = machine_of(fake, tmp_path)
    health = read_health(fake)
    figures = GpuFigures(tflops=712.4, memory_bandwidth_gbs=2861.0, dtype="bfloat16")
    reports = tuple(
        GpuReport(
            index=gpu.index,
            uuid=gpu.uuid,
            measured_at=1_800_000_000,
            figures=figures,
            health=health[gpu.index],
            reasons=verdict(health[gpu.index], figures, NodeConfig().gpu),
        )
        for gpu in machine.gpus
    )
    return machine, reports


@dataclasses.dataclass
class Source:
    did: str
    cfg: NodeConfig
    ledger: CapacityLedger
    machine: MachineInfo
    models: ModelCatalog
    payout_address: str | None
    state_dir: Path


def test_the_signed_offer_carries_the_figures(tmp_path: Path) -> None:
    machine, reports = reports_of(tmp_path)
    signer = new_ed25519()
    source = Source(
        did=signer.did,
        cfg=NodeConfig(),
        ledger=CapacityLedger(Resources(cpus=8.0, memory_mb=65536, gpus=1)),
        machine=dataclasses.replace(machine, gpu_selftest=reports),
        models=ModelCatalog([]),
        payout_address=None,
        state_dir=tmp_path,
    )
    now = 1_800_000_100.0
    offer = OfferIssuer(source, signer, now=lambda: now).issue()
    claims = verify_node_token(offer["jwt"], signer.did, now=lambda: now)
    tested: list[dict[str, Any]] = claims["offer"]["machine"]["gpu_selftest"]
    assert tested == [r.to_dict() for r in reports]
    assert [t["healthy"] for t in tested] == [True, False, False, False]
    assert tested[0]["tflops"] == 712.4 and tested[0]["memory_bandwidth_gbs"] == 2861.0
    assert tested[1]["withheld"] == "temperature 91 C above 85 C"
    assert tested[3]["health"]["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    # a node that has not tested (no GPU, or [gpu] selftest off) carries no such field
    assert "gpu_selftest" not in machine.to_dict()


def test_metrics_show_the_figures_and_health(tmp_path: Path) -> None:
    _, reports = reports_of(tmp_path)
    unmeasured = dataclasses.replace(reports[1], figures=GpuFigures(error="image_missing"))
    metrics = Metrics()
    metrics.watch_gpus(lambda: (reports[0], unmeasured))
    text = metrics.render().decode()
    assert sample(text, "hearth_gpu_tflops", gpu="0") == 712.4
    assert sample(text, "hearth_gpu_memory_bandwidth_gbs", gpu="0") == 2861.0
    assert sample(text, "hearth_gpu_healthy", gpu="0") == 1
    assert sample(text, "hearth_gpu_healthy", gpu="1") == 0
    assert sample(text, "hearth_gpu_temperature_celsius", gpu="1") == 91
    assert sample(text, "hearth_gpu_tflops", gpu="1") is None  # not measured: no series, not a zero
