"""Escape attempts from inside the real hardened container, each judged from what the workload saw.

Every check runs a small ``sh`` script in a container made by :class:`~sandbox.runner.SandboxRunner` (so
with every control of the README's Execution, exactly as a job gets them) in the hearth/ffmpeg image, and
returns the
problems it found: an empty list means the sandbox held. The scripts print ``key=value`` lines; a key that
names an achievement (``wrote=``, ``made=``, ``reached=``...) is an escape. Shared by
tests/sandbox/test_hardening.py (one test per check) and the fault scoreboard (every check, many times).

Some kernel files differ between hosts (a VM kernel may have no /proc/kcore or /proc/sysrq-trigger at
all); the checks hold either way: absent, masked by Docker (an empty file) or read-only, never usable.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.defaults import DEFAULT_SANDBOX_USER
from sandbox.runner import Mount, RunSpec, SandboxRunner

MIB = 1024 * 1024
SANDBOX_UID = DEFAULT_SANDBOX_USER.split(":")[0]
# What a workload may find in /dev: Docker's default pseudo-devices, nothing that reaches hardware.
ALLOWED_CHAR_DEVICES = frozenset(
    {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/pts/ptmx"}
)
# Mount points a workload may see: its own root, /out, /tmp and inputs, the kernel's pseudo file systems,
# and the few files the engine itself binds in (read-only to the sandbox user; checked below).
ENGINE_FILES = ("/etc/resolv.conf", "/etc/hostname", "/etc/hosts")
ALLOWED_MOUNTS = frozenset({"/", "/out", "/tmp", "/in", "/proc", "/dev", "/sys", "/usr/sbin/docker-init"})
ALLOWED_MOUNT_TREES = ("/proc/", "/dev/", "/sys/")
# Docker's defaults, which the runner must not switch off: hidden, and read-only, kernel interfaces.
MASKED_PATHS = frozenset({"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"})
READONLY_PATHS = frozenset({"/proc/sysrq-trigger", "/proc/sys", "/proc/bus", "/proc/irq"})
ENGINE_VIEW_WAIT_SECONDS = 30


@dataclass(frozen=True, slots=True)
class Arena:
    """Where checks run: the runner, the image, a scratch folder on the host, and a docker SDK client."""

    runner: SandboxRunner
    image: str
    workdir: Path
    docker: Any


Check = Callable[[Arena], Awaitable[list[str]]]


async def run_script(
    arena: Arena, name: str, script: str, *, inputs: tuple[Mount, ...] = ()
) -> dict[str, list[str]]:
    """Run ``script`` under every control; its ``key=value`` lines by key (``done`` proves it ended)."""
    out = arena.workdir / f"{name}-{uuid.uuid4().hex[:8]}"
    spec = RunSpec(
        image=arena.image,
        argv=("sh", "-c", script + "\necho done=1"),
        job_id=f"battery-{name}",
        output_dir=out / "out",
        cpus=0.5,
        memory_mb=128,
        timeout_seconds=30,
        max_output_bytes=8 * MIB,
        pids_limit=64,
        tmpfs_mb=8,
        inputs=inputs,
    )
    lines: list[str] = []
    await arena.runner.run(spec, on_stdout=lines.append)
    seen: dict[str, list[str]] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            seen.setdefault(key, []).append(value)
    return seen


def _escapes(seen: dict[str, list[str]], *keys: str) -> list[str]:
    problems = [f"{key}={value}" for key in keys for value in seen.get(key, [])]
    if seen.get("done") != ["1"]:
        problems.append("the script did not run to its end")
    return problems


async def engine_socket(arena: Arena) -> list[str]:
    """No Docker (or containerd) socket, no socket file at all, and no way to the engine's TCP port."""
    script = r"""
        for s in /var/run/docker.sock /run/docker.sock /run/containerd/containerd.sock /var/run/docker; do
            [ -e "$s" ] && echo "present=$s"
        done
        for d in / /out /tmp /run /var/run /dev; do
            find "$d" -xdev -type s 2>/dev/null | sed 's/^/socket=/'
        done
        grep -q 'docker.sock\|containerd' /proc/self/mountinfo && echo mounted=engine-socket
        for ip in 172.17.0.1 127.0.0.1; do
            for port in 2375 2376; do
                bash -c "exec 3<>/dev/tcp/$ip/$port" 2>/dev/null && echo "reached=$ip:$port"
            done
        done
    """
    return _escapes(await run_script(arena, "socket", script), "present", "socket", "mounted", "reached")


async def kernel_interfaces(arena: Arena) -> list[str]:
    """sysrq cannot be triggered, kcore and the other masked files give nothing, /proc/sys and /sys are ro."""
    script = r"""
        { echo h > /proc/sysrq-trigger; } 2>/dev/null && echo wrote=/proc/sysrq-trigger
        for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/kpagecount; do
            n=$(head -c 64 "$f" 2>/dev/null | wc -c); [ "$n" -gt 0 ] && echo "read=$f:$n bytes"
        done
        n=$(awk '$1 !~ /^0+$/' /proc/kallsyms 2>/dev/null | wc -l)
        [ "$n" -gt 0 ] && echo "read=kallsyms:$n addresses"
        # Each file gets its own value back: a write that succeeds is the escape, and harms nothing.
        for f in /proc/sys/kernel/panic /proc/sys/vm/swappiness /sys/kernel/uevent_helper \
                 /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes \
                 /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max; do
            [ -e "$f" ] && v=$(cat "$f" 2>/dev/null) && { echo "$v" > "$f"; } 2>/dev/null && echo "wrote=$f"
        done
        ls /sys/firmware 2>/dev/null | sed 's/^/firmware=/'
    """
    return _escapes(await run_script(arena, "kernel", script), "wrote", "read", "firmware")


async def devices(arena: Arena) -> list[str]:
    """/dev holds only pseudo-devices (no block device, no host device) and mknod fails everywhere."""
    script = r"""
        find /dev -type b 2>/dev/null | sed 's/^/block=/'
        find /dev -type c 2>/dev/null | sed 's/^/char=/'
        for spec in "sda b 8 0" "mem c 1 1" "kmsg c 1 11" "fuse c 10 229"; do
            set -- $spec
            for dir in /out /tmp; do
                mknod "$dir/$1" "$2" "$3" "$4" 2>/dev/null && echo "made=$dir/$1"
            done
        done
        for f in /dev/mem /dev/kmem /dev/port /dev/kmsg /dev/sda /dev/vda /dev/fuse /dev/nvidia0; do
            [ -e "$f" ] && echo "present=$f"
        done
    """
    seen = await run_script(arena, "devices", script)
    problems = _escapes(seen, "block", "made", "present")
    problems += [f"char={dev}" for dev in seen.get("char", []) if dev not in ALLOWED_CHAR_DEVICES]
    return problems


async def setuid(arena: Arena) -> list[str]:
    """A setuid-root binary gives no privilege: not one the host hands in, nor the image's own, nor a new one.

    The host prepares the strongest case it can: the image's own ``id``, owned by root with the setuid bit,
    in a read-only input. Inside, ``no-new-privileges`` keeps the effective uid the sandbox's. The image's
    own setuid-root ``mount`` stays powerless too. The workload may set the setuid bit on a copy it owns
    (the kernel allows that to any owner), which grants only its own uid; making that copy root's fails.
    """
    host_dir = arena.workdir / f"suid-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(_setuid_root_copy, arena, "/usr/bin/id", host_dir / "id")
    script = r"""
        echo "mode=$(stat -c %a:%u /in/id)"
        echo "euid=$(/in/id -u)"
        mount -t tmpfs none /out 2>/dev/null && echo mounted=/out
        cp /usr/bin/id /out/id && chmod 4755 /out/id && echo "own_mode=$(stat -c %a:%u /out/id)"
        chown 0:0 /out/id 2>/dev/null && echo chowned=/out/id
        echo "own_euid=$(/out/id -u)"
        cp /usr/bin/id /tmp/id 2>/dev/null && chmod 4755 /tmp/id
        /tmp/id -u 2>/dev/null && echo exec=/tmp/id
        for b in /usr/bin/su /usr/bin/newgrp /usr/bin/passwd; do
            [ -u "$b" ] && echo "image_suid=$b"
        done
    """
    seen = await run_script(arena, "setuid", script, inputs=(Mount(host=host_dir, target="/in"),))
    problems = _escapes(seen, "mounted", "chowned", "exec")
    if seen.get("mode") != ["4755:0"]:
        problems.append(f"the host's setuid-root copy did not arrive as such: {seen.get('mode')}")
    for key in ("euid", "own_euid"):
        if seen.get(key) != [SANDBOX_UID]:
            problems.append(f"{key}={seen.get(key)}, expected {SANDBOX_UID}")
    if not seen.get("image_suid"):
        problems.append("the image has no setuid-root binary to try: the check proves nothing")
    return problems


async def namespaces(arena: Arena) -> list[str]:
    """Seccomp filters, no new namespaces, no chroot or priority raise, a private PID space, few mounts."""
    script = r"""
        awk -F'\t' '/^(Seccomp|NoNewPrivs):/ { sub(":", "", $1); print $1 "=" $2 }' /proc/self/status
        for ns in -U -m -n -p -i -u -C; do unshare $ns -f true 2>/dev/null && echo "unshared=$ns"; done
        chroot / true 2>/dev/null && echo chrooted=/
        echo "niceness=$(nice -n -5 nice 2>/dev/null)"
        echo "procs=$(ls /proc | grep -cE '^[0-9]+$')"
        echo "pid1=$(cat /proc/1/comm)"
        for f in /etc/hosts /etc/hostname /etc/resolv.conf /usr/sbin/docker-init; do
            [ -e "$f" ] && true 2>/dev/null >> "$f" && echo "wrote=$f"
        done
        awk '{ print "mount=" $2 }' /proc/mounts
    """
    seen = await run_script(arena, "namespaces", script)
    problems = _escapes(seen, "unshared", "chrooted", "wrote")
    expected = {"Seccomp": ["2"], "NoNewPrivs": ["1"], "niceness": ["0"], "pid1": ["docker-init"]}
    problems += [f"{k}={seen.get(k)}, expected {v}" for k, v in expected.items() if seen.get(k) != v]
    procs = seen.get("procs", ["?"])[0]
    if not procs.isdigit() or int(procs) > 16:
        problems.append(f"procs={procs}: the workload sees processes beyond its own")
    problems += [
        f"mount={m}"
        for m in seen.get("mount", [])
        if m not in ALLOWED_MOUNTS and m not in ENGINE_FILES and not m.startswith(ALLOWED_MOUNT_TREES)
    ]
    return problems


async def engine_view(arena: Arena) -> list[str]:
    """What the engine was told, read back while the container runs: nothing of §6 is loosened.

    Not privileged, no capability added, no device passed in, Docker's masked and read-only kernel paths
    intact, seccomp and no-new-privileges on, no host namespace shared, only /out bound from the host.
    """
    gate = "/out/.gate"
    script = f"echo up=1; i=0; while [ ! -e {gate} ] && [ $i -lt {ENGINE_VIEW_WAIT_SECONDS * 10} ]; do"
    script += " sleep 0.1; i=$((i + 1)); done"
    up = asyncio.Event()
    job_id = f"battery-engine-{uuid.uuid4().hex[:8]}"
    out = arena.workdir / job_id / "out"

    async def inspect_when_up() -> dict[str, Any]:
        await asyncio.wait_for(up.wait(), ENGINE_VIEW_WAIT_SECONDS)
        [container] = await arena.runner.list_containers(job_id=job_id)
        attrs: dict[str, Any] = await asyncio.to_thread(
            arena.docker.api.inspect_container, container.container_id
        )
        (out / ".gate").touch()
        return attrs

    spec = RunSpec(
        image=arena.image,
        argv=("sh", "-c", script),
        job_id=job_id,
        output_dir=out,
        cpus=0.5,
        memory_mb=64,
        timeout_seconds=ENGINE_VIEW_WAIT_SECONDS + 10,
        max_output_bytes=MIB,
    )
    inspecting = asyncio.create_task(inspect_when_up())
    try:
        await arena.runner.run(spec, on_stdout=lambda line: up.set() if line == "up=1" else None)
    finally:
        if not inspecting.done():  # the run failed before the gate opened: nothing left to inspect
            inspecting.cancel()
            await asyncio.gather(inspecting, return_exceptions=True)
    return _engine_problems(await inspecting, out)


def _engine_problems(attrs: dict[str, Any], out: Path) -> list[str]:
    host = attrs["HostConfig"]
    problems: list[str] = []
    wanted: dict[str, Any] = {
        "Privileged": False,
        "ReadonlyRootfs": True,
        "NetworkMode": "none",
        "IpcMode": "none",
        "PidMode": "",
        "UsernsMode": "",
        "CapDrop": ["ALL"],
    }
    problems += [f"{k}={host.get(k)!r}" for k, v in wanted.items() if host.get(k) != v]
    problems += [f"{k}={host[k]!r}" for k in ("CapAdd", "Devices", "DeviceCgroupRules") if host.get(k)]
    security = host.get("SecurityOpt") or []
    if not any(opt.startswith("no-new-privileges") for opt in security):
        problems.append(f"SecurityOpt={security}: no no-new-privileges")
    problems += [f"SecurityOpt={opt}" for opt in security if "unconfined" in opt]
    problems += [f"unmasked {p}" for p in sorted(MASKED_PATHS - set(host.get("MaskedPaths") or []))]
    problems += [f"writable {p}" for p in sorted(READONLY_PATHS - set(host.get("ReadonlyPaths") or []))]
    sources = {m.get("Source") for m in attrs.get("Mounts", [])}
    if sources != {str(out.resolve())}:
        problems.append(f"host paths bound in: {sorted(str(s) for s in sources)}")
    return problems


def _setuid_root_copy(arena: Arena, path: str, dest: Path) -> None:
    """Copy ``path`` out of the image (so it runs there) to ``dest``, owned by root, mode 4755."""
    container = arena.docker.containers.create(arena.image, ["true"], network_mode="none")
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.getmembers()[0]
            data = tar.extractfile(member)
            assert data is not None, f"{path} is not a regular file in the image"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data.read())
    finally:
        container.remove(force=True)
    os.chown(dest, 0, 0)
    dest.chmod(0o4755)
    dest.parent.chmod(0o755)


BATTERY: dict[str, Check] = {
    "engine_socket": engine_socket,
    "kernel_interfaces": kernel_interfaces,
    "devices": devices,
    "setuid": setuid,
    "namespaces": namespaces,
    "engine_view": engine_view,
}
