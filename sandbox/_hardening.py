"""The hardening of every sandbox container: all that ``containers.create`` is told (the README's Execution).

:func:`create_kwargs` turns a :class:`~sandbox.spec.RunSpec` into the engine's settings: a read-only root
filesystem, the output directory as the one writable bind mount and the inputs read-only, a size-limited
``noexec`` tmpfs on ``/tmp``, no network, every capability dropped, ``no-new-privileges``, the spec's
non-root user, pids/memory (no swap)/CPU limits, no core dumps, an init process, no logs kept by the
engine, ``/dev/shm`` only when asked for, and NVIDIA devices only those the spec names. None of it is
optional.
"""

from __future__ import annotations

from typing import Any

from sandbox._engine import sdk
from sandbox.spec import (
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_NODE,
    LABEL_WORKER,
    OUTPUT_MOUNT,
    TMP_MOUNT,
    RunSpec,
)

NVIDIA_DRIVER = "nvidia"


def create_kwargs(
    spec: RunSpec, *, node: str, group_add: list[str], worker: str | None = None
) -> dict[str, Any]:
    """Everything ``containers.create`` is told: the controls of the README's Execution for this spec.

    ``worker``: the cluster worker starting it, written in the ``hearth.worker`` label.
    """
    mounts = [sdk().types.Mount(OUTPUT_MOUNT, str(spec.output_dir.resolve()), type="bind", read_only=False)]
    mounts += [
        sdk().types.Mount(m.target, str(m.host.resolve()), type="bind", read_only=True) for m in spec.inputs
    ]
    kwargs: dict[str, Any] = {
        "entrypoint": [spec.argv[0]],
        "command": list(spec.argv[1:]),
        "user": spec.user,
        "working_dir": spec.workdir,
        "environment": dict(spec.env),
        "labels": {LABEL_JOB_ID: spec.job_id, LABEL_NODE: node, LABEL_ATTEMPT: str(spec.attempt)}
        | ({LABEL_WORKER: worker} if worker else {}),
        "read_only": True,
        "mounts": mounts,
        "tmpfs": {TMP_MOUNT: f"rw,noexec,nosuid,nodev,size={spec.tmpfs_mb}m"},
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": spec.pids_limit,
        "mem_limit": f"{spec.memory_mb}m",
        "memswap_limit": f"{spec.memory_mb}m",  # equal to the memory limit: no swap
        "nano_cpus": round(spec.cpus * 1e9),
        "ulimits": [sdk().types.Ulimit(name="core", soft=0, hard=0)],
        "init": True,  # a real PID 1 reaps the workload's children and forwards signals
        "log_config": sdk().types.LogConfig(type="none"),  # output is read live; nothing piles up on disk
        "stdin_open": False,
        "tty": False,
    }
    if group_add:
        kwargs["group_add"] = group_add
    if spec.shm_mb:
        kwargs |= {"ipc_mode": "private", "shm_size": f"{spec.shm_mb}m"}
    else:
        kwargs["ipc_mode"] = "none"
    if spec.gpu_ids:
        kwargs["device_requests"] = [
            sdk().types.DeviceRequest(
                driver=NVIDIA_DRIVER, device_ids=list(spec.gpu_ids), capabilities=[["gpu"]]
            )
        ]
    return kwargs
