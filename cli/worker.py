"""``hearth worker prepare|join``: a machine joining the Ray cluster behind a Hearth node (DESIGN §14).

``prepare`` checks the machine's Docker engine and sandbox images (loading a ``docker save`` archive with
``--images``, so image IDs match the head's), hashes each ``--model DIR`` to the CID the head's catalog gives
it and writes the worker home's ``worker.toml``. ``join`` removes the containers this worker left behind, then
runs ``ray start --address HEAD`` with the worker's resources; with ``--block`` it stays in the foreground (as
``ray start --block``) for systemd to supervise. The work is in :mod:`cluster.worker`. Exit codes as the rest
of the CLI: 0 done, 2 bad input or the machine is not ready (the structured error says what to do).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli.common import Out


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``worker`` to ``hearth``'s subcommands; ``parents`` bring --json (and --home, unused here)."""
    worker = subparsers.add_parser("worker", help="ready this machine and join it to a node's Ray cluster")
    sub = worker.add_subparsers(dest="worker_cmd", required=True)
    home_help = "worker home holding worker.toml (default $HEARTH_WORKER_HOME or ~/.hearth-worker)"

    p = sub.add_parser("prepare", parents=parents, help="check Docker, images and models; write worker.toml")
    p.add_argument("--worker-home", type=Path, default=None, help=home_help)
    p.add_argument("--name", help="the worker's name (default: the current one, else the hostname)")
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a model's weights folder to offer (repeat; replaces the current models; none: keep them)",
    )
    p.add_argument("--images", type=Path, help="a `docker save` archive of the head's images to load first")
    p.add_argument("--docker-url", help="this machine's Docker engine (default unix:///var/run/docker.sock)")
    p.set_defaults(func=cmd_worker_prepare)

    p = sub.add_parser("join", parents=parents, help="remove this worker's orphans and start Ray (ray start)")
    p.add_argument("--address", required=True, help="the head's Ray address HOST:PORT (e.g. 10.0.0.1:6379)")
    p.add_argument("--worker-home", type=Path, default=None, help=home_help)
    p.add_argument("--num-cpus", type=_positive, help="CPUs to offer (default: Ray counts them)")
    p.add_argument("--num-gpus", type=_non_negative, help="GPUs to offer (default: Ray counts them)")
    p.add_argument("--memory-mb", type=_positive, help="memory to offer, MiB (default: Ray's estimate)")
    p.add_argument("--object-store-mb", type=_positive, help="Ray's object store, MiB (default: Ray's)")
    p.add_argument("--block", action="store_true", help="stay in the foreground as Ray (for systemd)")
    p.set_defaults(func=cmd_worker_join)
    return worker


def cmd_worker_prepare(args: argparse.Namespace, out: Out) -> int:
    from cluster.worker import prepare

    report = prepare(
        args.worker_home, name=args.name, models=args.model, images=args.images, docker_url=args.docker_url
    )

    def human() -> None:
        print(f"worker {report['name']} is ready: {report['config']}")
        print(f"  docker     {report['docker_url']}")
        for image in report["loaded_images"]:
            print(f"  loaded     {', '.join(image['tags']) or '(untagged)'}  {image['id']}")
        for ref, image in report["images"].items():
            state = image["id"] if image["present"] else "absent (jobs needing it go to other workers)"
            print(f"  image      {ref:28} {state}")
        for model in report["models"]:
            size = f"  ({model['size_bytes'] / 1e6:.1f} MB)" if "size_bytes" in model else ""
            print(f"  model      {model['cid']}  {model['path']}{size}")
        print(f"  resources  {report['resources_json']}")
        print("join the head's cluster with (HEAD: the head's private address):")
        print(f"  {report['join_command']}")

    out.emit(report, human)
    return 0


def cmd_worker_join(args: argparse.Namespace, out: Out) -> int:
    from cluster.worker import join

    report = join(
        args.worker_home,
        address=args.address,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        memory_mb=args.memory_mb,
        object_store_mb=args.object_store_mb,
        block=args.block,
    )
    out.emit(report, lambda: _print_join(report))
    return 0


def _print_join(report: dict[str, Any]) -> None:
    removed = report["removed_containers"]
    if removed:
        print(f"removed {len(removed)} container(s) this worker left: {' '.join(c[:12] for c in removed)}")
    print(f"worker {report['worker']} joined the cluster at {report['address']}")
    print(f"  resources  {json.dumps(report['resources'], sort_keys=True)}")
    print(f"  home       {report['worker_home']}")


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value
