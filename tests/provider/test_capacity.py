"""Capacity: discovery on this machine and against recorded NVML answers, and the capacity ledger."""

from __future__ import annotations

import ctypes.util
import json
import logging
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.config import CapacitySection
from core.errors import CapacityError
from node.http_errors import status_of
from provider.capacity import (
    CapacityLedger,
    GpuStack,
    Nvml,
    Resources,
    cuda_version_text,
    discover,
    read_disk,
    read_gpus,
)
from tests.provider.nvml_fake import FakeNvml, recorded_answers

MIB = 1024 * 1024


@pytest.fixture
def recorded() -> dict[str, Any]:
    return recorded_answers("nvml_two_gpus")


def loader(fake: FakeNvml | None) -> Any:
    """An NVML loader for ``discover(nvml=...)`` that hands over ``fake`` (None: no NVML installed)."""

    def load() -> Nvml | None:
        return fake

    return load


NO_NVML = loader(None)


# ------------------------------------------------------------------------------------------- Resources


def test_resources_arithmetic_and_fits() -> None:
    a = Resources(cpus=1.5, memory_mb=1024, gpus=1)
    b = Resources(cpus=0.5, memory_mb=512, gpus=0)
    assert a + b == Resources(2.0, 1536, 1)
    assert a - b == Resources(1.0, 512, 1)
    assert b.fits(a)
    assert not a.fits(b)
    assert not Resources(0, 0, 1).fits(Resources(64, 10**6, 0))
    # 0.1 + 0.2 is 0.30000000000000004 in floats; CPU shares compare in thousandths.
    assert (Resources(cpus=0.1) + Resources(cpus=0.2)).fits(Resources(cpus=0.3))
    assert Resources(-1.0, -5, 2).clamp_zero() == Resources(0.0, 0, 2)


# ------------------------------------------------------------------------------------------- discovery


def test_discover_reads_this_machine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hearth.capacity")
    machine = discover(CapacitySection(reserve_memory_mb=0), disk_path=tmp_path)
    assert machine.cpu_count > 0
    assert machine.cpu_count <= (psutil.cpu_count() or 1)
    assert machine.memory_total_mb == psutil.virtual_memory().total // MIB > 0
    usage = psutil.disk_usage(str(tmp_path))
    assert machine.disk.total_mb == usage.total // MIB > 0
    assert 0 <= machine.disk.free_mb <= machine.disk.total_mb
    assert machine.disk.path == str(tmp_path)
    assert machine.offered.cpus == machine.cpu_count
    assert machine.offered.memory_mb == machine.memory_total_mb
    assert machine.offered.gpus == len(machine.gpus)
    if ctypes.util.find_library("nvidia-ml") is None:
        # No NVIDIA driver here: the real pynvml fails to load it, and that means zero GPUs, not an error,
        # with the reason in the log.
        assert machine.gpus == () and machine.driver_version is None and machine.cuda_version is None
        assert machine.offered.gpus == 0 and machine.gpu_model is None
        assert "no GPUs offered: NVML did not start (NVMLError_LibraryNotFound" in caplog.text
        assert all(r.levelno == logging.INFO for r in caplog.records if "no GPUs" in r.message)
    json.dumps(machine.to_dict())


def test_disk_of_a_path_not_made_yet_is_its_parents_filesystem(tmp_path: Path) -> None:
    later = tmp_path / "state" / "not" / "yet"
    disk = read_disk(later)
    assert disk.path == str(later)
    assert disk.total_mb == psutil.disk_usage(str(tmp_path)).total // MIB
    assert not later.exists()


def test_discover_applies_caps_and_host_reserve() -> None:
    total_mb = psutil.virtual_memory().total // MIB
    machine = discover(
        CapacitySection(cpus=1, memory_mb=256, gpus=3, reserve_cpus=0.5, reserve_memory_mb=0), nvml=NO_NVML
    )
    assert machine.offered == Resources(cpus=min(1.0, machine.cpu_count - 0.5), memory_mb=256, gpus=0)

    reserved = discover(CapacitySection(reserve_cpus=0.25, reserve_memory_mb=1000), nvml=NO_NVML)
    assert reserved.offered.cpus == machine.cpu_count - 0.25
    assert reserved.offered.memory_mb == total_mb - 1000

    starved = discover(CapacitySection(reserve_cpus=10_000, reserve_memory_mb=10**9), nvml=NO_NVML)
    assert starved.offered == Resources(0.0, 0, 0)


def test_discover_an_h100_from_recorded_nvml() -> None:
    fake = FakeNvml(recorded_answers("nvml_h100"))
    machine = discover(CapacitySection(), nvml=loader(fake))
    (gpu,) = machine.gpus
    assert gpu.name == "NVIDIA H100 80GB HBM3" == machine.gpu_model
    assert gpu.uuid == "GPU-3f8a1c2e-6b4d-4e9a-9c71-2d5e8f0a7b13"
    assert (gpu.memory_total_mb, gpu.memory_used_mb) == (81559, 528)  # 85520809984 and 553648128 bytes
    assert (gpu.utilisation_gpu_pct, gpu.utilisation_memory_pct) == (3, 1)
    assert gpu.compute_capability == "9.0"
    assert machine.driver_version == "550.54.15"
    assert machine.cuda_version == "12.4"  # NVML answered 12040
    assert machine.offered.gpus == 1 and machine.gpu_memory_mb == 81559
    assert fake.calls[0] == "nvmlInit" and fake.calls[-1] == "nvmlShutdown"
    shown = machine.to_dict()
    assert shown["cuda_version"] == "12.4" and shown["driver_version"] == "550.54.15"
    assert shown["gpus"][0]["compute_capability"] == "9.0"
    json.dumps(shown)


def test_discover_gpus_from_recorded_nvml(recorded: dict[str, Any]) -> None:
    fake = FakeNvml(recorded)
    machine = discover(CapacitySection(), nvml=loader(fake))
    assert [g.name for g in machine.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]
    assert [g.memory_total_mb for g in machine.gpus] == [81559, 40960]
    assert [g.memory_used_mb for g in machine.gpus] == [526, 4096]
    assert machine.gpus[0].uuid == "GPU-5e1b6c43-9f0a-4d0e-b7c2-1f3e2a9d8c01"
    assert machine.gpus[0].utilisation_gpu_pct == 0
    # The A100's recorded answer to nvmlDeviceGetUtilizationRates is NVML_ERROR_NOT_SUPPORTED.
    assert machine.gpus[1].utilisation_gpu_pct is None and machine.gpus[1].utilisation_memory_pct is None
    assert machine.driver_version == "550.54.15"
    # This recording has no CUDA version or compute capability (a driver without those calls): blanks only.
    assert machine.cuda_version is None
    assert [g.compute_capability for g in machine.gpus] == [None, None]
    assert machine.offered.gpus == 2
    assert machine.gpu_model == "NVIDIA H100 80GB HBM3"
    assert fake.calls[0] == "nvmlInit" and fake.calls[-1] == "nvmlShutdown"
    assert machine.to_dict()["gpus"][1]["memory_total_mb"] == 40960


def test_discover_caps_recorded_gpus(recorded: dict[str, Any]) -> None:
    machine = discover(CapacitySection(gpus=1), nvml=loader(FakeNvml(recorded)))
    assert len(machine.gpus) == 2
    assert machine.offered.gpus == 1


@pytest.mark.parametrize(("encoded", "text"), [(12040, "12.4"), (11080, "11.8"), (12000, "12.0")])
def test_cuda_version_text(encoded: int, text: str) -> None:
    assert cuda_version_text(encoded) == text


@pytest.mark.parametrize("failing", ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetMemoryInfo"])
def test_nvml_failure_means_no_gpus(
    recorded: dict[str, Any], failing: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml(recorded, fail=failing)
    assert read_gpus(fake) == GpuStack()
    if failing != "nvmlInit":
        assert fake.calls[-1] == "nvmlShutdown"
    # A driver that is there but fails is worth a warning, with NVML's reason.
    (record,) = [r for r in caplog.records if "no GPUs offered" in r.message]
    assert record.levelno == logging.WARNING
    assert f"recorded failure of {failing}" in record.message


def test_nvml_library_missing_means_no_gpus_at_info(
    recorded: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hearth.capacity")
    fake = FakeNvml(recorded, fail="nvmlInit", fail_with=FakeNvml.NVMLError_LibraryNotFound)
    machine = discover(CapacitySection(), nvml=loader(fake))
    assert machine.gpus == () and machine.offered.gpus == 0 and machine.driver_version is None
    assert fake.calls == ["nvmlInit"]  # nothing else is asked of an NVML that did not start
    (record,) = [r for r in caplog.records if "no GPUs offered" in r.message]
    # No driver library is the ordinary CPU-only machine: said, but not as a warning.
    assert record.levelno == logging.INFO
    assert "NVMLError_LibraryNotFound" in record.message


def test_nvml_shutdown_failure_is_ignored(recorded: dict[str, Any]) -> None:
    stack = read_gpus(FakeNvml(recorded, fail="nvmlShutdown"))
    assert len(stack.gpus) == 2 and stack.driver_version == "550.54.15"


def test_no_nvml_module_means_no_gpus(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hearth.capacity")
    machine = discover(CapacitySection(), nvml=NO_NVML)
    assert machine.gpus == () and machine.offered.gpus == 0
    assert "nvidia-ml-py (pynvml) is not installed" in caplog.text


# ---------------------------------------------------------------------------------------------- ledger

TOTAL = Resources(cpus=4.0, memory_mb=8192, gpus=1)


def test_reserve_and_release() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("a", Resources(1.5, 2048, 0), expires_at=None)
    ledger.reserve("b", Resources(2.0, 1024, 1), expires_at=None)
    assert ledger.used() == Resources(3.5, 3072, 1)
    assert ledger.free() == Resources(0.5, 5120, 0)
    assert "a" in ledger and len(ledger) == 2
    assert ledger.release("a") is True
    assert ledger.release("a") is False
    assert ledger.used() == Resources(2.0, 1024, 1)
    assert ledger.get("a") is None


def test_insufficient_capacity() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("a", Resources(3.0, 1024, 1), expires_at=None)
    with pytest.raises(CapacityError) as info:
        ledger.reserve("b", Resources(2.0, 1024, 0), expires_at=None)
    err = info.value
    assert err.code == "insufficient_capacity"
    assert status_of(err) == 503 and err.retryable is True and err.domain == "scheduling"
    assert err.details["need"] == {"cpus": 2.0, "memory_mb": 1024, "gpus": 0}
    assert err.details["free"] == {"cpus": 1.0, "memory_mb": 7168, "gpus": 0}
    assert "b" not in ledger
    assert ledger.used() == Resources(3.0, 1024, 1)


def test_need_above_total_is_not_retryable() -> None:
    ledger = CapacityLedger(TOTAL)
    with pytest.raises(CapacityError) as info:
        ledger.reserve("a", Resources(1.0, 1024, 2), expires_at=None)
    assert info.value.code == "exceeds_capacity"
    assert status_of(info.value) == 422 and info.value.retryable is False
    assert len(ledger) == 0


def test_reserve_is_idempotent_per_key() -> None:
    ledger = CapacityLedger(TOTAL)
    need = Resources(3.0, 4096, 1)
    ledger.reserve("q", need, expires_at=100.0)
    ledger.reserve("q", need, expires_at=100.0)  # a retried quote: still one hold, not a refusal
    assert ledger.used() == need and len(ledger) == 1

    ledger.reserve("q", Resources(4.0, 8192, 1), expires_at=200.0)  # resized in place, old share freed
    assert ledger.used() == Resources(4.0, 8192, 1)
    hold = ledger.get("q")
    assert hold is not None and hold.expires_at == 200.0

    ledger.reserve("other", Resources(), expires_at=None)
    with pytest.raises(CapacityError):
        ledger.reserve("q", Resources(5.0, 8192, 1), expires_at=None)
    assert ledger.used() == Resources(4.0, 8192, 1)  # a failed resize leaves the old hold intact


def test_expire_drops_lapsed_holds_only() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("early", Resources(1, 100, 0), expires_at=10.0)
    ledger.reserve("late", Resources(1, 100, 0), expires_at=20.0)
    ledger.reserve("job", Resources(1, 100, 0), expires_at=None)
    assert ledger.expire(9.999) == []
    assert ledger.expire(10.0) == ["early"]
    assert ledger.expire(15.0) == []
    assert sorted(ledger.expire(1e12)) == ["late"]
    assert [h.key for h in ledger.holds()] == ["job"]
    assert ledger.used() == Resources(1.0, 100, 0)


def test_set_expiry_turns_a_quote_hold_into_a_job_hold() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("j", Resources(2, 512, 0), expires_at=10.0)
    assert ledger.set_expiry("j", None) is True
    assert ledger.expire(100.0) == []
    assert "j" in ledger
    assert ledger.set_expiry("j", 200.0) is True
    assert ledger.expire(150.0) == [] and ledger.expire(200.0) == ["j"]
    assert ledger.set_expiry("gone", None) is False


def test_stale_expiry_does_not_release_a_newer_hold() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("k", Resources(1, 1, 0), expires_at=10.0)
    ledger.release("k")
    ledger.reserve("k", Resources(1, 1, 0), expires_at=20.0)
    assert ledger.expire(15.0) == []
    assert "k" in ledger


def test_running_totals_do_not_drift() -> None:
    ledger = CapacityLedger(TOTAL)
    for i in range(10_000):
        ledger.reserve(f"k{i}", Resources(cpus=0.1, memory_mb=0), expires_at=float(i))
        if i % 3 == 0:
            ledger.set_expiry(f"k{i}", float(i) + 0.5)
        ledger.release(f"k{i}")
    assert ledger.used() == Resources(0.0, 0, 0)
    assert ledger.expire(1e12) == []
    assert len(ledger._expiries) < 200  # stale expiry entries are compacted, not kept forever


def test_utilisation() -> None:
    ledger = CapacityLedger(TOTAL)
    assert ledger.utilisation() == 0.0
    ledger.reserve("a", Resources(1.0, 6144, 0), expires_at=None)
    assert ledger.utilisation() == 0.75  # memory is the busiest axis
    assert ledger.utilisation(extra=Resources(0, 0, 1)) == 1.0
    assert ledger.utilisation(extra=Resources(4.0, 0, 0)) == 1.25

    cpu_only = CapacityLedger(Resources(cpus=2.0, memory_mb=1000, gpus=0))
    cpu_only.reserve("a", Resources(0.5, 100, 0), expires_at=None)
    assert cpu_only.utilisation() == 0.25  # no GPU axis on a machine without GPUs
    assert cpu_only.utilisation(extra=Resources(0, 0, 1)) == 0.25


def test_load_rebuilds_from_journal_rows() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("stale", Resources(1, 1, 0), expires_at=None)
    ledger.load(
        [
            ("job-1", Resources(2.0, 4096, 1), None, "did:key:zA"),
            ("quote-2", Resources(1.5, 1024, 0), 50.0, "did:key:zB"),
            (
                "quote-2",
                Resources(1.0, 1024, 0),
                60.0,
                "did:key:zB",
            ),  # a key recorded twice keeps its last row
        ]
    )
    assert "stale" not in ledger
    assert ledger.used() == Resources(3.0, 5120, 1)
    assert ledger.expire(59.0) == []
    assert ledger.expire(60.0) == ["quote-2"]
    assert ledger.used() == Resources(2.0, 4096, 1)


def test_load_keeps_an_over_commitment() -> None:
    ledger = CapacityLedger(Resources(cpus=1.0, memory_mb=1024, gpus=0))
    ledger.load([("a", Resources(2.0, 512, 0), None, "")])
    assert ledger.used().cpus == 2.0
    assert ledger.free() == Resources(0.0, 512, 0)
    assert ledger.free_raw().cpus == -1.0
    with pytest.raises(CapacityError) as info:
        ledger.reserve("b", Resources(0.5, 64, 0), expires_at=None)
    assert info.value.code == "insufficient_capacity"


def test_snapshot() -> None:
    ledger = CapacityLedger(TOTAL)
    ledger.reserve("a", Resources(1.0, 2048, 0), expires_at=5.0)
    assert ledger.hold_unfunded("q", "did:key:zq", Resources(0.5, 1024, 0), 9.0, now=0.0) is True
    snap = ledger.snapshot()
    assert snap == {
        "total": {"cpus": 4.0, "memory_mb": 8192, "gpus": 1},
        "used": {"cpus": 1.5, "memory_mb": 3072, "gpus": 0},
        "free": {"cpus": 2.5, "memory_mb": 5120, "gpus": 1},
        "committed": {"cpus": 1.0, "memory_mb": 2048, "gpus": 0},
        "unfunded": {"cpus": 0.5, "memory_mb": 1024, "gpus": 0},
        "holds": 2,
        "utilisation": 0.25,  # of committed work only: the quote does not count
    }
    json.dumps(snap)
