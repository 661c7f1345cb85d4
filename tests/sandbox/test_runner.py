"""The Docker sandbox, proven from inside its containers with the real engine and the hearth/ffmpeg image.

Each workload here is a small ``sh`` script (the image has dash, bash and coreutils from the base) that
tries what a hostile or broken workload would try, and reports what happened on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from core.defaults import DEFAULT_SANDBOX_USER
from core.errors import ExecutionError
from sandbox._streams import LineSplitter, Tail
from sandbox.runner import (
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_NODE,
    Mount,
    RunSpec,
    SandboxRunner,
    _create_kwargs,
)
from tests.sandbox.conftest import REPO

MIB = 1024 * 1024
SANDBOX_UID = int(DEFAULT_SANDBOX_USER.split(":")[0])
SERVICE_UID = 65534  # "nobody": stands in for a dedicated, unprivileged service user


def make_spec(image: str, out: Path, script: str, **overrides: Any) -> RunSpec:
    """A spec running ``sh -c script`` with small limits, so that every test stays quick."""
    fields: dict[str, Any] = {
        "image": image,
        "argv": ("sh", "-c", script),
        "job_id": f"job-{out.parent.name}"[:100],
        "output_dir": out,
        "cpus": 0.5,
        "memory_mb": 128,
        "timeout_seconds": 20,
        "max_output_bytes": 8 * MIB,
        "pids_limit": 64,
        "tmpfs_mb": 8,
    }
    fields.update(overrides)
    return RunSpec(**fields)


def key_values(lines: list[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines if "=" in line)


async def run_collecting(runner: SandboxRunner, spec: RunSpec) -> tuple[Any, list[str]]:
    lines: list[str] = []
    result = await runner.run(spec, on_stdout=lines.append)
    return result, lines


async def expect_failure(runner: SandboxRunner, spec: RunSpec, code: str) -> tuple[ExecutionError, list[str]]:
    lines: list[str] = []
    with pytest.raises(ExecutionError) as info:
        await runner.run(spec, on_stdout=lines.append)
    assert info.value.code == code, info.value.to_dict()
    assert not await runner.list_containers(job_id=spec.job_id), "the failed run's container was not removed"
    return info.value, lines


async def test_success_reports_result_and_streams_stdout(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    script = (
        "echo progress=continue; echo frame=12; printf progress=end; echo 'a warning' >&2;"
        " head -c 1000 /dev/zero > /out/result.bin"
    )
    result, lines = await run_collecting(sandbox_runner, make_spec(ffmpeg_image_id, out, script))
    assert lines == ["progress=continue", "frame=12", "progress=end"]
    assert result.exit_code == 0
    assert result.output_bytes == 1000 == (out / "result.bin").stat().st_size
    assert result.image_id == ffmpeg_image_id
    assert len(result.container_id) == 64
    assert "a warning" in result.stderr_tail
    assert 0 < result.wall_seconds < 20
    assert not await sandbox_runner.list_containers(job_id=f"job-{tmp_path.name}")


async def test_real_ffmpeg_runs_under_every_control(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = (
        "ffmpeg", "-hide_banner", "-nostdin", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=5", "-t", "1",
        "-c:v", "mpeg4", "-progress", "pipe:1", "/out/clip.mp4",
    )  # fmt: skip
    spec = replace(make_spec(ffmpeg_image_id, out, ""), argv=argv, memory_mb=256)
    result, lines = await run_collecting(sandbox_runner, spec)
    assert result.exit_code == 0
    assert "progress=end" in lines
    assert (out / "clip.mp4").stat().st_size == result.output_bytes > 0


async def test_identity_capabilities_and_limits_seen_from_inside(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    script = r"""
        echo uid=$(id -u)
        awk -F'\t' '/^(CapEff|CapPrm|CapBnd|NoNewPrivs):/ { sub(":", "", $1); print $1 "=" $2 }' /proc/self/status
        echo ifaces=$(ls /sys/class/net)
        echo root=$(awk '$2 == "/" { print $4 }' /proc/mounts)
        echo tmp=$(awk '$2 == "/tmp" { print $4 }' /proc/mounts)
        echo shm=$(awk '$2 == "/dev/shm"' /proc/mounts | wc -l)
        echo core=$(ulimit -c)
        cg=/sys/fs/cgroup
        echo pids=$(cat $cg/pids.max 2>/dev/null || cat $cg/pids/pids.max)
        echo mem=$(cat $cg/memory.max 2>/dev/null || cat $cg/memory/memory.limit_in_bytes)
        echo swap=$(cat $cg/memory.swap.max 2>/dev/null || echo $(( $(cat $cg/memory/memory.memsw.limit_in_bytes) - $(cat $cg/memory/memory.limit_in_bytes) )))
        echo cpu=$(cat $cg/cpu.max 2>/dev/null || echo $(cat $cg/cpu/cpu.cfs_quota_us) $(cat $cg/cpu/cpu.cfs_period_us))
    """  # noqa: E501
    spec = make_spec(
        ffmpeg_image_id, tmp_path / "out", script, pids_limit=48, memory_mb=96, cpus=0.5, tmpfs_mb=3
    )
    _, lines = await run_collecting(sandbox_runner, spec)
    seen = key_values(lines)
    assert seen["uid"] == str(SANDBOX_UID)
    assert int(seen["CapEff"], 16) == int(seen["CapPrm"], 16) == int(seen["CapBnd"], 16) == 0
    assert seen["NoNewPrivs"] == "1"
    assert seen["ifaces"] == "lo"
    assert seen["root"].split(",")[0] == "ro"
    assert {"rw", "nosuid", "nodev", "noexec", "size=3072k"} <= set(seen["tmp"].split(","))
    assert seen["shm"] == "0"
    assert seen["core"] == "0"
    assert seen["pids"] == "48"
    assert seen["mem"] == str(96 * MIB)
    assert seen["swap"] == "0"
    assert seen["cpu"] == "50000 100000"


async def test_inputs_and_root_fs_are_read_only(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("original")
    # World-writable on the host, so that only the read-only mount can be what stops the writes.
    inputs.chmod(0o777)
    (inputs / "a.txt").chmod(0o666)
    script = """
        for p in /in/a.txt /in/new.txt /var/tmp/x /etc/x; do { echo x >> "$p"; } 2>&1 && echo "wrote $p"; done
        cat /in/a.txt; echo
        echo ok > /out/ok.txt
    """
    spec = make_spec(ffmpeg_image_id, tmp_path / "out", script, inputs=(Mount(host=inputs, target="/in"),))
    result, lines = await run_collecting(sandbox_runner, spec)
    denied = [line for line in lines if "cannot create" in line]
    assert len(denied) == 4, lines
    assert all("Read-only file system" in line for line in denied), lines
    assert not any(line.startswith("wrote") for line in lines)
    assert "original" in lines
    assert (inputs / "a.txt").read_text() == "original"
    assert sorted(p.name for p in inputs.iterdir()) == ["a.txt"]
    assert (tmp_path / "out" / "ok.txt").read_text() == "ok\n"
    assert result.output_bytes == 3


async def test_tmp_is_size_limited_and_not_executable(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    script = """
        head -c 3M /dev/zero > /tmp/big 2>/dev/null; echo fill=$?
        echo size=$(stat -c %s /tmp/big)
        rm -f /tmp/big; cp /bin/true /tmp/t; /tmp/t 2>/dev/null; echo exec=$?
    """
    _, lines = await run_collecting(
        sandbox_runner, make_spec(ffmpeg_image_id, tmp_path / "out", script, tmpfs_mb=2)
    )
    seen = key_values(lines)
    assert seen["fill"] != "0"
    assert int(seen["size"]) <= 2 * MIB
    assert seen["exec"] == "126"  # found but not executable: noexec


async def test_no_network_reaches_out(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    with socket.socket() as listener:
        # Listening on every host address: a container on a normal network could reach this port.
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        targets = ["172.17.0.1", "127.0.0.1", _host_address()]
        script = " ".join(
            f"bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null && echo reached={ip} || echo blocked={ip};"
            for ip in targets
        )
        _, lines = await run_collecting(sandbox_runner, make_spec(ffmpeg_image_id, tmp_path / "out", script))
        assert lines == [f"blocked={ip}" for ip in targets]
        with pytest.raises(BlockingIOError):
            listener.accept()


async def test_fork_bomb_stops_at_the_pids_limit(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    # Counted, so the limit shows: each background sleep holds a pid until forking fails.
    script = "i=0; while [ $i -lt 500 ]; do sleep 30 & i=$((i + 1)); echo $i; done"
    spec = make_spec(ffmpeg_image_id, tmp_path / "counted", script, pids_limit=16)
    error, lines = await expect_failure(sandbox_runner, spec, "nonzero_exit")
    assert "fork" in error.details["stderr_tail"].lower()
    assert 5 < int(lines[-1]) < 16

    # The classic bomb: the run ends at its timeout at the latest, and the host is unharmed.
    bomb = make_spec(
        ffmpeg_image_id, tmp_path / "bomb", "b() { b | b & }; b; sleep 30", pids_limit=32, timeout_seconds=2
    )
    started = time.monotonic()
    with pytest.raises(ExecutionError) as info:
        await sandbox_runner.run(bomb)
    assert info.value.code in ("timeout", "nonzero_exit")
    assert time.monotonic() - started < 15
    host_child = await asyncio.create_subprocess_exec("true")
    assert await host_child.wait() == 0
    assert not await sandbox_runner.list_containers(job_id=bomb.job_id)


async def test_memory_hog_is_oom_killed(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    # tail holds an endless line in memory: it grows until the memory limit stops it.
    spec = make_spec(ffmpeg_image_id, tmp_path / "out", "head -c 512M /dev/zero | tail", memory_mb=48)
    error, _ = await expect_failure(sandbox_runner, spec, "oom_killed")
    assert error.details["memory_mb"] == 48
    assert error.details["exit_code"] == 137
    assert error.retryable is False


async def test_sleeper_is_killed_at_its_timeout(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    spec = make_spec(ffmpeg_image_id, tmp_path / "out", "echo started; sleep 60", timeout_seconds=1)
    error, lines = await expect_failure(sandbox_runner, spec, "timeout")
    assert lines == ["started"]
    assert 1 <= error.details["wall_seconds"] < 6
    assert error.details["timeout_seconds"] == 1
    assert error.retryable is True


async def test_output_cap_is_enforced_while_running(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    # An endless, slow writer: only watching the output directory can stop it before the timeout.
    script = "while true; do head -c 128K /dev/zero >> /out/big; sleep 0.02; done"
    spec = make_spec(ffmpeg_image_id, tmp_path / "out", script, max_output_bytes=MIB, timeout_seconds=30)
    error, _ = await expect_failure(sandbox_runner, spec, "output_cap_exceeded")
    assert error.details["wall_seconds"] < 10
    assert error.details["output_bytes"] > MIB
    assert error.details["max_output_bytes"] == MIB


async def test_output_cap_is_checked_at_the_end(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    # Written in one go, faster than any poll: the final measurement still catches it.
    script = "head -c 3M /dev/zero > /out/big"
    spec = make_spec(ffmpeg_image_id, tmp_path / "out", script, max_output_bytes=2 * MIB)
    error, _ = await expect_failure(sandbox_runner, spec, "output_cap_exceeded")
    assert error.details["output_bytes"] == 3 * MIB


async def test_nonzero_exit_carries_code_and_stderr(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    script = "head -c 20000 /dev/zero | tr '\\0' x >&2; echo; echo 'the real reason' >&2; exit 3"
    runner = SandboxRunner(node=sandbox_runner.node, stderr_tail_bytes=1024)
    try:
        error, _ = await expect_failure(
            runner, make_spec(ffmpeg_image_id, tmp_path / "out", script), "nonzero_exit"
        )
    finally:
        runner.close()
    assert error.details["exit_code"] == 3
    assert error.details["stderr_tail"].endswith("the real reason")
    assert len(error.details["stderr_tail"]) <= 1024
    assert error.details["image_id"] == ffmpeg_image_id
    assert error.domain == "execution"


async def test_labels_and_cancel_removes_the_container(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path, docker_client: Any
) -> None:
    spec = make_spec(ffmpeg_image_id, tmp_path / "out", "echo up; sleep 60", attempt=2)
    up = asyncio.Event()
    task = asyncio.create_task(sandbox_runner.run(spec, on_stdout=lambda _line: up.set()))
    await asyncio.wait_for(up.wait(), 15)
    [running] = await sandbox_runner.list_containers(job_id=spec.job_id)
    assert (running.job_id, running.attempt, running.state) == (spec.job_id, 2, "running")
    assert running.image_id == ffmpeg_image_id
    labels = docker_client.containers.get(running.container_id).labels
    expected = {LABEL_JOB_ID: spec.job_id, LABEL_NODE: sandbox_runner.node, LABEL_ATTEMPT: "2"}
    assert labels.items() >= expected.items()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await sandbox_runner.list_containers(job_id=spec.job_id)
    assert not docker_client.containers.list(all=True, filters={"id": running.container_id})


async def test_orphans_are_listed_and_removed(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, docker_client: Any
) -> None:
    # What a crash leaves behind: containers labelled for this node, one running, one exited.
    def orphan(job_id: str, node: str, argv: list[str]) -> Any:
        labels = {LABEL_JOB_ID: job_id, LABEL_NODE: node, LABEL_ATTEMPT: "0"}
        return docker_client.containers.run(
            ffmpeg_image_id, argv, detach=True, labels=labels, network_mode="none"
        )

    running = orphan("orphan-running", sandbox_runner.node, ["sleep", "60"])
    exited = orphan("orphan-exited", sandbox_runner.node, ["true"])
    foreign = orphan("orphan-foreign", "did:test:another-node", ["sleep", "60"])
    try:
        exited.wait(timeout=15)
        found = {c.job_id: c for c in await sandbox_runner.list_containers()}
        assert set(found) == {"orphan-running", "orphan-exited"}
        assert found["orphan-running"].state == "running"
        assert found["orphan-exited"].state == "exited"
        assert found["orphan-running"].container_id == running.id

        assert await sandbox_runner.remove_containers(job_id="orphan-exited") == [exited.id]
        assert sorted(await sandbox_runner.remove_containers()) == [running.id]
        assert await sandbox_runner.list_containers() == []
        assert docker_client.containers.get(foreign.id).status == "running"
    finally:
        for container in (running, exited, foreign):
            if _exists(docker_client, container.id):
                container.remove(force=True)


async def test_missing_image_and_unreachable_engine(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    with pytest.raises(ExecutionError) as info:
        await sandbox_runner.image_digest("hearth/not-built:latest")
    assert info.value.code == "image_missing"
    spec = make_spec("hearth/not-built:latest", tmp_path / "out", "true")
    with pytest.raises(ExecutionError) as info:
        await sandbox_runner.run(spec)
    assert info.value.code == "image_missing"
    assert info.value.retryable is False
    assert await sandbox_runner.image_digest("hearth/ffmpeg:latest") == ffmpeg_image_id

    # An engine address where nothing listens. (TCP rather than a missing unix socket: the SDK leaks the
    # socket of a failed unix connect, which this suite's warnings-as-errors would blame on the test.)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    gone = SandboxRunner(node="did:test:x", docker_url=f"tcp://127.0.0.1:{dead_port}")
    with pytest.raises(ExecutionError) as info:
        await gone.run(replace(spec, image=ffmpeg_image_id))
    assert (info.value.code, info.value.retryable) == ("docker_unavailable", True)
    with pytest.raises(ExecutionError) as info:
        await gone.ping()
    assert info.value.code == "docker_unavailable"


async def test_output_dir_is_writable_when_the_node_is_a_service_user(
    ffmpeg_image_id: str, sandbox_runner: SandboxRunner
) -> None:
    """The node as an unprivileged user in the docker group: the sandbox still writes, the node reads back."""
    docker_gid = os.stat("/var/run/docker.sock").st_gid
    with _service_user_dir() as home:
        out = home / "out"
        # The interpreter lives under root's home: the child loads everything first, then drops to the user.
        child = f"""
import asyncio, json, os
from pathlib import Path
from sandbox.runner import RunSpec, SandboxRunner

async def main():
    runner = SandboxRunner(node={sandbox_runner.node!r})
    await runner.ping()
    os.setgroups([{docker_gid}])
    os.setgid({SERVICE_UID})
    os.setuid({SERVICE_UID})
    script = "mkdir /out/sub; echo hi > /out/sub/f; id -u"
    spec = RunSpec(image={ffmpeg_image_id!r}, argv=("sh", "-c", script),
                   job_id="service-user", output_dir=Path({str(out)!r}), cpus=0.5, memory_mb=64,
                   timeout_seconds=20, max_output_bytes=1000)
    lines = []
    result = await runner.run(spec, on_stdout=lines.append)
    runner.close()
    read_back = (spec.output_dir / "sub" / "f").read_text()
    print(json.dumps({{"uid": os.getuid(), "bytes": result.output_bytes, "lines": lines, "read": read_back}}))

asyncio.run(main())
"""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            child,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()
        report = json.loads(stdout)
        assert report == {"uid": SERVICE_UID, "bytes": 3, "lines": [str(SANDBOX_UID)], "read": "hi\n"}
        written = out / "sub" / "f"
        assert (written.stat().st_uid, written.stat().st_gid) == (SANDBOX_UID, SERVICE_UID)
        assert (out.stat().st_uid, out.stat().st_mode & 0o7777) == (SERVICE_UID, 0o2770)


def test_gpu_pinning_builds_an_nvidia_device_request(tmp_path: Path) -> None:
    spec = make_spec("sha256:" + "0" * 64, tmp_path / "out", "true", gpu_ids=("1", "3"))
    kwargs = _create_kwargs(spec, node="did:test:gpu", group_add=[])
    [request] = kwargs["device_requests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == ["1", "3"]
    assert request["Capabilities"] == [["gpu"]]
    assert request["Count"] == 0  # exactly the pinned devices, never "all"
    assert spec.gpus == 2
    assert "device_requests" not in _create_kwargs(replace(spec, gpu_ids=()), node="n", group_add=[])


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"argv": ()}, "argv"),
        ({"inputs": (Mount(host=Path("/x"), target="/out"),)}, "input target"),
        ({"inputs": (Mount(host=Path("/x"), target="relative"),)}, "input target"),
        ({"inputs": (Mount(host=Path("/x"), target="/out/in"),)}, "input target"),
        ({"inputs": (Mount(host=Path("/x"), target="/in/../proc"),)}, "input target"),
        ({"inputs": (Mount(host=Path("/x"), target="/a"), Mount(host=Path("/y"), target="/a"))}, "distinct"),
        ({"user": "0:0"}, "non-root"),
        ({"user": "hearth"}, "non-root"),
        ({"memory_mb": 4}, "memory_mb"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_spec_rejects_unsafe_or_impossible_runs(
    tmp_path: Path, overrides: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        make_spec("img", tmp_path / "out", "true", **overrides)


def test_line_splitter_and_tail_stay_bounded() -> None:
    splitter = LineSplitter(max_line_bytes=4)
    assert splitter.feed(b"ab\ncd") == ["ab"]
    assert splitter.feed(b"efghijk") == ["cdef", "ghij"]  # no newline in sight: passed on in pieces
    assert splitter.feed("\né\r\n".encode()) == ["k", "é"]
    assert splitter.feed(b"end") == []
    assert splitter.flush() == ["end"]
    assert splitter.flush() == []
    tail = Tail(limit=5)
    tail.feed(b"0123")
    tail.feed(b"456789\n")
    assert tail.text() == "6789"


def _host_address() -> str:
    """This host's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        return str(probe.getsockname()[0])


def _exists(client: Any, container_id: str) -> bool:
    return bool(client.containers.list(all=True, filters={"id": container_id}))


@contextmanager
def _service_user_dir() -> Iterator[Path]:
    """A directory the service user owns, outside root's private pytest temp dirs."""
    home = Path(tempfile.mkdtemp(prefix="hearth-service-"))
    os.chown(home, SERVICE_UID, SERVICE_UID)
    try:
        yield home
    finally:
        shutil.rmtree(home)


async def test_stderr_lines_end_at_carriage_returns_too(
    sandbox_runner: SandboxRunner, ffmpeg_image_id: str, tmp_path: Path
) -> None:
    """A progress bar redraws with \\r: each redraw reaches ``on_stderr`` as a line; stdout is unaffected."""
    out = tmp_path / "out"
    script = r"printf 'a\rb\n' >&2; echo one; printf 'x\ry'; echo; printf 'c' >&2"
    stdout: list[str] = []
    stderr: list[str] = []
    result = await sandbox_runner.run(
        make_spec(ffmpeg_image_id, out, script), on_stdout=stdout.append, on_stderr=stderr.append
    )
    assert stderr == ["a", "b", "c"]  # the unterminated last line too, once the stream ends
    assert stdout == ["one", "x\ry"]  # stdout splits on newlines only
    assert result.exit_code == 0
    assert result.stderr_tail.endswith("b\nc")
