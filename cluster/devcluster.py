"""A real Ray cluster on this machine, for tests, the benchmark and ``hearth demo --cluster``.

:class:`DevCluster` starts a head (``ray start --head``, no CPUs or GPUs of its own, so every task goes to a
worker) and workers that join it the way an operator's boxes do: each gets a worker home under ``root`` and
runs ``hearth worker join`` (orphan removal, then ``ray start --address``). The head detects a dead node
within seconds rather than Ray's default half minute.

Addresses: a node started as ``ray start --address 127.0.0.1:<port>`` swaps in the machine's own address, and
one started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which stops the swap) binds its GCS to loopback
alone and refuses to join another node's cluster. So the nodes run without it (it is removed from their
environment), listen on the machine's address and register there; :attr:`DevCluster.address` (127.0.0.1)
still reaches the head, for workers and drivers alike.

Authentication: every process of the cluster (nodes, and the driver through :meth:`DevCluster.env`) runs with
Ray's token authentication on and a token of this cluster's own (``root/auth_token``), so a cluster here
neither depends on nor is broken by the token a local ``ray.init()`` leaves in ``~/.ray``, and nothing
without the token can use it.

Each ``ray start`` runs in a session of its own: the daemons it leaves keep its process group, so a worker
is killed (:meth:`DevCluster.stop_worker`) or made to vanish at the raylet (:meth:`DevCluster.kill_raylet`)
by signalling that group alone, and :meth:`DevCluster.stop` ends every process of this cluster and no other
(never ``ray stop``, which ends every Ray process of the machine). The calling process never connects to the
cluster: questions go through a short-lived driver subprocess, so the process under test (a Hearth node) can
be the cluster's driver. Every wait is bounded and ends in :class:`TimeoutError` saying what it waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import psutil

from cluster.names import worker_resource
from cluster.worker import WorkerHome
from core.defaults import DEFAULT_DOCKER_URL

# What a driver adds to its environment: nothing, since multi-node Ray refuses loopback (see the module).
RAY_LOOPBACK_ENV: Final[dict[str, str]] = {}
TOKEN_FILENAME: Final = "auth_token"
_NOT_ON_NODES: Final = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",)  # a node with it cannot form a cluster
# The head declares a silent node dead after ~3 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECK_ENV: Final = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
}
DEFAULT_DEV_OBJECT_STORE_MB: Final = 80  # Ray's floor is 75 MiB
DEFAULT_START_TIMEOUT_SECONDS: Final = 90.0
DEFAULT_WORKER_ALIVE_TIMEOUT_SECONDS: Final = 60.0
DEFAULT_STOP_TIMEOUT_SECONDS: Final = 20.0
_POLL_SECONDS: Final = 0.2
_SOURCE_ROOT: Final = Path(__file__).resolve().parent.parent  # the folder holding Hearth's packages

# A driver run in a subprocess: it waits until a node (or none) matches, then prints every node as JSON.
_DRIVER = r"""
import json, sys, time
import ray
address, want, name, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + timeout
while True:
    nodes = [
        {"node_id": n["NodeID"], "alive": bool(n["Alive"]), "address": n["NodeManagerAddress"],
         "resources": n.get("Resources") or {}}
        for n in ray.nodes()
    ]
    named = [n for n in nodes if n["alive"] and name in n["resources"]]
    done = want == "any" or (want == "alive" and named) or (want == "dead" and not named)
    if done or time.monotonic() > deadline:
        print(json.dumps({"done": bool(done), "nodes": nodes}))
        break
    time.sleep(0.2)
"""


@dataclass(frozen=True)
class DevWorker:
    """A worker of a :class:`DevCluster`: its home and the process group every process of it is in."""

    name: str
    home: WorkerHome
    pgid: int
    node_id: str


class DevCluster:
    """A head and workers on this machine, everything under ``root`` and in process groups it owns.

    ``port`` is the head's GCS port (a free one when None). ``object_store_mb`` is each node's object store;
    the small default keeps several nodes inside a test machine's ``/dev/shm``.
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        object_store_mb: int = DEFAULT_DEV_OBJECT_STORE_MB,
        ray_bin: Path | None = None,
    ) -> None:
        self.root = root.absolute()
        self.port = port or _free_port()
        self.object_store_mb = object_store_mb
        self._ray = ray_bin or Path(sys.executable).parent / "ray"
        self._head_pgid: int | None = None
        self._workers: dict[str, DevWorker] = {}
        # Ray's Unix sockets live in its temp dir and AF_UNIX paths are short: a pytest tmp_path is too
        # long, so the temp dir is a short folder of our own, linked from root and removed with the cluster.
        self._temp_dir: Path | None = None
        self.token_path = self.root / TOKEN_FILENAME

    @property
    def address(self) -> str:
        """The head's Ray address, as workers and drivers use it."""
        return f"127.0.0.1:{self.port}"

    @property
    def workers(self) -> Mapping[str, DevWorker]:
        return dict(self._workers)

    @property
    def head_pgid(self) -> int | None:
        """The head's process group; None before :meth:`start_head` and after :meth:`stop`."""
        return self._head_pgid

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with what a driver of this cluster must run with:
        the cluster's token."""
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        return {**(os.environ if base is None else base), **RAY_LOOPBACK_ENV, **auth}

    def _node_env(self) -> dict[str, str]:
        """What a node's ``ray start`` runs with: the driver's environment less :data:`_NOT_ON_NODES`, and
        Hearth's source importable by every Ray worker process (they run Hearth's task code) even where
        Hearth is not installed."""
        env = {k: v for k, v in self.env().items() if k not in _NOT_ON_NODES}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
        return env

    # -- lifecycle -------------------------------------------------------------------------------------

    def start_head(self, *, timeout: float = DEFAULT_START_TIMEOUT_SECONDS) -> None:
        """Start the head: the GCS on ``port``, no resources of its own, no dashboard."""
        if self._head_pgid is not None:
            raise RuntimeError("the head is already started")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            self.token_path.touch(mode=0o600)
            self.token_path.write_text(secrets.token_hex(32))
        self._temp_dir = Path(tempfile.mkdtemp(prefix="hearth-ray-"))
        link = self.root / "ray"
        link.unlink(missing_ok=True)
        link.symlink_to(self._temp_dir)
        command = [
            str(self._ray),
            "start",
            "--head",
            "--port",
            str(self.port),
            "--temp-dir",
            str(self._temp_dir),
            "--num-cpus",
            "0",
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(self.object_store_mb * 1024 * 1024),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ]
        env = {**self._node_env(), **FAST_HEALTH_CHECK_ENV}
        self._head_pgid = self._run_in_own_group(command, env, self.root / "head-start.log", timeout)

    def add_worker(
        self,
        name: str,
        *,
        cpus: int = 1,
        memory_mb: int = 2048,
        models: Mapping[str, Path] | None = None,
        docker_url: str = DEFAULT_DOCKER_URL,
        timeout: float = DEFAULT_WORKER_ALIVE_TIMEOUT_SECONDS,
    ) -> DevWorker:
        """Write a worker home for ``name`` and join it with ``hearth worker join``; returns once the head
        sees it alive with its ``hearth-worker:<name>`` resource."""
        if self._head_pgid is None:
            raise RuntimeError("start the head first (start_head)")
        if name in self._workers:
            raise ValueError(f"worker {name!r} is already in this cluster")
        home = WorkerHome.write(self.root / "workers" / name, name=name, docker_url=docker_url, models=models)
        command = [
            sys.executable,
            "-m",
            "cli.main",
            "worker",
            "join",
            "--worker-home",
            str(home.path),
            "--address",
            self.address,
            "--num-cpus",
            str(cpus),
            "--num-gpus",
            "0",
            "--memory-mb",
            str(memory_mb),
            "--object-store-mb",
            str(self.object_store_mb),
            "--json",
        ]
        log = home.path / "join.log"
        pgid = self._run_in_own_group(command, self._node_env(), log, DEFAULT_START_TIMEOUT_SECONDS)
        # Known before it is seen alive, so stop() ends it whatever happens next.
        self._workers[name] = DevWorker(name=name, home=home, pgid=pgid, node_id="")
        nodes = self._wait_for(name, "alive", timeout)
        node_id = next(n["node_id"] for n in nodes if n["alive"] and worker_resource(name) in n["resources"])
        worker = DevWorker(name=name, home=home, pgid=pgid, node_id=node_id)
        self._workers[name] = worker
        return worker

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the head knows, alive or dead: ``node_id``, ``alive``, ``address``, ``resources``."""
        return self._query("any", "", DEFAULT_START_TIMEOUT_SECONDS)[1]

    def alive_workers(self) -> dict[str, str]:
        """Name -> Ray node ID of every worker the head holds alive."""
        prefix = worker_resource("")
        return {
            key[len(prefix) :]: node["node_id"]
            for node in self.nodes()
            if node["alive"]
            for key in node["resources"]
            if key.startswith(prefix)
        }

    def wait_worker_dead(self, name: str, *, timeout: float = DEFAULT_WORKER_ALIVE_TIMEOUT_SECONDS) -> None:
        """Return once the head no longer holds worker ``name`` alive; TimeoutError after ``timeout``."""
        self._wait_for(name, "dead", timeout)

    def kill_raylet(self, name: str) -> int:
        """SIGKILL worker ``name``'s raylet alone (as a machine dropping off the network would look to the
        head); returns its pid. The worker's other processes notice and exit on their own."""
        worker = self._worker(name)
        for proc in _group(worker.pgid):
            with contextlib.suppress(psutil.Error):
                if proc.name() == "raylet":
                    os.kill(proc.pid, signal.SIGKILL)
                    return proc.pid
        raise ProcessLookupError(f"worker {name!r} has no raylet running (process group {worker.pgid})")

    def stop_worker(self, name: str, *, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> None:
        """Kill every process of worker ``name`` (its process group) and wait until they are gone."""
        worker = self._worker(name)
        os.killpg(worker.pgid, signal.SIGKILL)
        left = _wait_until_gone([worker.pgid], timeout)
        if left:
            raise TimeoutError(f"worker {name!r}'s processes outlived SIGKILL for {timeout:g}s: {left}")
        del self._workers[name]

    def stop(self, *, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> None:
        """Kill every process of this cluster, workers first, and wait until none is left.

        The short Ray temp dir is removed; ``root`` (logs, worker homes) is left for reading.
        """
        groups = [w.pgid for w in self._workers.values()]
        if self._head_pgid is not None:
            groups.append(self._head_pgid)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        left = _wait_until_gone(groups, timeout)
        self._workers.clear()
        self._head_pgid = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            (self.root / "ray").unlink(missing_ok=True)
            self._temp_dir = None
        if left:
            raise TimeoutError(f"Ray processes of this cluster outlived SIGKILL for {timeout:g}s: {left}")

    def __enter__(self) -> DevCluster:
        try:
            self.start_head()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------------

    def _worker(self, name: str) -> DevWorker:
        try:
            return self._workers[name]
        except KeyError:
            raise KeyError(f"no worker {name!r} in this cluster (have: {sorted(self._workers)})") from None

    def _run_in_own_group(self, command: list[str], env: Mapping[str, str], log: Path, timeout: float) -> int:
        """Run ``command`` as a new session's leader, to its end; returns the group its daemons stay in."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_groups_now([proc.pid])
            proc.wait()
            raise TimeoutError(
                f"{' '.join(command[:6])} ... did not finish in {timeout:g}s; see {log}"
            ) from None
        if rc != 0:
            _end_groups_now([proc.pid])
            raise RuntimeError(f"{' '.join(command[:6])} ... exited with {rc}:\n{_tail(log)}")
        return proc.pid

    def _wait_for(self, name: str, want: str, timeout: float) -> list[dict[str, Any]]:
        done, nodes = self._query(want, worker_resource(name), timeout)
        if not done:
            state = "alive" if want == "alive" else "gone"
            raise TimeoutError(
                f"worker {name!r} was not {state} in the cluster at {self.address} after {timeout:g}s "
                f"(nodes: {json.dumps(nodes)[:2000]}; logs under {self.root})"
            )
        return nodes

    def _query(self, want: str, resource: str, timeout: float) -> tuple[bool, list[dict[str, Any]]]:
        """Ask the cluster through a short-lived driver (the calling process stays out of Ray)."""
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, self.address, want, resource, str(timeout)],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + DEFAULT_START_TIMEOUT_SECONDS,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"the driver asking {self.address} failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        return bool(answer["done"]), list(answer["nodes"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group(pgid: int) -> Iterator[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                yield proc


def _end_groups_now(groups: list[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _wait_until_gone(groups: list[int], timeout: float) -> list[int]:
    """Wait until no live process is in ``groups``; returns the pids still there at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p.pid for pgid in groups for p in _group(pgid)]
        if not left or time.monotonic() > deadline:
            return left
        _end_groups_now(groups)  # a process forked while the first signal went out
        time.sleep(_POLL_SECONDS)


def _tail(log: Path, chars: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-chars:]
    return ""


__all__ = ["FAST_HEALTH_CHECK_ENV", "RAY_LOOPBACK_ENV", "DevCluster", "DevWorker"]


# -- a command line, for scripts (``hearth demo --cluster``) -----------------------------------------------
#
# ``python -m cluster.devcluster up --root DIR --state FILE --worker w1 --worker w2`` leaves a cluster
# running and writes what later calls need to reach its processes (the head's and each worker's process
# group) to FILE; ``kill-raylet --state FILE NAME`` and ``down --state FILE`` act on it from there. A
# failed ``up`` stops whatever it had started before it exits.


def _save_state(cluster: DevCluster, path: Path) -> None:
    state = {
        "root": str(cluster.root),
        "port": cluster.port,
        "address": cluster.address,
        "head_pgid": cluster._head_pgid,
        "temp_dir": str(cluster._temp_dir) if cluster._temp_dir is not None else None,
        "workers": {
            w.name: {"home": str(w.home.path), "pgid": w.pgid, "node_id": w.node_id}
            for w in cluster._workers.values()
        },
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def _load_state(path: Path) -> DevCluster:
    state = json.loads(path.read_text())
    cluster = DevCluster(Path(state["root"]), port=int(state["port"]))
    cluster._head_pgid = state["head_pgid"]
    cluster._temp_dir = Path(state["temp_dir"]) if state["temp_dir"] else None
    for name, w in state["workers"].items():
        home = WorkerHome.load(Path(w["home"]))
        cluster._workers[name] = DevWorker(name=name, home=home, pgid=int(w["pgid"]), node_id=w["node_id"])
    return cluster


def main(argv: list[str] | None = None) -> int:
    """``up``, ``kill-raylet`` and ``down`` of a :class:`DevCluster` whose state lives in a file."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cluster.devcluster", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and workers; leave them running")
    up.add_argument("--root", type=Path, required=True, help="the cluster's folder (logs, worker homes)")
    up.add_argument("--state", type=Path, required=True, help="where to write the cluster's state")
    up.add_argument("--worker", action="append", default=[], help="a worker's name (repeatable)")
    up.add_argument("--cpus", type=int, default=1, help="CPUs of each worker")
    up.add_argument("--memory-mb", type=int, default=2048, help="memory of each worker")
    kill = sub.add_parser("kill-raylet", help="SIGKILL one worker's raylet")
    kill.add_argument("--state", type=Path, required=True)
    kill.add_argument("name")
    down = sub.add_parser("down", help="kill every process of the cluster")
    down.add_argument("--state", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.command == "up":
        cluster = DevCluster(args.root)
        try:
            cluster.start_head()
            _save_state(cluster, args.state)
            for name in args.worker:
                cluster.add_worker(name, cpus=args.cpus, memory_mb=args.memory_mb)
                _save_state(cluster, args.state)
        except BaseException:
            cluster.stop()
            args.state.unlink(missing_ok=True)
            raise
        workers = {w.name: w.node_id for w in cluster.workers.values()}
        # env: what a driver of this cluster must run with (DevCluster.env), for the script to export
        print(json.dumps({"address": cluster.address, "workers": workers, "env": cluster.env({})}))
        return 0
    if not args.state.is_file():  # nothing was started, or it is already down
        print(json.dumps({"stopped": False, "state": str(args.state)}))
        return 0
    cluster = _load_state(args.state)
    if args.command == "kill-raylet":
        print(json.dumps({"worker": args.name, "raylet_pid": cluster.kill_raylet(args.name)}))
        return 0
    cluster.stop()
    args.state.unlink()
    print(json.dumps({"stopped": True, "address": cluster.address}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
