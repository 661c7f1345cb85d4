"""The developer's commands: ``hearth devnet`` (a local chain with the contracts) and ``hearth demo``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli.common import EXIT_OK, Out
from core.defaults import DEFAULT_DEVNET_PORT
from core.errors import ConfigError

if TYPE_CHECKING:
    from payments.devnet import Devnet


def cmd_devnet(args: argparse.Namespace, out: Out) -> int:
    from payments import devnet

    if args.stop:
        pid = devnet.stop(args.home)
        out.emit(
            {"stopped": pid is not None, "pid": pid},
            lambda: print(f"stopped the devnet anvil (pid {pid})" if pid else "no devnet anvil was running"),
        )
        return EXIT_OK
    if args.detach:
        _show_devnet(args, out, devnet.up(args.home, port=args.port, join=args.join))
        return EXIT_OK
    with devnet.stop_requested() as stopping:
        net = devnet.up(args.home, port=args.port, join=args.join)
        if not net.started:  # an anvil this call did not start is not this call's to stop
            _show_devnet(args, out, net)
            return EXIT_OK
        try:
            _show_devnet(args, out, net)
            devnet.hold(net.pid, stopping)
        finally:
            devnet.stop(args.home)
    return EXIT_OK


def _show_devnet(args: argparse.Namespace, out: Out, net: Devnet) -> None:
    def human() -> None:
        state = "started" if net.started else "already running"
        print(f"devnet {net.rpc_url} (chain {net.chain_id}, anvil pid {net.pid}, {state})")
        print(f"  token   {net.token}\n  escrow  {net.escrow}{'  (reused)' if net.reused else ''}")
        print(f"  registry {net.registry}")
        for account in net.accounts:
            print(f"  {account.role:9} {account.did}\n            key {account.key_file} (0600)")
        print(f"  [chain] and [market] registry written to {net.config}")
        if args.detach or not net.started:
            print(f"  stop it: hearth devnet --home {args.home} --stop")
        else:
            print("  Ctrl-C stops it")

    out.emit(net.to_dict(), human)
    sys.stdout.flush()


# -- requester commands -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, out: Out) -> int:
    """Run scripts/demo.sh: devnet, node, quote, funding, the job, validation and release, step by step;
    with ``--market``, scripts/demo_market.sh: three nodes in the on-chain registry and routed jobs; with
    ``--agent``, scripts/demo_agent.sh: an MCP client spends from a grant, a validator service releases; with
    ``--cluster``, scripts/demo_cluster.sh: a paid round on a local Ray cluster, a worker lost mid-job."""
    name = (
        "demo_market.sh"
        if args.market
        else "demo_agent.sh"
        if args.agent
        else "demo_cluster.sh"
        if args.cluster
        else "demo.sh"
    )
    script = Path(__file__).resolve().parent.parent / "scripts" / name
    if not script.is_file():
        raise ConfigError(
            "demo_unavailable",
            f"the demo runs from a source checkout of Hearth; {script} is not there",
            details={"path": str(script)},
        )
    env = dict(os.environ, HEARTH_DEMO_KIND="inference" if args.inference else "transcode")
    return subprocess.run(["bash", str(script)], env=env, check=False).returncode


# -- parser -------------------------------------------------------------------------------------------


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """``hearth devnet`` and ``hearth demo``."""
    p = sub.add_parser("devnet", parents=[common], help="a local chain with the contracts, for development")
    p.add_argument("--port", type=int, default=DEFAULT_DEVNET_PORT, help="anvil's RPC port on 127.0.0.1")
    p.add_argument("--detach", action="store_true", help="leave anvil running in the background")
    p.add_argument("--stop", action="store_true", help="stop the anvil a --detach run left running")
    p.add_argument(
        "--join",
        type=Path,
        metavar="HOME",
        help="join the devnet that runs under another node home (same chain and contracts; this home's "
        "wallet funded and its [chain] and [market] registry written), as several local nodes need",
    )
    p.set_defaults(func=cmd_devnet)
    p = sub.add_parser("demo", help="run the whole market round on a local chain (from a source checkout)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--inference", action="store_true", help="a vLLM batch job instead of a transcode")
    kind.add_argument(
        "--market",
        action="store_true",
        help="three nodes in the on-chain registry; jobs routed to the cheapest, then the next when it stops",
    )
    kind.add_argument(
        "--agent",
        action="store_true",
        help="an agent (a scripted MCP client) pays from a spending grant; a validator service releases",
    )
    kind.add_argument(
        "--cluster",
        action="store_true",
        help="a paid round on a node in front of a local Ray cluster; a worker is lost mid-job and the "
        "job reruns on the other",
    )
    p.set_defaults(func=cmd_demo)
