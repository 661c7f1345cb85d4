"""What this machine can offer, and which part of it is held right now.

:func:`discover` reads the machine once (psutil for CPU, memory and disk; NVML for GPUs) and applies the
operator's ``[capacity]`` caps and host reserve. :class:`CapacityLedger` (in :mod:`provider.ledger`,
named here too) then keeps the running account of holds: committed ones for accepted or funded jobs until
they end, unfunded ones for quotes and jobs awaiting funding, bounded by the :class:`HoldPolicy` shares
so that free quotes cannot hold the node. The journal is the source of truth; the ledger is rebuilt from
it at start with :meth:`CapacityLedger.load`.

NVML is reached only through the loader :func:`discover` takes (``nvml=``, the real ``pynvml`` by
default), so the GPU path is tested against recorded NVML answers on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psutil

from core.config import CapacitySection

# The ledger lives in its own module; these names stay importable from here, where they always were.
from provider.ledger import CapacityLedger as CapacityLedger
from provider.ledger import Hold as Hold
from provider.ledger import HoldPolicy as HoldPolicy
from provider.ledger import Resources as Resources

if TYPE_CHECKING:  # provider.gpu_health reads NVML through this module's Nvml
    from provider.gpu_health import GpuReport

log = logging.getLogger("hearth.capacity")

_T = TypeVar("_T")

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as NVML reports it. Memory in MiB; utilisation in percent; None where NVML has no answer.

    ``compute_capability`` ("9.0" for an H100) tells a requester which kernels and dtypes the card runs.
    """

    index: int
    name: str
    uuid: str | None
    memory_total_mb: int
    memory_used_mb: int
    utilisation_gpu_pct: int | None
    utilisation_memory_pct: int | None
    compute_capability: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "memory_total_mb": self.memory_total_mb,
            "memory_used_mb": self.memory_used_mb,
            "utilisation_gpu_pct": self.utilisation_gpu_pct,
            "utilisation_memory_pct": self.utilisation_memory_pct,
            "compute_capability": self.compute_capability,
        }


@dataclass(frozen=True, slots=True)
class GpuStack:
    """What NVML said about the GPU stack: the GPUs and the driver and CUDA versions (None where unknown).

    Empty where there is no NVML, or NVML failed: the node then offers no GPUs.
    """

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """Size and free space (MiB) of the filesystem holding ``path`` (the node's state directory)."""

    path: str
    total_mb: int
    free_mb: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total_mb": self.total_mb, "free_mb": self.free_mb}


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """What :func:`discover` found, and the part of it (``offered``) the node sells."""

    cpu_count: int
    memory_total_mb: int
    memory_available_mb: int
    disk: DiskInfo
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    cuda_version: str | None
    offered: Resources
    # a cluster's machines (name, cpus, memory_mb, gpus, models), when the node is the head of one
    workers: tuple[dict[str, Any], ...] = ()
    # the last GPU self-test (provider.gpu_selftest): figures, health and withheld reasons per GPU
    gpu_selftest: tuple[GpuReport, ...] = ()

    @property
    def gpu_model(self) -> str | None:
        """The model name of the first GPU, used to pick a per-model GPU price; None without GPUs."""
        return self.gpus[0].name if self.gpus else None

    @property
    def gpu_memory_mb(self) -> int:
        """The memory of the smallest GPU (what a model pinned to any one of them can count on); 0 if none."""
        return min((gpu.memory_total_mb for gpu in self.gpus), default=0)

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "cpu_count": self.cpu_count,
                "memory_total_mb": self.memory_total_mb,
                "memory_available_mb": self.memory_available_mb,
                "disk": self.disk.to_dict(),
                "gpus": [g.to_dict() for g in self.gpus],
                "driver_version": self.driver_version,
                "cuda_version": self.cuda_version,
                "offered": self.offered.to_dict(),
            }
            | ({"workers": [dict(w) for w in self.workers]} if self.workers else {})
            | ({"gpu_selftest": [r.to_dict() for r in self.gpu_selftest]} if self.gpu_selftest else {})
        )


class Nvml(Protocol):
    """The part of the ``pynvml`` module (nvidia-ml-py) that discovery and the GPU health checks use.

    A recorded-answers fake only needs these names; the real module satisfies it as is.
    """

    @property
    def NVMLError(self) -> type[Exception]: ...

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]: ...
    # health (provider.gpu_health): sensor, ECC error and counter types, clock types by NVML's values
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int: ...


NvmlLoader = Callable[[], Nvml | None]
"""Returns the NVML module to use, or None where there is none: the seam :func:`discover` takes."""


def load_nvml() -> Nvml | None:
    """The real ``pynvml`` module, imported on first use; None where nvidia-ml-py is not installed.

    Importing it never touches the driver: ``nvmlInit`` (in :func:`read_gpus`) is what loads
    ``libnvidia-ml``, and fails there on a machine without one.
    """
    try:
        import pynvml
    except ImportError:
        return None
    module: Nvml = pynvml
    return module


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases hand back the C buffer as bytes, newer ones as str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def cuda_version_text(encoded: int) -> str:
    """NVML's CUDA version integer as "major.minor": 12040 -> "12.4" (NVML encodes 1000*major + 10*minor)."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def read_gpus(nvml: Nvml | None) -> GpuStack:
    """The GPUs NVML sees, and the driver and CUDA versions. No NVML, or NVML failing, means no GPUs.

    Each fall-back to no GPUs is logged with its reason: at INFO where there is no NVML at all (a machine
    without an NVIDIA driver, the common CPU-only case), as a WARNING where NVML is there but fails (a
    broken driver on a GPU machine, which the operator should hear about). A failure of one optional
    reading (utilisation is not supported on every GPU or in MIG mode; the CUDA version and compute
    capability need newer drivers) blanks that reading only; a failure of a required one (count, name,
    memory) drops GPU discovery altogether, since offering a GPU the node cannot describe would sell
    something it may not have.
    """
    if nvml is None:
        log.info("no GPUs offered: nvidia-ml-py (pynvml) is not installed")
        return GpuStack()
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:
        missing = isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ()))
        log.log(
            logging.INFO if missing else logging.WARNING,
            "no GPUs offered: NVML did not start (%s: %s)",
            type(exc).__name__,
            exc,
        )
        return GpuStack()
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _optional(nvml, nvml.nvmlSystemGetCudaDriverVersion)
        gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    except (nvml.NVMLError, OSError) as exc:
        log.warning("no GPUs offered: NVML failed while reading the GPUs (%s: %s)", type(exc).__name__, exc)
        return GpuStack()
    finally:
        with contextlib.suppress(nvml.NVMLError, OSError):
            nvml.nvmlShutdown()
    return GpuStack(gpus, driver, None if cuda is None else cuda_version_text(cuda))


def _optional(nvml: Nvml, read: Callable[[], _T]) -> _T | None:
    """``read()``, or None where NVML has no answer for it (not supported, older driver)."""
    try:
        return read()
    except nvml.NVMLError:
        return None


def _read_gpu(nvml: Nvml, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    uuid = _optional(nvml, lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
    rates = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    capability = _optional(nvml, lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=uuid,
        memory_total_mb=int(memory.total) // MIB,
        memory_used_mb=int(memory.used) // MIB,
        utilisation_gpu_pct=None if rates is None else int(rates.gpu),
        utilisation_memory_pct=None if rates is None else int(rates.memory),
        compute_capability=None if capability is None else f"{capability[0]}.{capability[1]}",
    )


def read_disk(path: str | Path) -> DiskInfo:
    """Total and free space of the filesystem that holds ``path``.

    A path that does not exist yet (the state directory before the first start) is measured at its
    nearest existing parent, which is where it will be created.
    """
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = psutil.disk_usage(str(where))
    return DiskInfo(path=str(path), total_mb=usage.total // MIB, free_mb=usage.free // MIB)


def _usable_cpu_count() -> int:
    # A daemon pinned to some cores (taskset, systemd CPUAffinity=) can only use those.
    count = psutil.cpu_count(logical=True) or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    return count


def discover(
    cfg: CapacitySection, *, disk_path: str | Path = ".", nvml: NvmlLoader = load_nvml
) -> MachineInfo:
    """Read this machine and work out what the node offers.

    For each of CPU and memory the offer is the machine minus the host reserve, capped by the configured
    number where it is not ``"auto"``; GPUs have no reserve and are capped the same way. ``disk_path`` is
    where the node keeps its state (the disk reported is that filesystem's). ``nvml`` supplies the NVML
    module: the real one by default, a recorded-answers fake in tests. Never raises for a missing GPU
    stack: no NVML means zero GPUs, with the reason logged.
    """
    cpu_count = _usable_cpu_count()
    memory = psutil.virtual_memory()
    stack = read_gpus(nvml())

    cpus = max(cpu_count - cfg.reserve_cpus, 0.0)
    if cfg.cpus != "auto":
        cpus = min(cpus, cfg.cpus)
    memory_mb = max(memory.total // MIB - cfg.reserve_memory_mb, 0)
    if cfg.memory_mb != "auto":
        memory_mb = min(memory_mb, cfg.memory_mb)
    gpu_count = len(stack.gpus) if cfg.gpus == "auto" else min(len(stack.gpus), cfg.gpus)

    return MachineInfo(
        cpu_count=cpu_count,
        memory_total_mb=memory.total // MIB,
        memory_available_mb=memory.available // MIB,
        disk=read_disk(disk_path),
        gpus=stack.gpus,
        driver_version=stack.driver_version,
        cuda_version=stack.cuda_version,
        offered=Resources(cpus=float(cpus), memory_mb=int(memory_mb), gpus=gpu_count),
    )
