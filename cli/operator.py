"""The operator's commands: ``hearth init``, ``hearth run``, ``hearth keys`` and ``hearth job replay``.

(``install-service``, ``status`` and ``models`` are the operator's too: :mod:`cli.service`,
:mod:`cli.status`, :mod:`cli.models`.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tomllib
from pathlib import Path

from cli.common import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, Out
from core.config import CONFIG_FILENAME, parse_config, resolve_path
from core.defaults import DEFAULT_HOST, DEFAULT_NODE_NAME, DEFAULT_PORT, KEY_FILENAME
from core.errors import HearthError
from payments.keys import load_key, new_ed25519, new_eth, public_summary, save_key

NODE_TOML_TEMPLATE = """\
# Hearth node configuration. Every key is optional; the values shown are the defaults unless noted.
# Env overrides: HEARTH_<SECTION>__<KEY>=value (e.g. HEARTH_API__PORT=9000).

[node]
name = "{name}"
key_file = "{key_file}"            # Ed25519 key of the node DID (mode 0600)
state_dir = "state"            # journal lives here

[api]
host = "{host}"
port = {port}
max_body_bytes = 262144        # refused before parsing when larger
clock_skew_seconds = 60
max_token_lifetime_seconds = 3600
quote_ttl_seconds = 300

[pricing]                      # USDC, decimal strings
cpu_second = "0.00002"
gpu_second = "0.0005"
output_mb = "0.0001"
input_1k_tokens = "0.0002"
output_1k_tokens = "0.0006"
minimum_per_job = "0.01"

[pricing.surge]
threshold = 0.5                # utilisation where prices start to rise
max_factor = 2.0               # multiplier at full load

[policy]
allow_dids = []                # empty: anyone not denied
deny_dids = []
kinds = ["ffmpeg_transcode", "vllm_batch"]
max_timeout_seconds = 3600
max_output_mb = 2048
max_cpus = 4
max_memory_mb = 8192
max_gpus = 1
per_did_concurrency = 4

[capacity]
cpus = "auto"
memory_mb = "auto"
gpus = "auto"

[journal]
synchronous = "normal"         # "full" also survives a power cut, at some cost in throughput
"""


def cmd_init(args: argparse.Namespace, out: Out) -> int:
    home: Path = args.home
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg_path = home / CONFIG_FILENAME
    if cfg_path.exists() and not args.force:
        out.error(HearthError("already_initialised", f"{cfg_path} exists; pass --force to overwrite"))
        return EXIT_USAGE
    text = NODE_TOML_TEMPLATE.format(name=args.name, host=args.host, port=args.port, key_file=KEY_FILENAME)
    cfg = parse_config(tomllib.loads(text), source=str(cfg_path))
    cfg_path.write_text(text)
    key_path = resolve_path(home, cfg.node.key_file)
    if not key_path.exists() or args.force:
        save_key(new_ed25519(), key_path, overwrite=True)
    signer = load_key(key_path)
    data = {
        "home": str(home),
        "config": str(cfg_path),
        "key_file": str(key_path),
        "did": signer.did,
        "url": f"http://{args.host}:{args.port}",
    }
    out.emit(
        data,
        lambda: print(
            f"initialised {home}\n  node DID  {signer.did}\n  config    {cfg_path}\n"
            f"  key       {key_path} (0600)\n  start it: hearth run --home {home}"
        ),
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace, out: Out) -> int:
    from core.logs import configure_logging
    from node.daemon import Node
    from node.sdnotify import Notifier, ServiceEnv, keepalive
    from node.server import serve

    service = ServiceEnv.from_environ(os.environ, pid=os.getpid())  # systemd's variables, read once here
    node = Node.from_home(args.home, config_path=args.config, credentials_dir=service.credentials_dir)
    logging_cfg = node.cfg.logging  # HEARTH_LOGGING__LEVEL overrides
    configure_logging(
        logging_cfg.level,
        logging_cfg.format,
        repeat_burst=logging_cfg.repeat_burst,
        repeat_window_seconds=logging_cfg.repeat_window_seconds,
    )
    notifier = Notifier(service.notify_socket)
    host = args.host or node.cfg.api.host
    port = node.cfg.api.port if args.port is None else args.port

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        drain = asyncio.Event()

        def stop() -> None:
            # The first SIGTERM (or Ctrl-C) drains; a second one stops at once, and whatever still runs
            # stays `running` in the journal for the next start to retry.
            if drain.is_set():
                task.cancel()
                return
            node.stop_accepting()
            notifier.stopping(node.status_line())
            drain.set()

        def reload() -> None:
            if not (node.ready or node.draining):  # still starting: the start reads node.toml anyway
                return
            notifier.reloading()
            status = ""
            try:
                node.reload()
            except HearthError as exc:  # a bad edit of node.toml: keep running on the config we have
                logging.getLogger("hearth.node").error("reload refused, config unchanged: %s", exc.message)
                status = f" (reload refused: {exc.code})"
            notifier.ready(node.status_line() + status)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, reload)

        def ready(bound: int) -> None:
            msg = {"event": "ready", "did": node.did, "url": f"http://{host}:{bound}", "home": str(args.home)}
            print(
                json.dumps(msg)
                if out.as_json
                else f"hearth node {node.did} listening on http://{host}:{bound}",
                flush=True,
            )
            if not drain.is_set():  # a SIGTERM during start-up already said STOPPING=1
                notifier.ready(node.status_line())

        pings = asyncio.create_task(
            keepalive(notifier, node.status_line, watchdog_interval=service.watchdog_interval),
            name="hearth-sd-keepalive",
        )
        try:
            await serve(node, host, port, on_ready=ready, drain=drain)
        finally:
            pings.cancel()
            await asyncio.gather(pings, return_exceptions=True)
            notifier.close()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_keys_new(args: argparse.Namespace, out: Out) -> int:
    signer = new_ed25519() if args.type == "ed25519" else new_eth(args.chain_id)
    save_key(signer, args.out, overwrite=args.force)
    data = {**public_summary(signer), "key_file": str(args.out)}
    out.emit(data, lambda: print(f"{signer.did}\n  key file {args.out} (0600)"))
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace, out: Out) -> int:
    signer = load_key(args.file)
    data = public_summary(signer)
    out.emit(data, lambda: print("\n".join(f"{k:8} {v}" for k, v in data.items())))
    return EXIT_OK


def cmd_job_replay(args: argparse.Namespace, out: Out) -> int:
    """Re-run a completed job from this node's journal and blockstore; compare the artifact CID."""
    from node.replay import replay_job

    report = asyncio.run(replay_job(args.home, args.id, config_path=args.config))

    def human() -> None:
        verdict = "MATCH" if report["match"] else "DIFFERENT"
        print(f"{verdict}  recorded {report['recorded_cid']}\n         replayed {report['replay_cid']}")
        print(
            f"argv {'same' if report['argv_hash_match'] else 'changed'}, "
            f"image {'same' if report['image_match'] else 'changed'}"
        )

    out.emit(report, human)
    return EXIT_OK if report["match"] else EXIT_REFUSED


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    config: argparse.ArgumentParser,
) -> None:
    """``hearth init``, ``hearth run`` and ``hearth keys``."""
    p = sub.add_parser("init", parents=[common], help="write a validated node.toml and the node key")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--name", default=DEFAULT_NODE_NAME)
    p.add_argument("--force", action="store_true", help="overwrite an existing config and key")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", parents=[common, config], help="run the node daemon")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default=None)
    p.set_defaults(func=cmd_run)

    keys = sub.add_parser("keys", help="create and inspect keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    p = keys.add_parser("new", parents=[common], help="a new did:key (Ed25519) or Ethereum key (did:pkh)")
    p.add_argument("--type", choices=["ed25519", "eth"], default="ed25519")
    p.add_argument("--chain-id", type=int, default=31337)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_keys_new)
    p = keys.add_parser("show", parents=[common], help="the DID and public key of a key file")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_keys_show)


def add_replay_parser(
    job: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    config: argparse.ArgumentParser,
) -> None:
    """``hearth job replay``: the operator's, under the requester's ``job`` group."""
    p = job.add_parser(
        "replay", parents=[common, config], help="re-run a completed job here; does the CID match?"
    )
    p.add_argument("id")
    p.set_defaults(func=cmd_job_replay)
