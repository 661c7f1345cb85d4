"""Hearth sandbox: hardened container runner and workloads."""

from sandbox.runner import SandboxRunner as SandboxRunner
from sandbox.spec import Mount as Mount
from sandbox.spec import RunResult as RunResult
from sandbox.spec import RunSpec as RunSpec
from sandbox.spec import SandboxContainer as SandboxContainer
