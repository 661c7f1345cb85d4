"""Hearth's sandbox: workloads run in hardened containers, and the workloads themselves.

Public face:

- :class:`SandboxRunner` (:mod:`sandbox.runner`) runs a :class:`RunSpec` (:mod:`sandbox.spec`: image,
  argv, read-only inputs as :class:`Mount`, limits) in a container with every control of the sandbox
  (no network, read-only root, no capabilities, a fixed non-root user, pids/memory/CPU limits, a tmpfs),
  streams its output and gives a :class:`RunResult`; containers carry labels so a node finds its own.
- :mod:`sandbox.ffmpeg`: the FFmpeg workload (probe, plan, progress, output checks, thread rule).
- :mod:`sandbox.vllm`: the vLLM batch workload (batch parsing, plan, progress, output checks).

The underscore modules are the sandbox's own; other packages use the names above.
"""

from sandbox.runner import SandboxRunner as SandboxRunner
from sandbox.spec import Mount as Mount
from sandbox.spec import RunResult as RunResult
from sandbox.spec import RunSpec as RunSpec
from sandbox.spec import SandboxContainer as SandboxContainer
