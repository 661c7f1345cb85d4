"""The worker's side of a run placed on a Ray cluster (DESIGN §14): what executes inside the Ray task.

:func:`run` is the task's body, a generator whose items stream back to the head while the run goes on:

``placed``  where it landed (the worker's name, Ray node id, host), before anything else happens;
``lines``   the container's stdout/stderr lines as they come (gathered a fraction of a second at a time);
``root``    the CID of the output folder, imported as UnixFS once the container exited well;
``car``     that folder's DAG as CAR pieces (the head verifies every block against its CID);
``done``    how the run went (the fields of :class:`~sandbox.spec.RunResult`);
``error``   a refusal or failure, as :meth:`core.errors.HearthError.to_dict` gives it, plus its class.

Every input is fetched by its CID from the head's gateway into a blockstore of the run's own (each block
verified), a model is found by its CID among the weights the worker's home lists, and the container runs
under the very controls it has on one machine (:class:`sandbox.runner.SandboxRunner`), labelled with the
node, the job, the attempt and this worker. A small reaper process outlives the task: should the task's
process die (its raylet killed, the task force-cancelled, the node's driver gone) it removes the run's
container and folder, so a lost worker leaves nothing running behind it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from core.config import SandboxSection, StorageSection
from core.errors import ExecutionError, HearthError
from sandbox.runner import (
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_NODE,
    LABEL_WORKER,
    Mount,
    RunSpec,
    SandboxRunner,
)
from storage import Blockstore, fetch_input, import_path, iter_car

log = logging.getLogger("hearth.cluster.task")

CAR_PIECE_BYTES = 1024 * 1024  # what one ``car`` item carries at most
LINES_EVERY_SECONDS = 0.2  # lines are gathered this long into one ``lines`` item
EVENT_QUEUE = 16  # items waiting for the generator; a slow head holds the worker back, not its memory
_END = object()
MAX_RUNNERS = 8  # runners kept per Ray worker process (one per node and sandbox settings, in practice one)
_RUNNERS: dict[tuple[str, str, str, str], SandboxRunner] = {}

# Waits for the task's process to end, then removes the run's container(s) and folder. Arguments: the pid,
# the engine's address, the folder, then `docker ps` filters. A zombie counts as ended: a task killed with
# its raylet may wait a long while for someone to reap it.
_REAPER = """
pid=$1; host=$2; dir=$3; shift 3
while stat=$(cat /proc/"$pid"/stat 2>/dev/null); do
  state=${stat##*) }; [ "${state%% *}" = Z ] && break
  sleep 0.5
done
ids=$(docker -H "$host" ps -aq "$@" 2>/dev/null)
[ -n "$ids" ] && docker -H "$host" rm -f -v $ids >/dev/null 2>&1
rm -rf "$dir"
"""
# Starts the reaper ($0, with its arguments) in the background and prints its pid: the reaper is then no
# child of the task's process.
_DETACH = 'sh -c "$0" hearth-reaper "$@" </dev/null >/dev/null 2>&1 & echo $!'


def run(order: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The task: run ``order`` (built by :class:`cluster.RemoteRunner`) here, streaming its items back."""
    events: queue.Queue[Any] = queue.Queue(maxsize=EVENT_QUEUE)
    lines: collections.deque[tuple[str, str]] = collections.deque()

    def work() -> None:
        try:
            asyncio.run(_work(order, events, lines))
        except BaseException as exc:  # the error path itself must not fail: say so and end
            log.exception("the run failed outside its own handling")
            events.put(_error_item(exc))
        finally:
            events.put(_END)

    thread = threading.Thread(target=work, name="hearth-cluster-run", daemon=True)
    thread.start()
    while True:
        try:
            item = events.get(timeout=LINES_EVERY_SECONDS)
        except queue.Empty:
            item = None
        gathered = _drain(lines)
        if gathered is not None:
            yield gathered
        if item is _END:
            break
        if item is not None:
            yield item
    thread.join()


def _drain(lines: collections.deque[tuple[str, str]]) -> dict[str, Any] | None:
    if not lines:
        return None
    taken: dict[str, list[str]] = {"stdout": [], "stderr": []}
    while lines:
        stream, line = lines.popleft()
        taken[stream].append(line)
    return {"type": "lines", **taken}


async def _work(
    order: Mapping[str, Any], events: queue.Queue[Any], lines: collections.deque[tuple[str, str]]
) -> None:
    from cluster.worker import WorkerHome  # the worker's own settings: where it keeps models and runs

    async def emit(item: dict[str, Any]) -> None:
        await asyncio.to_thread(events.put, item)

    home = WorkerHome.load()
    await emit(
        {
            "type": "placed",
            "worker": home.name,
            "node_id": _node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
    )
    folder = home.work_dir / f"{order['job_id'][:64]}-{order['attempt']}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True)
        store = await asyncio.to_thread(Blockstore.open, folder / "blocks", verify_reads=False)
        mounts = await _inputs(order, home.models, store, folder / "in")
        runner = _runner(order, home.name, home.docker_url)
        spec = RunSpec(
            **order["spec"],
            job_id=order["job_id"],
            attempt=order["attempt"],
            output_dir=folder / "out",
            inputs=mounts,
            gpu_ids=_gpu_ids(int(order.get("gpus", 0))),
        )
        streams = set(order.get("streams", ()))

        def on(stream: str) -> Any:
            return (lambda line: lines.append((stream, line))) if stream in streams else None

        reaper = _start_reaper(order, home.name, home.docker_url, folder)
        try:
            result = await runner.run(spec, on_stdout=on("stdout"), on_stderr=on("stderr"))
        finally:
            _stop_reaper(reaper)
        imported = await asyncio.to_thread(import_path, spec.output_dir, store)
        await emit({"type": "root", "cid": str(imported.cid)})
        for piece in await asyncio.to_thread(_car_pieces, store, imported.cid):
            await emit({"type": "car", "data": piece})
        await emit(
            {
                "type": "done",
                "result": {
                    "exit_code": result.exit_code,
                    "wall_seconds": result.wall_seconds,
                    "output_bytes": result.output_bytes,
                    "container_id": result.container_id,
                    "image_id": result.image_id,
                    "stderr_tail": result.stderr_tail,
                    "worker": home.name,
                },
            }
        )
    except HearthError as exc:
        await emit(_error_item(exc))
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)


async def _inputs(
    order: Mapping[str, Any], models: Mapping[str, Path], store: Blockstore, folder: Path
) -> tuple[Mount, ...]:
    """Every mount of the run, here: inputs fetched by CID from the head's gateway, models found locally."""
    storage = StorageSection.model_validate({**order["storage"], "gateways": [order["head_url"]]})
    mounts: list[Mount] = []
    for index, wanted in enumerate(order["inputs"]):
        cid, target = str(wanted["cid"]), str(wanted["target"])
        if wanted["kind"] == "model":
            path = models.get(cid)
            if path is None:
                raise ExecutionError(
                    "model_missing",
                    f"this worker does not hold model {cid}",
                    details={"cid": cid},
                    retryable=True,
                )
        else:
            (folder / str(index)).mkdir(parents=True)
            fetched = await fetch_input(
                f"ipfs://{cid}", folder / str(index) / "input", store=store, config=storage
            )
            path = fetched.path
        mounts.append(Mount(host=path, target=target, cid=cid))
    return tuple(mounts)


def _runner(order: Mapping[str, Any], worker: str, docker_url: str) -> SandboxRunner:
    """The runner for ``order``'s node and sandbox settings on this worker, kept for the next run: a Ray
    worker process runs task after task, and its engine connection (version negotiation included) is
    worth keeping between them."""
    key = (str(order["node"]), worker, docker_url, json.dumps(order["sandbox"], sort_keys=True))
    runner = _RUNNERS.get(key)
    if runner is None:
        if len(_RUNNERS) >= MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS))).close()
        runner = SandboxRunner.from_config(
            SandboxSection.model_validate(order["sandbox"]), node=key[0], worker=worker, docker_url=docker_url
        )
        _RUNNERS[key] = runner
    return runner


def _car_pieces(store: Blockstore, root: Any) -> list[bytes]:
    """The output's CAR in pieces of at most :data:`CAR_PIECE_BYTES` (blocks are at most 2 MiB)."""
    pieces: list[bytes] = []
    current = bytearray()
    for piece in iter_car(store, root):
        if current and len(current) + len(piece) > CAR_PIECE_BYTES:
            pieces.append(bytes(current))
            current.clear()
        current += piece
    if current:
        pieces.append(bytes(current))
    return pieces


def _start_reaper(order: Mapping[str, Any], worker: str, docker_url: str, folder: Path) -> int | None:
    """The pid of the process that cleans up after this task should it die; None where there is no
    docker CLI. It is started detached (in a session of its own, and not this process's child): a Ray
    worker that exits takes its children with it, and the reaper must outlive exactly that."""
    if shutil.which("docker") is None or shutil.which("sh") is None:
        log.warning(
            "no docker CLI on this worker: a run lost with its task is removed when the worker joins again"
        )
        return None
    filters = [
        f"{LABEL_NODE}={order['node']}",
        f"{LABEL_WORKER}={worker}",
        f"{LABEL_JOB_ID}={order['job_id']}",
        f"{LABEL_ATTEMPT}={order['attempt']}",
    ]
    args = [str(os.getpid()), docker_url, str(folder)]
    for label in filters:
        args += ["--filter", f"label={label}"]
    started = subprocess.run(
        ["sh", "-c", _DETACH, _REAPER, *args],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    pid = started.stdout.strip()
    return int(pid) if pid.isdigit() else None


def _stop_reaper(pid: int | None) -> None:
    """The task ended by itself: its reaper has nothing to do."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _error_item(exc: BaseException) -> dict[str, Any]:
    if not isinstance(exc, HearthError):
        exc = ExecutionError(
            "worker_failed",
            f"the worker failed running the container: {type(exc).__name__}: {exc}",
            retryable=True,
        )
    return {"type": "error", "class": type(exc).__name__, **exc.to_dict()["error"]}


def _node_id() -> str:
    with contextlib.suppress(Exception):
        import ray

        return str(ray.get_runtime_context().get_node_id())
    return ""


def _gpu_ids(count: int) -> tuple[str, ...]:
    """The devices Ray gave this task (it sets them aside per task); none for a CPU run."""
    if count <= 0:
        return ()
    import ray

    return tuple(str(g) for g in ray.get_gpu_ids())[:count]


def clean(node: str, job_id: str | None = None, attempt: int | None = None) -> dict[str, Any]:
    """Remove this worker's containers of ``node`` (only ``job_id``'s attempt's when given):
    ``{"worker", "removed": [IDs]}``, or ``{"error": ...}`` as :func:`run` words one.

    Run on every live worker when the node starts (its recovery) and on a run's worker when it is cancelled.
    """
    return _on_engine(lambda r: r.remove_containers(job_id=job_id, attempt=attempt), "removed", node=node)


def image_id(ref: str) -> dict[str, Any]:
    """The ID of image ``ref`` on this worker's engine: ``{"worker", "image"}`` or ``{"error": ...}``."""
    return _on_engine(lambda r: r.image_digest(ref), "image")


def _on_engine(ask: Any, key: str, *, node: str = "-") -> dict[str, Any]:
    """One question to this worker's engine, answered as a plain document (nothing to unpickle)."""
    from cluster.worker import WorkerHome

    try:
        home = WorkerHome.load()
        runner = SandboxRunner(node=node, worker=home.name, docker_url=home.docker_url)
        try:
            return {"worker": home.name, key: asyncio.run(ask(runner))}
        finally:
            runner.close()
    except Exception as exc:
        return {"error": _error_item(exc)}
