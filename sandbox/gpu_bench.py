"""The GPU self-test's kernels: a short matmul (TFLOP/s) and a device memory copy (GB/s), as one JSON line.

This file is a program as much as a module. The node runs it *inside the sandbox* (the vLLM GPU image, which
has PyTorch; one GPU pinned, no network; see :mod:`provider.gpu_selftest`), mounted read-only and started as
``python3 gpu_bench.py --device cuda``; ``make gpu-check`` runs it directly on each GPU of a machine without
Docker. So it imports nothing of Hearth and nothing beyond the standard library but PyTorch or numpy, found
at run time.

Backends, in the order ``--device auto`` tries them: PyTorch on CUDA (bf16 where the card supports it, else
fp16), PyTorch on the CPU (fp32), numpy on the CPU (fp32). ``--device cuda`` insists on CUDA: a GPU figure
measured on a CPU would be a lie, so without CUDA it fails (exit 3) rather than fall back. The CPU paths are
what the tests run on a machine without a GPU, so the code that times and reports is really exercised.

Each kernel is timed for about ``--seconds`` after a warm-up, in doubling batches of calls, so a slow
device does not run for minutes and a fast one is timed over many calls. The output is one line::

    {"backend": "torch", "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
     "matmul_n": 8192, "tflops": 712.4, "bandwidth_mb": 1024, "memory_bandwidth_gbs": 2861.0, "seconds": 3.1}

On failure it prints ``{"error": "..."}`` and exits non-zero (2: bad arguments, 3: no CUDA, 4: the kernel
failed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_NO_CUDA = 3
EXIT_KERNEL_FAILED = 4

# Sizes per device class: large enough to reach a GPU's peak, small enough for a CPU to finish in a second.
GPU_MATMUL_N = 8192
GPU_BANDWIDTH_MB = 1024
CPU_MATMUL_N = 512
CPU_BANDWIDTH_MB = 64
MAX_CALLS = 1_000_000  # of one kernel: a bound for a kernel far faster than expected


def _module(name: str) -> Any:
    """``name`` imported, or None where it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _timed(run: Callable[[], None], sync: Callable[[], None], seconds: float) -> tuple[int, float]:
    """(calls, seconds they took): after one warm-up call, batches of calls, doubling, until ``seconds``.

    The clock is read only after a batch has synchronised, so a GPU's queue is timed whole; a batch is never
    more calls than all before it, so the run ends within about twice ``seconds`` however the speed moves.
    """
    run()
    sync()
    calls, batch = 0, 1
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            run()
        sync()
        calls += batch
        took = time.perf_counter() - start
        if took >= seconds or calls >= MAX_CALLS:
            return calls, took
        batch = min(batch * 2, MAX_CALLS - calls)


def _torch_matmul_tflops(
    torch: Any, device: str, dtype: Any, sync: Callable[[], None], seconds: float, n: int
) -> float:
    """An n x n matmul's TFLOP/s (2 n^3 operations a call); the tensors are freed on return."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    calls, took = _timed(lambda: torch.matmul(a, b, out=c), sync, seconds)
    return 2.0 * n**3 * calls / took / 1e12


def _torch_copy_gbs(torch: Any, device: str, sync: Callable[[], None], seconds: float, mb: int) -> float:
    """Device memory bandwidth in GB/s: a copy of ``mb`` MiB reads and writes every byte."""
    elements = mb * 1024 * 1024 // 4
    src = torch.ones(elements, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    calls, took = _timed(lambda: dst.copy_(src), sync, seconds)
    return 2.0 * elements * 4 * calls / took / 1e9


def _torch_bench(torch: Any, device: str, seconds: float, n: int, mb: int) -> dict[str, Any]:
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(device)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        name = str(torch.cuda.get_device_name(device))

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        dtype = torch.float32
        name = "cpu"

        def sync() -> None:
            return None

    tflops = _torch_matmul_tflops(torch, device, dtype, sync, seconds, n)
    gbs = _torch_copy_gbs(torch, device, sync, seconds, mb)
    return {
        "backend": "torch",
        "device": device,
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "tflops": tflops,
        "bandwidth_mb": mb,
        "memory_bandwidth_gbs": gbs,
    }


def _numpy_bench(np: Any, seconds: float, n: int, mb: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    calls, took = _timed(lambda: np.matmul(a, b, out=c), lambda: None, seconds)
    tflops = 2.0 * n**3 * calls / took / 1e12

    elements = mb * 1024 * 1024 // 4
    src = np.ones(elements, dtype=np.float32)
    dst = np.empty_like(src)
    calls, took = _timed(lambda: np.copyto(dst, src), lambda: None, seconds)
    gbs = 2.0 * elements * 4 * calls / took / 1e9
    return {
        "backend": "numpy",
        "device": "cpu",
        "device_name": "cpu",
        "dtype": "float32",
        "matmul_n": n,
        "tflops": tflops,
        "bandwidth_mb": mb,
        "memory_bandwidth_gbs": gbs,
    }


class NoCuda(Exception):
    """``--device cuda`` was asked for where PyTorch sees no CUDA device (or PyTorch is missing)."""


def measure(
    device: str = "auto",
    *,
    seconds: float = 1.0,
    matmul_n: int | None = None,
    bandwidth_mb: int | None = None,
) -> dict[str, Any]:
    """Run both kernels on ``device`` ("auto", "cuda", "cuda:N", "cpu") and return the figures.

    Sizes default per device class (:data:`GPU_MATMUL_N` and :data:`GPU_BANDWIDTH_MB` on a GPU, the CPU ones
    otherwise). Raises :class:`NoCuda` where a CUDA device was asked for and there is none.
    """
    torch = _module("torch")
    cuda = torch is not None and bool(torch.cuda.is_available())
    if device.startswith("cuda") and not cuda:
        raise NoCuda(
            "no CUDA device: " + ("PyTorch is not installed" if torch is None else "PyTorch sees none")
        )
    started = time.perf_counter()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda"):
        target = "cuda:0" if device == "cuda" else device
        figures = _torch_bench(
            torch, target, seconds, matmul_n or GPU_MATMUL_N, bandwidth_mb or GPU_BANDWIDTH_MB
        )
    elif torch is not None:
        figures = _torch_bench(
            torch, "cpu", seconds, matmul_n or CPU_MATMUL_N, bandwidth_mb or CPU_BANDWIDTH_MB
        )
    else:
        np = _module("numpy")
        if np is None:
            raise NoCuda("neither PyTorch nor numpy is installed")
        figures = _numpy_bench(np, seconds, matmul_n or CPU_MATMUL_N, bandwidth_mb or CPU_BANDWIDTH_MB)
    figures["tflops"] = round(figures["tflops"], 3)
    figures["memory_bandwidth_gbs"] = round(figures["memory_bandwidth_gbs"], 1)
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per kernel (default 1)")
    parser.add_argument("--matmul-n", type=int, default=None, help="matrix side (default by device)")
    parser.add_argument("--bandwidth-mb", type=int, default=None, help="copied buffer (default by device)")
    args = parser.parse_args(argv)
    if not (args.device in ("auto", "cuda", "cpu") or args.device.startswith("cuda:")):
        print(json.dumps({"error": f"unknown device {args.device!r}"}), flush=True)
        return 2
    if not 0 < args.seconds <= 60:
        print(json.dumps({"error": "--seconds must be in (0, 60]"}), flush=True)
        return 2
    try:
        figures = measure(
            args.device, seconds=args.seconds, matmul_n=args.matmul_n, bandwidth_mb=args.bandwidth_mb
        )
    except NoCuda as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return EXIT_NO_CUDA
    except Exception as exc:  # a CUDA error, out of memory: the verdict of this GPU, reported as data
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}), flush=True)
        return EXIT_KERNEL_FAILED
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
