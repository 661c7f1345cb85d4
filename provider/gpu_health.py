"""A GPU's health as NVML reports it, its measured figures, and the verdict that withholds a failing GPU.

:func:`read_health` reads, per GPU, what says a card is sick rather than busy: the temperature, the volatile
ECC error counts, row remapping (a failed or pending remap), the SM and memory clocks against their maxima,
and the clock throttle reasons. :func:`verdict` turns one GPU's health and its self-test figures into the
reasons to withhold it (none: healthy) under the ``[gpu]`` thresholds. A :class:`GpuReport` is the two
together, as the signed offer, ``/metrics`` and ``make gpu-check`` show them.

NVML is reached only through the module handed in (:class:`provider.capacity.Nvml`, the real ``pynvml``
by default), so every verdict is tested against recorded NVML answers on machines without a GPU. A reading
a GPU does not support (ECC on a consumer card, row remapping before Ampere) is None and judges nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

from core.config import GpuSection
from provider.capacity import Nvml, _optional, _text
from sandbox.gpu_bench import EXIT_KERNEL_FAILED

log = logging.getLogger("hearth.gpu")

# NVML's enumerations, by value, so that the recorded-answers fake needs none of pynvml's constants.
_TEMPERATURE_GPU: Final = 0  # NVML_TEMPERATURE_GPU
_ECC_CORRECTED: Final = 0  # NVML_MEMORY_ERROR_TYPE_CORRECTED
_ECC_UNCORRECTED: Final = 1  # NVML_MEMORY_ERROR_TYPE_UNCORRECTED
_ECC_VOLATILE: Final = 0  # NVML_VOLATILE_ECC: since the driver was loaded
_CLOCK_SM: Final = 1  # NVML_CLOCK_SM
_CLOCK_MEM: Final = 2  # NVML_CLOCK_MEM

THROTTLE_REASONS: Final[dict[int, str]] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake",
    0x100: "display_clock_setting",
}
"""NVML's clock throttle (clock event) reason bits, named as ``[gpu] withhold_throttle_reasons`` names
them."""


@dataclass(frozen=True, slots=True)
class GpuHealth:
    """One GPU's health readings; None where the GPU or driver does not report that reading."""

    index: int
    uuid: str | None
    temperature_c: int | None
    ecc_uncorrected: int | None  # volatile: since the driver was loaded
    ecc_corrected: int | None
    remap_pending: bool | None  # a row remap waits for a GPU reset
    remap_failed: bool | None
    sm_clock_mhz: int | None
    sm_clock_max_mhz: int | None
    memory_clock_mhz: int | None
    memory_clock_max_mhz: int | None
    throttle_reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature_c": self.temperature_c,
            "ecc_uncorrected": self.ecc_uncorrected,
            "ecc_corrected": self.ecc_corrected,
            "remap_pending": self.remap_pending,
            "remap_failed": self.remap_failed,
            "sm_clock_mhz": self.sm_clock_mhz,
            "sm_clock_max_mhz": self.sm_clock_max_mhz,
            "memory_clock_mhz": self.memory_clock_mhz,
            "memory_clock_max_mhz": self.memory_clock_max_mhz,
            "throttle_reasons": list(self.throttle_reasons),
        }


@dataclass(frozen=True, slots=True)
class GpuFigures:
    """What the self-test's kernels measured on one GPU (:mod:`sandbox.gpu_bench`), or why they did not.

    ``error`` without figures is a run that did not measure; ``faulty`` says the GPU itself failed the
    kernel (a CUDA error on the card), as opposed to the sandbox or image failing around it.
    """

    tflops: float | None = None
    memory_bandwidth_gbs: float | None = None
    dtype: str | None = None
    error: str | None = None
    faulty: bool = False


@dataclass(frozen=True, slots=True)
class GpuReport:
    """One GPU after a self-test: its figures, its health, and the reasons it is withheld (none: offered)."""

    index: int
    uuid: str | None
    measured_at: int  # Unix seconds
    figures: GpuFigures
    health: GpuHealth | None
    reasons: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "measured_at": self.measured_at,
            "tflops": self.figures.tflops,
            "memory_bandwidth_gbs": self.figures.memory_bandwidth_gbs,
            "dtype": self.figures.dtype,
            "error": self.figures.error,
            "healthy": self.healthy,
            "withheld": "; ".join(self.reasons) or None,
            "health": None if self.health is None else self.health.to_dict(),
        }


def throttle_names(mask: int) -> tuple[str, ...]:
    """The names of the throttle reason bits set in ``mask`` (unknown bits as ``bit_0x...``)."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    known = sum(THROTTLE_REASONS)
    names += [f"bit_{1 << i:#x}" for i in range(64) if mask & ~known & (1 << i)]
    return tuple(names)


def _read_one(nvml: Nvml, index: int) -> GpuHealth:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    reasons_call = getattr(
        nvml, "nvmlDeviceGetCurrentClocksEventReasons", nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    mask = _optional(nvml, lambda: int(reasons_call(handle)))
    remap = _optional(nvml, lambda: nvml.nvmlDeviceGetRemappedRows(handle))
    return GpuHealth(
        index=index,
        uuid=_optional(nvml, lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
        temperature_c=_optional(nvml, lambda: int(nvml.nvmlDeviceGetTemperature(handle, _TEMPERATURE_GPU))),
        ecc_uncorrected=_optional(
            nvml, lambda: int(nvml.nvmlDeviceGetTotalEccErrors(handle, _ECC_UNCORRECTED, _ECC_VOLATILE))
        ),
        ecc_corrected=_optional(
            nvml, lambda: int(nvml.nvmlDeviceGetTotalEccErrors(handle, _ECC_CORRECTED, _ECC_VOLATILE))
        ),
        remap_pending=None if remap is None else bool(remap[2]),
        remap_failed=None if remap is None else bool(remap[3]),
        sm_clock_mhz=_optional(nvml, lambda: int(nvml.nvmlDeviceGetClockInfo(handle, _CLOCK_SM))),
        sm_clock_max_mhz=_optional(nvml, lambda: int(nvml.nvmlDeviceGetMaxClockInfo(handle, _CLOCK_SM))),
        memory_clock_mhz=_optional(nvml, lambda: int(nvml.nvmlDeviceGetClockInfo(handle, _CLOCK_MEM))),
        memory_clock_max_mhz=_optional(nvml, lambda: int(nvml.nvmlDeviceGetMaxClockInfo(handle, _CLOCK_MEM))),
        throttle_reasons=() if mask is None else throttle_names(mask),
    )


def read_health(nvml: Nvml | None) -> dict[int, GpuHealth]:
    """The health of every GPU NVML sees, by index; empty where there is no NVML or it fails.

    A failure is logged as a WARNING (NVML worked at discovery, so a GPU machine whose NVML breaks later
    is worth hearing about) and judges nothing: no reading is no verdict, rather than every GPU withheld.
    """
    if nvml is None:
        return {}
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:
        log.warning("GPU health not read: NVML did not start (%s: %s)", type(exc).__name__, exc)
        return {}
    try:
        return {i: _read_one(nvml, i) for i in range(nvml.nvmlDeviceGetCount())}
    except (nvml.NVMLError, OSError) as exc:
        log.warning("GPU health not read: NVML failed (%s: %s)", type(exc).__name__, exc)
        return {}
    finally:
        with contextlib.suppress(nvml.NVMLError, OSError):
            nvml.nvmlShutdown()


def verdict(health: GpuHealth | None, figures: GpuFigures, cfg: GpuSection) -> tuple[str, ...]:
    """Why this GPU should be withheld under ``cfg``'s thresholds, one sentence per reason; () if healthy.

    Clocks below their maxima are not judged: an idle GPU clocks down, and the throttle reasons say why a
    busy one does. A self-test that did not run (sandbox, image) judges nothing; one the GPU itself failed
    (``figures.faulty``) withholds it, as do figures below ``min_tflops``/``min_memory_bandwidth_gbs``.
    """
    reasons: list[str] = []
    if health is not None:
        if health.temperature_c is not None and health.temperature_c > cfg.max_temperature_c:
            reasons.append(f"temperature {health.temperature_c} C above {cfg.max_temperature_c} C")
        if health.ecc_uncorrected is not None and health.ecc_uncorrected > cfg.max_ecc_uncorrected:
            reasons.append(
                f"{health.ecc_uncorrected} uncorrected ECC errors since the driver loaded "
                f"(at most {cfg.max_ecc_uncorrected})"
            )
        if health.remap_failed:
            reasons.append("a memory row remap failed")
        if health.remap_pending:
            reasons.append("a memory row remap is pending (the GPU needs a reset)")
        throttled = [r for r in health.throttle_reasons if r in cfg.withhold_throttle_reasons]
        if throttled:
            reasons.append("clocks throttled: " + ", ".join(throttled))
    if figures.faulty:
        reasons.append(f"the self-test failed on the GPU: {figures.error}")
    if cfg.min_tflops and figures.tflops is not None and figures.tflops < cfg.min_tflops:
        reasons.append(f"matmul {figures.tflops:.1f} TFLOP/s below {cfg.min_tflops:g}")
    bandwidth = figures.memory_bandwidth_gbs
    if cfg.min_memory_bandwidth_gbs and bandwidth is not None and bandwidth < cfg.min_memory_bandwidth_gbs:
        reasons.append(f"memory bandwidth {bandwidth:.0f} GB/s below {cfg.min_memory_bandwidth_gbs:g}")
    return tuple(reasons)


def figures_from_output(line: str | None, *, exit_code: int | None) -> GpuFigures:
    """The figures of one kernel run from its last stdout line (:mod:`sandbox.gpu_bench`'s JSON).

    ``exit_code`` :data:`~sandbox.gpu_bench.EXIT_KERNEL_FAILED` is the kernel failing on the GPU
    (``faulty``); any other failure (no CUDA in the container, a bad line) is an error of the run, not of
    the GPU.
    """
    try:
        data = json.loads(line) if line else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return GpuFigures(error=f"the self-test printed no result (exit status {exit_code})")
    if "error" in data or exit_code:
        return GpuFigures(
            error=str(data.get("error", f"exit status {exit_code}"))[:500],
            faulty=exit_code == EXIT_KERNEL_FAILED,
        )
    tflops, gbs = data.get("tflops"), data.get("memory_bandwidth_gbs")
    if not isinstance(tflops, int | float) or not isinstance(gbs, int | float):
        return GpuFigures(error="the self-test's result has no figures")
    dtype = data.get("dtype")
    return GpuFigures(
        tflops=float(tflops), memory_bandwidth_gbs=float(gbs), dtype=dtype if isinstance(dtype, str) else None
    )
