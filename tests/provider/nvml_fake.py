"""A stand-in for the ``pynvml`` module that answers from recorded NVML answers (tests/provider/fixtures).

It satisfies :class:`provider.capacity.Nvml`, so :func:`provider.capacity.discover` takes it through its
``nvml=`` seam exactly as it takes the real module. A reading missing from the recording is answered the
way a driver without that call answers: ``NVML_ERROR_FUNCTION_NOT_FOUND``; a health reading recorded as
``"not_supported"`` (ECC on a card without it) as NVML answers it there: ``NVML_ERROR_NOT_SUPPORTED``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


def recorded_answers(name: str) -> dict[str, Any]:
    """The recorded NVML answers in ``fixtures/<name>.json``."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


class FakeNvml:
    """Answers NVML calls from ``recorded``; ``fail`` names one call that raises ``fail_with`` instead."""

    # The exception classes pynvml defines, with the same inheritance.
    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_FunctionNotFound(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    def __init__(
        self, recorded: dict[str, Any], *, fail: str | None = None, fail_with: type[Exception] | None = None
    ) -> None:
        self.recorded = recorded
        self.fail = fail
        self.fail_with = fail_with or self.NVMLError
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise self.fail_with(f"recorded failure of {name}")

    def nvmlInit(self) -> None:
        self._call("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> bytes:
        self._call("nvmlSystemGetDriverVersion")
        return str(self.recorded["driver_version"]).encode()

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call("nvmlSystemGetCudaDriverVersion")
        if "cuda_driver_version" not in self.recorded:
            raise self.NVMLError_FunctionNotFound("Function Not Found")
        return int(self.recorded["cuda_driver_version"])

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.recorded["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        self._call("nvmlDeviceGetHandleByIndex")
        device: dict[str, Any] = self.recorded["devices"][index]
        return device

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> bytes:
        self._call("nvmlDeviceGetName")
        return str(handle["name"]).encode()

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> bytes:
        self._call("nvmlDeviceGetUUID")
        return str(handle["uuid"]).encode()

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(**handle["memory"])

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        self._call("nvmlDeviceGetUtilizationRates")
        if handle["utilization"] == "not_supported":
            raise self.NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(**handle["utilization"])

    def nvmlDeviceGetCudaComputeCapability(self, handle: dict[str, Any]) -> tuple[int, int]:
        self._call("nvmlDeviceGetCudaComputeCapability")
        if "cuda_compute_capability" not in handle:
            raise self.NVMLError_FunctionNotFound("Function Not Found")
        major, minor = handle["cuda_compute_capability"]
        return int(major), int(minor)

    # -- health (provider.gpu_health): the readings of a device's "health" object, by NVML's enum values

    def _health(self, name: str, handle: dict[str, Any], key: str) -> Any:
        self._call(name)
        health = handle.get("health", {})
        if key not in health:
            raise self.NVMLError_FunctionNotFound("Function Not Found")
        if health[key] == "not_supported":
            raise self.NVMLError_NotSupported("Not Supported")
        return health[key]

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return int(self._health("nvmlDeviceGetTemperature", handle, "temperature_gpu"))

    def nvmlDeviceGetTotalEccErrors(self, handle: dict[str, Any], error_type: int, counter_type: int) -> int:
        assert counter_type == 0  # NVML_VOLATILE_ECC
        key = {0: "ecc_volatile_corrected", 1: "ecc_volatile_uncorrected"}[error_type]
        return int(self._health("nvmlDeviceGetTotalEccErrors", handle, key))

    def nvmlDeviceGetRemappedRows(self, handle: dict[str, Any]) -> tuple[int, int, int, int]:
        rows = self._health("nvmlDeviceGetRemappedRows", handle, "remapped_rows")
        return int(rows[0]), int(rows[1]), int(rows[2]), int(rows[3])

    def nvmlDeviceGetClockInfo(self, handle: dict[str, Any], clock: int) -> int:
        key = {1: "clock_sm_mhz", 2: "clock_mem_mhz"}[clock]
        return int(self._health("nvmlDeviceGetClockInfo", handle, key))

    def nvmlDeviceGetMaxClockInfo(self, handle: dict[str, Any], clock: int) -> int:
        key = {1: "max_clock_sm_mhz", 2: "max_clock_mem_mhz"}[clock]
        return int(self._health("nvmlDeviceGetMaxClockInfo", handle, key))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: dict[str, Any]) -> int:
        return int(
            self._health("nvmlDeviceGetCurrentClocksThrottleReasons", handle, "clocks_throttle_reasons")
        )
