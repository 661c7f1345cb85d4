"""A cluster worker's side: its home (``worker.toml``), ``hearth worker prepare`` and ``hearth worker join``.

A worker is a machine that runs the head's attempts as Ray tasks with its own Docker engine. It needs no node
home, keys or journal: only a *worker home* holding ``worker.toml``::

    name = "box-1"                               # default: the hostname; [A-Za-z0-9._-]{1,63}
    docker_url = "unix:///var/run/docker.sock"   # the worker's own engine
    work_dir = "work"                            # attempt folders (relative to the worker home)
    [models]                                     # model CID -> its weights' folder (verified by prepare)
    "bafy..." = "/srv/models/tiny"

The home is ``$HEARTH_WORKER_HOME``, else ``/var/lib/hearth-worker`` as root under systemd, else
``~/.hearth-worker``. ``join`` starts Ray with ``HEARTH_WORKER_HOME`` set to the home's absolute path, so
every Ray worker process on the machine (and the task running an attempt there) finds the same home.

- :class:`WorkerHome` reads and writes ``worker.toml``; it is checked once, when loaded, and a broken file is
  a :class:`~core.errors.ConfigError` naming the field.
- :func:`prepare` readies a machine: the Docker engine answers, the sandbox images are there (loaded from a
  ``docker save`` archive when given, so image IDs match the head's: a run is pinned to its image ID), each
  model folder is hashed to the CID the head's catalog gives it, and ``worker.toml`` is written.
- :func:`join` removes the containers this worker left behind (a crash's orphans, for whichever node), then
  runs ``ray start --address HEAD`` advertising the worker's name and models as Ray custom resources.

Errors (all :class:`~core.errors.ConfigError`, domain ``config``):

``worker_config_unreadable``  worker.toml exists but cannot be read
``worker_config_invalid``     worker.toml is not TOML, has an unknown key or a value of the wrong type
``invalid_worker_name``       the name is not ``[A-Za-z0-9._-]{1,63}``
``invalid_model_cid``         a key of ``[models]`` is not a CID
``worker_path_relative``      a model folder is not an absolute path
``model_dir_missing``         a model folder does not exist
``docker_unavailable``        the worker's Docker engine does not answer (retryable)
``images_unreadable``         the ``--images`` archive cannot be read
``images_load_failed``        the engine refused the archive
``image_missing``             the FFmpeg sandbox image is not on the worker
``invalid_address``           the head's address is not ``HOST:PORT``
``ray_missing``               no ``ray`` executable beside this Python
``ray_start_failed``          ``ray start`` failed (retryable; its output tail is in the details)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cluster.names import MODEL_RESOURCE_UNITS, model_resource, worker_resource
from core.config import SandboxSection
from core.defaults import DEFAULT_DOCKER_URL
from core.errors import ConfigError, HearthError

WORKER_HOME_ENV: Final = "HEARTH_WORKER_HOME"
WORKER_CONFIG_FILENAME: Final = "worker.toml"
WORKER_NAME_PATTERN: Final = r"[A-Za-z0-9._-]{1,63}"
DEFAULT_WORKER_WORK_DIR: Final = "work"
DEFAULT_SYSTEM_WORKER_HOME: Final = Path("/var/lib/hearth-worker")
DEFAULT_RAY_START_TIMEOUT_SECONDS: Final = 120.0
DEFAULT_DOCKER_PING_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_IMAGES_LOAD_TIMEOUT_SECONDS: Final = 1800.0  # a vLLM image is gigabytes
RAY_OUTPUT_TAIL_CHARS: Final = 4000
HEAD_ADDRESS_PLACEHOLDER: Final = "HEAD:6379"

_KEYS: Final = frozenset({"name", "docker_url", "work_dir", "models"})
_ADDRESS_RE: Final = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


def default_worker_home() -> Path:
    """``$HEARTH_WORKER_HOME``, else ``/var/lib/hearth-worker`` (root, systemd), else ``~/.hearth-worker``."""
    env = os.environ.get(WORKER_HOME_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.environ.get("INVOCATION_ID"):
        return DEFAULT_SYSTEM_WORKER_HOME
    return Path.home() / ".hearth-worker"


def default_worker_name() -> str:
    """The machine's hostname made into a worker name (other characters become ``-``, at most 63)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63]
    return name or "worker"


@dataclass(frozen=True)
class WorkerHome:
    """A worker's settings, read from ``<path>/worker.toml`` and checked once (every path absolute)."""

    path: Path
    name: str
    docker_url: str = DEFAULT_DOCKER_URL
    work_dir: Path = field(default=Path(DEFAULT_WORKER_WORK_DIR))
    models: Mapping[str, Path] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.path / WORKER_CONFIG_FILENAME

    @classmethod
    def load(cls, path: Path | None = None) -> WorkerHome:
        """The worker home at ``path`` (default :func:`default_worker_home`).

        A missing ``worker.toml`` gives the defaults (the hostname as name, the local engine, ``work/``, no
        models), so a bare machine can join; anything present is checked, and a model folder must exist.
        """
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path | None, *, models: bool = True) -> WorkerHome:
        """:meth:`load`; without ``models``, ``[models]`` is left out (``prepare`` replacing them)."""
        home = (path if path is not None else default_worker_home()).expanduser().absolute()
        config = home / WORKER_CONFIG_FILENAME
        try:
            text = config.read_text()
        except FileNotFoundError:
            return cls._checked(home, {}, config)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "worker_config_unreadable", f"{config} cannot be read: {exc}", details={"path": str(config)}
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                "worker_config_invalid", f"{config} is not valid TOML: {exc}", details={"path": str(config)}
            ) from None
        if not models:
            data.pop("models", None)
        return cls._checked(home, data, config)

    @classmethod
    def write(
        cls,
        path: Path,
        *,
        name: str,
        docker_url: str = DEFAULT_DOCKER_URL,
        work_dir: Path | str = DEFAULT_WORKER_WORK_DIR,
        models: Mapping[str, Path] | None = None,
    ) -> WorkerHome:
        """Write ``<path>/worker.toml`` (atomically, making the folder); return it as :meth:`load` reads it.

        The values are checked before anything is written, with the same errors as :meth:`load`. A relative
        ``work_dir`` stays relative to the home, so the home can move.
        """
        home = path.expanduser().absolute()
        data: dict[str, Any] = {
            "name": name,
            "docker_url": docker_url,
            "work_dir": str(work_dir),
            "models": {cid: str(folder) for cid, folder in (models or {}).items()},
        }
        checked = cls._checked(home, data, home / WORKER_CONFIG_FILENAME)
        lines = [
            "# A Hearth cluster worker (hearth worker prepare wrote it; `hearth worker join` reads it).",
            f"name = {_toml_str(name)}",
            f"docker_url = {_toml_str(docker_url)}",
            f"work_dir = {_toml_str(str(work_dir))}",
            "",
            "[models]  # model CID -> folder holding its weights",
            *(f"{_toml_str(cid)} = {_toml_str(folder)}" for cid, folder in sorted(data["models"].items())),
        ]
        home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=home, prefix=".worker.", suffix=".toml")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, checked.config_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return checked

    def resources(self) -> dict[str, float]:
        """The Ray custom resources this worker advertises: its name (1) and each model it holds."""
        found: dict[str, float] = {worker_resource(self.name): 1.0}
        for cid in self.models:
            found[model_resource(cid)] = float(MODEL_RESOURCE_UNITS)
        return found

    @classmethod
    def _checked(cls, home: Path, data: dict[str, Any], config: Path) -> WorkerHome:
        def invalid(key: str, message: str, code: str = "worker_config_invalid") -> ConfigError:
            return ConfigError(code, f"{config}: {message}", details={"path": str(config), "field": key})

        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise invalid(unknown[0], f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
        for key in ("name", "docker_url", "work_dir"):
            if key in data and (not isinstance(data[key], str) or not data[key]):
                raise invalid(key, f"{key} must be a non-empty string")
        name = data.get("name") or default_worker_name()
        if not re.fullmatch(WORKER_NAME_PATTERN, name):
            raise invalid(
                "name", f"{name[:80]!r} is not a worker name ([A-Za-z0-9._-], 1 to 63)", "invalid_worker_name"
            )
        work_dir = Path(data.get("work_dir", DEFAULT_WORKER_WORK_DIR)).expanduser()
        raw_models = data.get("models", {})
        if not isinstance(raw_models, dict):
            raise invalid("models", "[models] must be a table of model CID = folder")
        models: dict[str, Path] = {}
        for cid, folder in raw_models.items():
            key = f"models.{cid}"
            if not _is_cid(cid):
                raise invalid(key, f"{cid[:80]!r} is not a model CID", "invalid_model_cid")
            if not isinstance(folder, str) or not folder:
                raise invalid(key, "a model's folder must be a non-empty string")
            if not Path(folder).is_absolute():
                raise invalid(
                    key,
                    f"model folder {folder!r} is not absolute (Ray's workers run elsewhere)",
                    "worker_path_relative",
                )
            if not Path(folder).is_dir():
                raise invalid(
                    key,
                    f"model folder {folder} does not exist; run `hearth worker prepare --model DIR` again",
                    "model_dir_missing",
                )
            models[cid] = Path(folder)
        return cls(
            path=home,
            name=name,
            docker_url=data.get("docker_url", DEFAULT_DOCKER_URL),
            work_dir=work_dir if work_dir.is_absolute() else home / work_dir,
            models=models,
        )


def _toml_str(text: str) -> str:
    # JSON's string escapes (\", \\, \n, \uXXXX, ...) are all TOML basic-string escapes.
    return json.dumps(text, ensure_ascii=False)


def _is_cid(text: str) -> bool:
    from storage import CID

    try:
        CID.parse(text)
    except HearthError:
        return False
    return True


# -- prepare ---------------------------------------------------------------------------------------------


def prepare(
    home: Path | None = None,
    *,
    name: str | None = None,
    models: Sequence[Path] = (),
    images: Path | None = None,
    docker_url: str | None = None,
    sandbox: SandboxSection | None = None,
) -> dict[str, Any]:
    """Ready this machine to join a cluster and write its ``worker.toml``; returns a JSON-able report.

    ``name`` and ``docker_url`` default to what the home already says (else the hostname and the local
    engine). ``models``, when given, become the worker's models (each hashed to its CID, as the head's
    catalog does); when none is given the current ones are kept. ``images`` is a ``docker save`` archive
    loaded first, so that the worker runs the very image IDs the head pins its runs to. ``sandbox`` names the
    images to check (default: the node's defaults); the FFmpeg image is required, vLLM's are reported.
    Nothing is written unless every check passed.
    """
    # New models replace the old, so an old folder that is gone does not stand in the way.
    current = WorkerHome._load(home, models=not models)
    name = name or current.name
    docker_url = docker_url or current.docker_url
    section = sandbox or SandboxSection()
    # A work dir inside the home stays written relative to it, so the home can move.
    work_dir = (
        current.work_dir.relative_to(current.path)
        if current.work_dir.is_relative_to(current.path)
        else current.work_dir
    )
    WorkerHome._checked(current.path, {"name": name, "docker_url": docker_url}, current.config_path)

    loaded = _load_images(docker_url, images) if images is not None else []
    found = asyncio.run(_image_ids(docker_url, _image_refs(section)))
    if found[section.ffmpeg_image] is None:
        raise ConfigError(
            "image_missing",
            f"the sandbox image {section.ffmpeg_image} is not on this worker's engine: bring the head's "
            "images with `docker save ... > images.tar` there and "
            "`hearth worker prepare --images images.tar` here (scripts/docker.sh would build images "
            "with other IDs than the head's)",
            details={"image": section.ffmpeg_image, "docker_url": docker_url},
        )
    hashed = [_hash_model(folder) for folder in models]
    chosen = {m["cid"]: Path(m["path"]) for m in hashed} if models else dict(current.models)
    written = WorkerHome.write(
        current.path, name=name, docker_url=docker_url, work_dir=work_dir, models=chosen
    )
    written.work_dir.mkdir(parents=True, exist_ok=True)
    resources = written.resources()
    return {
        "worker_home": str(written.path),
        "config": str(written.config_path),
        "name": written.name,
        "docker_url": written.docker_url,
        "work_dir": str(written.work_dir),
        "models": hashed or [{"cid": cid, "path": str(p)} for cid, p in sorted(written.models.items())],
        "images": {
            ref: {"id": image_id, "present": image_id is not None, "required": ref == section.ffmpeg_image}
            for ref, image_id in found.items()
        },
        "loaded_images": loaded,
        "resources": resources,
        "resources_json": json.dumps(resources, sort_keys=True),
        "join_command": (
            f"hearth worker join --worker-home {written.path} --address {HEAD_ADDRESS_PLACEHOLDER}"
        ),
    }


def _image_refs(section: SandboxSection) -> list[str]:
    return list(dict.fromkeys([section.ffmpeg_image, section.vllm_cpu_image, section.vllm_gpu_image]))


async def _image_ids(docker_url: str, refs: list[str]) -> dict[str, str | None]:
    """Each image's ID on the engine (None where absent); ``docker_unavailable`` if the engine is silent."""
    from core.errors import ExecutionError
    from sandbox import SandboxRunner

    _check_socket(docker_url)
    runner = SandboxRunner(
        node="-", docker_url=docker_url, api_timeout_seconds=DEFAULT_DOCKER_PING_TIMEOUT_SECONDS
    )
    try:
        try:
            await runner.ping()
        except ExecutionError as exc:
            raise _docker_unavailable(docker_url, str(exc.__cause__ or exc.message)) from None
        found: dict[str, str | None] = {}
        for ref in refs:
            try:
                found[ref] = await runner.image_digest(ref)
            except ExecutionError as exc:
                if exc.code != "image_missing":
                    raise
                found[ref] = None
        return found
    finally:
        runner.close()


def _check_socket(docker_url: str) -> None:
    """Refuse an engine socket that does not exist before the SDK tries it (clearer, and the SDK would leak
    the socket it opened)."""
    if docker_url.startswith("unix://") and not Path(docker_url.removeprefix("unix://")).exists():
        raise _docker_unavailable(docker_url, "no socket there")


def _docker_unavailable(docker_url: str, cause: str) -> ConfigError:
    return ConfigError(
        "docker_unavailable",
        f"the Docker engine at {docker_url} does not answer ({cause}); start it (`systemctl start docker`, "
        "or as root scripts/docker.sh, which installs, starts and sets it up) and run this again",
        details={"docker_url": docker_url},
        retryable=True,
    )


def _load_images(docker_url: str, archive: Path) -> list[dict[str, Any]]:
    """``docker load`` the archive; returns each loaded image's ID and tags."""
    import docker

    _check_socket(docker_url)
    try:
        stream = archive.open("rb")
    except OSError as exc:
        raise ConfigError(
            "images_unreadable", f"{archive} cannot be read: {exc}", details={"path": str(archive)}
        ) from None
    try:
        client = docker.DockerClient(base_url=docker_url, timeout=DEFAULT_IMAGES_LOAD_TIMEOUT_SECONDS)
    except docker.errors.DockerException as exc:
        stream.close()
        raise _docker_unavailable(docker_url, str(exc)) from None
    try:
        with stream:
            images = client.images.load(stream)
    except docker.errors.APIError as exc:
        raise ConfigError(
            "images_load_failed",
            f"the engine refused {archive}: {exc.explanation or exc} "
            "(make it with `docker save IMAGE... > FILE`)",
            details={"path": str(archive)},
        ) from None
    except (docker.errors.DockerException, OSError) as exc:
        raise _docker_unavailable(docker_url, str(exc)) from None
    finally:
        client.close()
    return [{"id": str(image.id), "tags": list(image.tags)} for image in images]


def _hash_model(folder: Path) -> dict[str, Any]:
    """A model folder's CID and size as the head's catalog computes them.

    Refused (``model_not_readable``) when the sandbox user could not read it through its mount.
    """
    from provider.catalog import check_readable, hash_model_dir

    directory = folder.expanduser().absolute()
    check_readable(directory)
    cid, size = hash_model_dir(directory)
    return {"cid": cid, "path": str(directory), "size_bytes": size}


# -- join ------------------------------------------------------------------------------------------------


def join(
    home: Path | None = None,
    *,
    address: str,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    memory_mb: int | None = None,
    object_store_mb: int | None = None,
    block: bool = False,
    ray_bin: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Join this machine to the Ray cluster at ``address`` as the worker of ``home``; returns a report.

    First the containers this worker left behind (for any node: a crash's orphans) are removed: a worker that
    starts again holds none of the runs it held before. Then ``ray start`` runs with the worker's resources
    and ``HEARTH_WORKER_HOME`` in its environment (its processes, and the tasks they run, inherit it). With
    ``block`` this process *becomes* ``ray start --block`` (exec), so a supervisor such as systemd watches
    Ray itself; the call does not return. Otherwise ``ray start`` daemonizes Ray and the call returns.
    """
    worker = WorkerHome.load(home)
    _check_address(address)
    ray = ray_bin or Path(sys.executable).parent / "ray"
    if not os.access(ray, os.X_OK):
        raise ConfigError(
            "ray_missing",
            f"no ray executable at {ray}: install Hearth (it brings Ray) in this Python's environment",
            details={"path": str(ray)},
        )
    removed = asyncio.run(_remove_orphans(worker))
    # the attempt folders of those runs too (a reaper that died with the machine left them)
    shutil.rmtree(worker.work_dir, ignore_errors=True)
    worker.work_dir.mkdir(parents=True, exist_ok=True)
    command = ray_start_command(
        worker,
        ray=ray,
        address=address,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory_mb=memory_mb,
        object_store_mb=object_store_mb,
        block=block,
    )
    env = {**os.environ, **(extra_env or {}), WORKER_HOME_ENV: str(worker.path)}
    report: dict[str, Any] = {
        "worker": worker.name,
        "worker_home": str(worker.path),
        "address": address,
        "resources": worker.resources(),
        "removed_containers": removed,
        "command": command,
    }
    if block:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(command[0], command, env)
    rc, tail = _run_ray_start(command, env)
    if rc != 0:
        raise ConfigError(
            "ray_start_failed",
            f"`ray start` exited with {rc}; is the head at {address} up and reachable from here?",
            details={**report, "rc": rc, "output_tail": tail},
            retryable=True,
        )
    return {**report, "rc": rc, "output_tail": tail}


def _check_address(address: str) -> None:
    match = _ADDRESS_RE.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(
            "invalid_address",
            f"{address[:80]!r} is not the head's Ray address HOST:PORT (e.g. 10.0.0.1:6379)",
            details={"address": address[:80]},
        )


def ray_start_command(
    worker: WorkerHome,
    *,
    ray: Path,
    address: str,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    memory_mb: int | None = None,
    object_store_mb: int | None = None,
    block: bool = False,
) -> list[str]:
    """The ``ray start`` argv that joins ``worker`` to the head at ``address``."""
    command = [
        str(ray),
        "start",
        "--address",
        address,
        "--resources",
        json.dumps(worker.resources(), sort_keys=True),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    if memory_mb is not None:
        command += ["--memory", str(memory_mb * 1024 * 1024)]
    if object_store_mb is not None:
        command += ["--object-store-memory", str(object_store_mb * 1024 * 1024)]
    if block:
        command.append("--block")
    return command


def _run_ray_start(command: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Run ``ray start``; returns its exit code and output tail.

    The output goes to a file, not a pipe: the daemons Ray leaves running inherit the descriptors, and a pipe
    would then never reach its end.
    """
    with tempfile.TemporaryFile("w+") as log:
        try:
            proc = subprocess.run(
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=DEFAULT_RAY_START_TIMEOUT_SECONDS,
                check=False,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
        log.seek(0)
        return rc, log.read()[-RAY_OUTPUT_TAIL_CHARS:]


async def _remove_orphans(worker: WorkerHome) -> list[str]:
    """Remove every container labelled as this worker's, whichever node started it; returns their IDs."""
    from core.errors import ExecutionError
    from sandbox import SandboxRunner

    _check_socket(worker.docker_url)
    runner = SandboxRunner(node="-", worker=worker.name, docker_url=worker.docker_url)
    try:
        return await runner.remove_containers(any_node=True)
    except ExecutionError as exc:
        if exc.code == "docker_unavailable":
            raise _docker_unavailable(worker.docker_url, str(exc.__cause__ or exc.message)) from None
        raise
    finally:
        runner.close()


__all__ = [
    "WORKER_CONFIG_FILENAME",
    "WORKER_HOME_ENV",
    "WORKER_NAME_PATTERN",
    "WorkerHome",
    "default_worker_home",
    "default_worker_name",
    "join",
    "prepare",
    "ray_start_command",
]
