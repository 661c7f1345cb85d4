"""What one sandboxed run is: its specification and the checks on it, its result, and the labels it carries.

A :class:`RunSpec` is checked when it is made (an invalid one raises :class:`ValueError` naming every
problem); :class:`~sandbox.runner.SandboxRunner` runs it. Every container carries the labels
:data:`LABEL_JOB_ID`, :data:`LABEL_NODE` and :data:`LABEL_ATTEMPT`; a :class:`SandboxContainer` is such a
container as found on the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from core.defaults import DEFAULT_PIDS_LIMIT, DEFAULT_SANDBOX_USER, DEFAULT_TMPFS_MB
from sandbox._outdir import parse_user

OUTPUT_MOUNT = "/out"
TMP_MOUNT = "/tmp"
LABEL_JOB_ID = "hearth.job_id"
LABEL_NODE = "hearth.node"
LABEL_ATTEMPT = "hearth.attempt"
# the cluster worker that started the container (absent on a single machine): a worker that joins again
# removes what it left, and only that
LABEL_WORKER = "hearth.worker"

_MIN_MEMORY_MB = 6  # the engine refuses a smaller memory limit
# Input mounts may not hide or nest inside these (a mount point inside /out would land in the output).
_RESERVED_TARGETS = (OUTPUT_MOUNT, TMP_MOUNT, "/dev", "/proc", "/sys")


@dataclass(frozen=True, kw_only=True, slots=True)
class Mount:
    """A host file or directory that the workload reads at ``target``; always mounted read-only.

    ``cid`` is the content's address when it has one (a job's input, a model's weights): a run placed on
    another machine of a cluster fetches the input, or finds the model (``model``: weights a worker must
    already hold), by it rather than by ``host``.
    """

    host: Path
    target: str
    cid: str | None = None
    model: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """One run of one workload: what to run, what it may see, and the limits it runs under.

    ``image`` is best an image ID (``sha256:...``, see :meth:`~sandbox.runner.SandboxRunner.image_digest`) so
    that a run is pinned to exact bytes; a tag works too. ``argv`` is the whole command (``argv[0]`` replaces
    the image's entrypoint); it is never given to a shell. ``output_dir`` is mounted read-write at ``/out``
    and is the only place the workload can write apart from its size-limited ``/tmp``; the runner creates it
    and makes it writable for ``user``. Inputs must be readable by ``user``: world-readable, or (when the node
    is not root) group-readable by the node's group, which ``user`` then joins. ``gpu_ids`` pins the run to
    those NVIDIA devices (by index or UUID). ``shm_mb`` 0 means no ``/dev/shm`` at all.
    """

    image: str
    argv: tuple[str, ...]
    job_id: str
    output_dir: Path
    cpus: float
    memory_mb: int
    timeout_seconds: float
    max_output_bytes: int
    attempt: int = 0
    inputs: tuple[Mount, ...] = ()
    pids_limit: int = DEFAULT_PIDS_LIMIT
    tmpfs_mb: int = DEFAULT_TMPFS_MB
    shm_mb: int = 0
    gpu_ids: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = OUTPUT_MOUNT
    user: str = DEFAULT_SANDBOX_USER

    def __post_init__(self) -> None:
        problems = list(_spec_problems(self))
        if problems:
            raise ValueError("invalid RunSpec: " + "; ".join(problems))

    @property
    def gpus(self) -> int:
        """How many GPUs the run is pinned to."""
        return len(self.gpu_ids)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """How a successful run went: its exit code (0), wall time, output size and what ran it."""

    exit_code: int
    wall_seconds: float
    output_bytes: int
    container_id: str
    image_id: str
    stderr_tail: str
    # the cluster worker the run was placed on; "" when it ran on this machine
    worker: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class SandboxContainer:
    """A container this node made, as found on the engine (e.g. one a crash left behind)."""

    container_id: str
    job_id: str
    attempt: int | None
    state: str  # the engine's word: created, running, exited, dead, ...
    image_id: str


def _spec_problems(spec: RunSpec) -> Iterable[str]:
    """What is wrong with ``spec``, one sentence per problem; nothing for a valid spec."""
    if not spec.argv or not spec.argv[0]:
        yield "argv must name a program"
    if spec.cpus <= 0:
        yield "cpus must be positive"
    if spec.memory_mb < _MIN_MEMORY_MB:
        yield f"memory_mb must be at least {_MIN_MEMORY_MB}"
    if spec.timeout_seconds <= 0:
        yield "timeout_seconds must be positive"
    if spec.max_output_bytes < 0:
        yield "max_output_bytes must not be negative"
    if spec.pids_limit < 1 or spec.tmpfs_mb < 1 or spec.shm_mb < 0:
        yield "pids_limit and tmpfs_mb must be positive, shm_mb not negative"
    try:
        parse_user(spec.user)
    except ValueError as exc:
        yield str(exc)
    if not PurePosixPath(spec.workdir).is_absolute():
        yield "workdir must be an absolute path"
    targets = [str(PurePosixPath(m.target)) for m in spec.inputs]
    for target in targets:
        path = PurePosixPath(target)
        reserved = any(path.is_relative_to(r) for r in _RESERVED_TARGETS)
        if not path.is_absolute() or target == "/" or ".." in path.parts or reserved:
            yield f"input target {target!r} must be an absolute path outside / {' '.join(_RESERVED_TARGETS)}"
    if len(set(targets)) != len(targets):
        yield "input targets must be distinct"
