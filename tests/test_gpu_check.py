"""`make gpu-check` (scripts/gpu_check.py): run as the Makefile runs it on this machine (no GPU: a clean
"no NVIDIA GPU" and its own exit status; a missing package: another), its comparison and verdicts against
recorded NVML answers with the kernels really run on the CPU, and, marked ``gpu``, the whole check on a
machine that has an NVIDIA GPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from core.config import NodeConfig, parse_config
from tests.conftest import REPO
from tests.provider.nvml_fake import FakeNvml, recorded_answers

SCRIPT = REPO / "scripts" / "gpu_check.py"

# What nvidia-smi answers for the four GPUs of tests/provider/fixtures/nvml_health.json.
SMI = "".join(
    f"{i}, NVIDIA H100 80GB HBM3, GPU-1a2b3c4d-000{i}-4e9a-9c71-2d5e8f0a7b1{i}, 81559\n" for i in range(4)
)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(
    gpu_check: ModuleType, tmp_path: Path, smi: str | None, cfg: NodeConfig | None = None
) -> tuple[int, dict[str, Any]]:
    fake = FakeNvml(recorded_answers("nvml_health"))
    status, report = gpu_check.check(
        cfg or NodeConfig(),
        nvml=lambda: fake,
        smi=lambda: smi,
        bench=gpu_check.direct_bench(
            0.1, 60.0, time.monotonic() + 120, device="cpu", python=lambda: gpu_check.torch_python(None)
        ),
        disk_path=tmp_path,
    )
    json.dumps(report)  # --json prints it as is
    return status, report


def test_without_a_gpu_it_says_so_and_exits_with_its_own_status() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["gpus"] == []
    assert report["reason"] == "no NVIDIA GPU: NVML is missing or sees no GPU"
    text = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert text.returncode == 2 and "no NVIDIA GPU" in text.stdout


def test_a_missing_package_is_named_with_its_own_status() -> None:
    # -S: no site-packages, as on a GPU machine with only PyTorch and nvidia-ml-py installed system-wide
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3
    report = json.loads(done.stderr)
    assert report["ok"] is False and report["reason"].startswith("missing Python package: ")


def test_it_compares_discovery_with_nvidia_smi_measures_and_judges(tmp_path: Path) -> None:
    gpu_check = load_script()
    status, report = run_check(gpu_check, tmp_path, SMI)
    assert status == gpu_check.EXIT_PROBLEM  # three GPUs are withheld on their health
    assert [row["uuid"] for row in report["nvidia_smi"]] == [g["uuid"] for g in report["gpus"]]
    assert not [p for p in report["problems"] if "nvidia-smi" in p or "NVML" in p]
    assert all(t["tflops"] > 0 and t["memory_bandwidth_gbs"] > 0 for t in report["selftest"])
    assert report["capacity"]["gpus"] == 1 and report["capacity"]["gpu_ids"] == ["0"]
    assert sorted(report["capacity"]["withheld"]) == ["1", "2", "3"]
    assert report["problems"] == [
        "GPU 1: withheld: temperature 91 C above 85 C",
        "GPU 2: withheld: 3 uncorrected ECC errors since the driver loaded (at most 0); "
        "a memory row remap is pending (the GPU needs a reset)",
        "GPU 3: withheld: clocks throttled: hw_thermal_slowdown",
    ]
    assert "the node would offer 1 GPU(s) ['0']" in gpu_check.render(report)

    lenient = parse_config(
        {"gpu": {"max_temperature_c": 95, "max_ecc_uncorrected": 9, "withhold_throttle_reasons": []}}
    )
    # the pending row remap still withholds GPU 2; [capacity] gpus caps the rest
    capped = lenient.model_copy(update={"capacity": parse_config({"capacity": {"gpus": 2}}).capacity})
    status, report = run_check(gpu_check, tmp_path, SMI, capped)
    assert report["capacity"]["gpu_ids"] == ["0", "1"] and list(report["capacity"]["withheld"]) == ["2"]


def test_a_mismatch_with_nvidia_smi_fails_the_check(tmp_path: Path) -> None:
    gpu_check = load_script()
    wrong = SMI.replace("81559", "40960", 1).replace("GPU-1a2b3c4d-0003", "GPU-ffffffff-0003")
    _, report = run_check(gpu_check, tmp_path, wrong)
    assert report["problems"][:2] == [
        "GPU 0: 81559 MiB (NVML) vs 40960 MiB (nvidia-smi)",
        "GPU 3: uuid GPU-1a2b3c4d-0003-4e9a-9c71-2d5e8f0a7b13 (NVML) vs "
        "GPU-ffffffff-0003-4e9a-9c71-2d5e8f0a7b13 (nvidia-smi)",
    ]
    _, report = run_check(gpu_check, tmp_path, SMI.splitlines(keepends=True)[0])
    assert report["problems"][0] == "NVML sees 4 GPU(s), nvidia-smi 1"
    status, report = run_check(gpu_check, tmp_path, None)
    assert status == gpu_check.EXIT_PROBLEM
    assert report["problems"][0] == "nvidia-smi is missing or failed: discovery cannot be compared"


def _gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU (with PyTorch and nvidia-ml-py)")
def test_the_whole_check_on_a_real_gpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(done.stdout)
    assert done.returncode == 0, report.get("problems", report)
    assert report["ok"] and report["capacity"]["gpus"] == len(report["gpus"]) >= 1
    assert all(t["tflops"] > 1 and t["memory_bandwidth_gbs"] > 10 for t in report["selftest"])
