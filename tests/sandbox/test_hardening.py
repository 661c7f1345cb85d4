"""Escape attempts from inside the real hardened container (the checks of tests/sandbox/battery.py).

Beside tests/sandbox/test_runner.py (identity, limits, network, read-only mounts), these try what a
hostile workload would reach for next: the engine's socket, kernel interfaces (/proc/sysrq-trigger,
/proc/kcore, /proc/sys, /sys), device nodes and mknod, setuid-root binaries, new namespaces, and what the
engine itself was told. The last test proves the battery has teeth: against a deliberately loosened
container every check reports what got through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import sandbox.runner
from sandbox.runner import RunSpec, SandboxRunner
from tests.sandbox.battery import BATTERY, SANDBOX_UID, Arena


@pytest.fixture
def arena(sandbox_runner: SandboxRunner, ffmpeg_image_id: str, docker_client: Any, tmp_path: Path) -> Arena:
    return Arena(runner=sandbox_runner, image=ffmpeg_image_id, workdir=tmp_path, docker=docker_client)


@pytest.mark.parametrize("check", sorted(BATTERY))
async def test_the_hardened_container_holds(arena: Arena, check: str) -> None:
    assert await BATTERY[check](arena) == []


async def test_the_battery_notices_a_loosened_sandbox(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root, Docker's default capabilities plus SYS_ADMIN, no seccomp or no-new-privileges, a device and
    the engine's socket passed in: what a careless change to the runner could do. Every check must see it.

    (Not ``privileged``: some engines, this VM's included, refuse it outright, which would prove nothing.)
    """
    strict = sandbox.runner._create_kwargs

    def loosened(spec: RunSpec, **kwargs: Any) -> dict[str, Any]:
        created = strict(spec, **kwargs)
        created |= {
            "user": "0:0",
            "cap_drop": [],
            "cap_add": ["SYS_ADMIN"],
            "security_opt": ["seccomp=unconfined"],
            "devices": ["/dev/null:/dev/sda:rwm"],
        }
        socket = sandbox.runner._sdk().types.Mount(
            "/var/run/docker.sock", "/var/run/docker.sock", type="bind", read_only=True
        )
        created["mounts"] = [*created["mounts"], socket]
        return created

    monkeypatch.setattr(sandbox.runner, "_create_kwargs", loosened)
    found = {name: await check(arena) for name, check in BATTERY.items()}
    assert all(found.values()), found
    assert "present=/var/run/docker.sock" in found["engine_socket"]
    assert f"euid=['0'], expected {SANDBOX_UID}" in found["setuid"]
    assert any(p.startswith("unshared=") for p in found["namespaces"])
    assert "Privileged" not in " ".join(found["engine_view"])  # caught for what it is, not by accident
    assert any(p.startswith("SecurityOpt=") for p in found["engine_view"])
