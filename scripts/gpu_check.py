"""`make gpu-check`: what this machine's NVIDIA GPUs are, measure, and what a node here would offer.

For a machine with an NVIDIA GPU, PyTorch and nvidia-ml-py, but no Docker, no vLLM and no network. It runs
the node's own code, not a copy of it:

1. NVML discovery (:func:`provider.capacity.discover`), compared GPU by GPU with
   ``nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv,noheader``;
2. the self-test's kernels (:mod:`sandbox.gpu_bench`) on each GPU, directly rather than in a container:
   one process per GPU with only that GPU visible (``CUDA_VISIBLE_DEVICES=<uuid>``), as the sandbox pins it;
3. NVML health and the verdict of :func:`provider.gpu_health.verdict` under ``[gpu]``;
4. the GPUs the node would offer: the healthy ones, capped by ``[capacity] gpus``.

``--home DIR`` reads that node's node.toml for ``[capacity]`` and ``[gpu]`` (defaults otherwise); ``--json``
prints one JSON document. Bounded: each GPU's kernels get ``--timeout`` seconds, the whole check
``--deadline``. It needs, beside PyTorch and nvidia-ml-py, the light packages the node's capacity code
imports (pydantic, psutil, aiohttp); never docker, web3 or vLLM.

Exit status: 0 all well; 1 a mismatch with nvidia-smi, a kernel that did not measure, or a GPU withheld
on its health; 2 no NVIDIA GPU here (no NVML, or NVML sees none); 3 a package this check needs is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_NO_GPU = 2
EXIT_MISSING_PACKAGE = 3

SMI_QUERY = ("nvidia-smi", "--query-gpu=index,name,uuid,memory.total", "--format=csv,noheader,nounits")
SMI_TIMEOUT_SECONDS = 30.0
MEMORY_TOLERANCE_MB = 1  # NVML's bytes floored to MiB against nvidia-smi's MiB

try:
    from core.config import NodeConfig, load_config
    from provider.capacity import GpuInfo, Nvml, discover, load_nvml
    from provider.gpu_health import GpuFigures, GpuReport, figures_from_output, read_health, verdict
    from sandbox import gpu_bench
except ImportError as missing:  # the machine lacks a package the node's capacity code needs
    print(
        json.dumps({"ok": False, "reason": f"missing Python package: {missing.name or missing}"}),
        file=sys.stderr,
    )
    sys.exit(EXIT_MISSING_PACKAGE)

Bench = Callable[[GpuInfo], GpuFigures]


def nvidia_smi() -> str | None:
    """nvidia-smi's CSV answer, or None where there is no nvidia-smi (or it fails)."""
    if shutil.which(SMI_QUERY[0]) is None:
        return None
    try:
        done = subprocess.run(
            SMI_QUERY, capture_output=True, text=True, timeout=SMI_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 else None


def parse_smi(text: str) -> list[dict[str, Any]]:
    """nvidia-smi's rows (``0, NVIDIA H100 80GB HBM3, GPU-..., 81559``) as dicts."""
    rows = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        index, name, uuid, memory = fields
        rows.append(
            {"index": int(index), "name": name, "uuid": uuid, "memory_total_mb": int(memory.split()[0])}
        )
    return rows


def mismatches(gpus: tuple[GpuInfo, ...], smi: list[dict[str, Any]] | None) -> list[str]:
    """Where NVML discovery and nvidia-smi disagree, one sentence each; [] when they agree."""
    if smi is None:
        return ["nvidia-smi is missing or failed: discovery cannot be compared"]
    problems = []
    if len(smi) != len(gpus):
        problems.append(f"NVML sees {len(gpus)} GPU(s), nvidia-smi {len(smi)}")
    by_index = {row["index"]: row for row in smi}
    for gpu in gpus:
        row = by_index.get(gpu.index)
        if row is None:
            problems.append(f"GPU {gpu.index}: not in nvidia-smi's list")
            continue
        if row["name"] != gpu.name:
            problems.append(f"GPU {gpu.index}: name {gpu.name!r} (NVML) vs {row['name']!r} (nvidia-smi)")
        if row["uuid"] != gpu.uuid:
            problems.append(f"GPU {gpu.index}: uuid {gpu.uuid} (NVML) vs {row['uuid']} (nvidia-smi)")
        if abs(row["memory_total_mb"] - gpu.memory_total_mb) > MEMORY_TOLERANCE_MB:
            smi_mb = row["memory_total_mb"]
            problems.append(f"GPU {gpu.index}: {gpu.memory_total_mb} MiB (NVML) vs {smi_mb} MiB (nvidia-smi)")
    return problems


def torch_python(explicit: str | None) -> str:
    """The interpreter the kernels run under: ``explicit``, else this one or ``python3``, whichever has
    PyTorch (the check's own packages and PyTorch may live in different environments); else this one, and
    the kernels then report that PyTorch is missing."""
    if explicit:
        return explicit
    for candidate in (sys.executable, shutil.which("python3")):
        if candidate is None:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import torch"], capture_output=True, timeout=120, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return candidate
    return sys.executable


def direct_bench(
    seconds: float, timeout: float, deadline: float, *, device: str = "cuda", python: Callable[[], str]
) -> Bench:
    """Runs :mod:`sandbox.gpu_bench` under ``python()`` in a process of its own that sees only the GPU
    measured (by UUID), as the sandbox pins it."""

    def run(gpu: GpuInfo) -> GpuFigures:
        left = min(timeout, deadline - time.monotonic())
        if left <= 0:
            return GpuFigures(error="not measured: the check's deadline passed")
        env = dict(
            os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=gpu.uuid or str(gpu.index)
        )
        argv = [python(), gpu_bench.__file__, "--device", device, "--seconds", str(seconds)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=left, env=env, check=False)
        except subprocess.TimeoutExpired:
            return GpuFigures(error=f"the kernels ran past {left:.0f} s")
        lines = done.stdout.strip().splitlines()
        return figures_from_output(lines[-1] if lines else None, exit_code=done.returncode)

    return run


def check(
    cfg: NodeConfig,
    *,
    nvml: Callable[[], Nvml | None],
    smi: Callable[[], str | None],
    bench: Bench,
    disk_path: Path,
    now: Callable[[], float] = time.time,
) -> tuple[int, dict[str, Any]]:
    """The whole check: (exit status, the report)."""
    machine = discover(cfg.capacity, disk_path=disk_path, nvml=nvml)
    report: dict[str, Any] = {
        "ok": False,
        "driver_version": machine.driver_version,
        "cuda_version": machine.cuda_version,
        "gpus": [gpu.to_dict() for gpu in machine.gpus],
    }
    if not machine.gpus:
        return EXIT_NO_GPU, report | {"reason": "no NVIDIA GPU: NVML is missing or sees no GPU"}
    answer = smi()
    smi_rows = None if answer is None else parse_smi(answer)
    problems = mismatches(machine.gpus, smi_rows)
    health = read_health(nvml())
    reports: list[GpuReport] = []
    for gpu in machine.gpus:
        figures = bench(gpu)
        reading = health.get(gpu.index)
        reports.append(
            GpuReport(
                index=gpu.index,
                uuid=gpu.uuid,
                measured_at=int(now()),
                figures=figures,
                health=reading,
                reasons=verdict(reading, figures, cfg.gpu),
            )
        )
        if figures.error:
            problems.append(f"GPU {gpu.index}: not measured: {figures.error}")
        if reading is None:
            problems.append(f"GPU {gpu.index}: NVML gave no health reading")
    healthy = [r.index for r in reports if r.healthy]
    cap = cfg.capacity.gpus
    offered = healthy if cap == "auto" else healthy[:cap]
    problems += [f"GPU {r.index}: withheld: {'; '.join(r.reasons)}" for r in reports if r.reasons]
    report |= {
        "ok": not problems,
        "nvidia_smi": smi_rows,
        "selftest": [r.to_dict() for r in reports],
        "capacity": {
            "gpus": len(offered),
            "gpu_ids": [str(i) for i in offered],
            "withheld": {str(r.index): list(r.reasons) for r in reports if r.reasons},
            "cpus": machine.offered.cpus,
            "memory_mb": machine.offered.memory_mb,
        },
        "problems": problems,
    }
    return (EXIT_PROBLEM if problems else EXIT_OK), report


def render(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    lines = [f"driver {report.get('driver_version')}, CUDA {report.get('cuda_version')}"]
    for gpu in report["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']} ({gpu['uuid']}), {gpu['memory_total_mb']} MiB")
    if "reason" in report:
        return "\n".join([*lines, report["reason"]])
    lines.append(f"nvidia-smi: {'agrees' if report['nvidia_smi'] is not None else 'not available'}")
    for test in report["selftest"]:
        health = test["health"] or {}
        lines.append(
            f"GPU {test['index']}: {test['tflops']} TFLOP/s ({test['dtype']} matmul), "
            f"{test['memory_bandwidth_gbs']} GB/s device memory; {health.get('temperature_c')} C, "
            f"ECC uncorrected {health.get('ecc_uncorrected')}, throttle {health.get('throttle_reasons')}: "
            + ("healthy" if test["healthy"] else f"withheld ({test['withheld']})")
        )
    capacity = report["capacity"]
    lines.append(
        f"the node would offer {capacity['gpus']} GPU(s) {capacity['gpu_ids']}, "
        f"{capacity['cpus']:g} CPUs, {capacity['memory_mb']} MiB"
    )
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--home", type=Path, default=None, help="a node home whose node.toml to apply")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per kernel per GPU (default 2)")
    parser.add_argument("--timeout", type=float, default=180.0, help="one GPU's kernels, start-up included")
    parser.add_argument("--deadline", type=float, default=540.0, help="the whole check (default 540 s)")
    parser.add_argument("--kernel-python", default=None, help="the interpreter with PyTorch (default: found)")
    args = parser.parse_args(argv)
    cfg = NodeConfig() if args.home is None else load_config(args.home)
    deadline = time.monotonic() + args.deadline
    with tempfile.TemporaryDirectory() as scratch:
        status, report = check(
            cfg,
            nvml=load_nvml,
            smi=nvidia_smi,
            bench=direct_bench(
                args.seconds,
                args.timeout,
                deadline,
                python=functools.cache(
                    lambda: torch_python(args.kernel_python)
                ),  # looked for once, if needed
            ),
            disk_path=args.home or Path(scratch),
        )
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
