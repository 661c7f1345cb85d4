"""Hearth sandbox: hardened container runner and workloads."""

from sandbox.runner import Mount as Mount
from sandbox.runner import RunResult as RunResult
from sandbox.runner import RunSpec as RunSpec
from sandbox.runner import SandboxContainer as SandboxContainer
from sandbox.runner import SandboxRunner as SandboxRunner
