"""The ``hearth`` command: one entry point, subcommands for operators, requesters and tools.

Human-friendly output by default, ``--json`` for machines. Exit codes: 0 done, 1 the node refused
(its structured error is printed), 2 bad usage or local input, 3 the node could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from node.client import NodeClient, NodeError, NodeUnreachable, sign_request
from node.config import (
    CONFIG_FILENAME,
    DEFAULT_DEVNET_PORT,
    DEFAULT_HOST,
    DEFAULT_PORT,
    KEY_FILENAME,
    default_home,
    load_config,
    parse_config,
    resolve_path,
)
from node.envelope import envelope_hash, parse_envelope
from node.errors import AuthError, ConfigError, FundingError, HearthError, RequestError
from node.service_cli import add_parser as add_service_parser
from node.status_cli import add_parser as add_status_parser
from payments.jwt import decode_unverified, verify_node_token
from payments.keys import EthSigner, Signer, load_key, new_ed25519, new_eth, public_summary, save_key
from payments.validate_cli import add_parser as add_validate_parser
from provider.catalog_cli import add_parser as add_models_parser

if TYPE_CHECKING:
    from node.envelope import Envelope
    from payments.devnet import Devnet
    from payments.receipts import FundingTerms

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# `job submit --wait` polls this often, and gives the node this long past the funding's wait_until
# (clock skew between the two machines; a fund transaction still gathering confirmations).
FUNDING_POLL_SECONDS = 0.5
FUNDING_WAIT_GRACE_SECONDS = 120.0


class Out:
    """Prints for people or for machines, chosen once by ``--json``."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            human()

    def error(self, exc: HearthError) -> None:
        if self.as_json:
            print(json.dumps(exc.to_dict(), indent=2, sort_keys=True))
        else:
            print(f"error [{exc.domain}/{exc.code}]: {exc.message}", file=sys.stderr)
            for key, value in exc.details.items():
                print(
                    f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}", file=sys.stderr
                )


# -- node home ----------------------------------------------------------------------------------------


def node_url(home: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("HEARTH_NODE_URL")
    if env:
        return env
    cfg = load_config(home)
    host = "127.0.0.1" if cfg.api.host in ("0.0.0.0", "::") else cfg.api.host
    return f"http://{host}:{cfg.api.port}"


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
        out.error(
            HearthError(
                "already_initialised", f"{cfg_path} exists; pass --force to overwrite", http_status=400
            )
        )
        return EXIT_USAGE
    text = NODE_TOML_TEMPLATE.format(name=args.name, host=args.host, port=args.port, key_file=KEY_FILENAME)
    import tomllib

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
    from node.daemon import Node
    from node.logs import configure_logging
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
        _show_devnet(args, out, devnet.up(args.home, port=args.port))
        return EXIT_OK
    with devnet.stop_requested() as stopping:
        net = devnet.up(args.home, port=args.port)
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
        for account in net.accounts:
            print(f"  {account.role:9} {account.did}\n            key {account.key_file} (0600)")
        print(f"  [chain] written to {net.config}")
        if args.detach or not net.started:
            print(f"  stop it: hearth devnet --home {args.home} --stop")
        else:
            print("  Ctrl-C stops it")

    out.emit(net.to_dict(), human)
    sys.stdout.flush()


# -- requester commands -------------------------------------------------------------------------------


def read_envelope(path: Path) -> dict[str, Any]:
    """A YAML or JSON envelope file, checked locally so mistakes are caught before anything is sent."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HearthError(
            "unreadable_envelope", f"{path}: {exc}", http_status=400, domain="request"
        ) from None
    if isinstance(data, dict) and "job" in data and len(data) == 1:
        data = data["job"]
    parse_envelope(data)
    assert isinstance(data, dict)
    return data


def _usage(message: str) -> HearthError:
    return HearthError("usage", message, http_status=400, domain="request")


async def _request_token(args: argparse.Namespace, client: NodeClient, node_did: str | None = None) -> str:
    """The signed request to send: the --token file as it is, or a fresh JWT (new ``jti``) on each call."""
    if args.token:
        return str(Path(args.token).read_text().strip())
    if not args.envelope or not args.key:
        raise _usage("give an ENVELOPE file and --key, or --token FILE")
    signer = load_key(Path(args.key))
    node_did = node_did or args.node_did or await client.node_did()
    return sign_request(signer, node_did, {"job": read_envelope(Path(args.envelope))}, ttl_seconds=args.ttl)


async def cmd_job_sign(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    token = await _request_token(args, client)
    out.emit({"request": token}, lambda: print(token))
    return EXIT_OK


def _print_quote(body: dict[str, Any]) -> None:
    q = body["quote"]
    print(f"quote {q['quote_id']} for job {q['job']} ({q['job_id']})")
    print(f"  price     {q['price']} {q['currency'].upper()}   (surge x{q['surge_factor']})")
    print(f"  expires   {q['expires_at']}   estimate basis: {q['estimate']['basis']}")
    for k, v in q["breakdown"].items():
        print(f"    {k:16} {v}")


async def cmd_job_quote(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    token = await _request_token(args, client)
    body = await client.quote(token)
    if args.save_quote:
        Path(args.save_quote).write_text(body["jwt"])
    out.emit(body, lambda: _print_quote(body))
    return EXIT_OK


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_status(body: dict[str, Any]) -> None:
    job = body["job"]
    print(f"job {job['id']} ({job['job_id']})  {job['kind']}")
    print(f"  state     {job['state']}")
    print(f"  price     {job['price']} USDC")
    print(f"  requester {job['requester']}")
    if job.get("failure"):
        f = job["failure"]
        print(f"  failure   {f['domain']}/{f['code']} retryable={f['retryable']}: {f['message']}")
    if "outcome" in body:
        print(f"  outcome   {body['outcome']}")
    if job.get("payment"):
        _print_payment(job["payment"])


def _print_payment(payment: dict[str, Any]) -> None:
    """The ``payment`` of a job's status: escrow terms, funding, the receipt and every transaction."""
    from payments.receipts import usdc_str

    terms, funding = payment["terms"], payment["funding"]
    print("  payment")
    print(f"    escrow job  {terms['escrow_job_id']}  (escrow {terms['escrow']}, chain {terms['chain_id']})")
    print(f"    amount      {terms['amount_usdc']} USDC from {terms['payer']}")
    print(f"    deadline    {_utc(terms['deadline'])}")
    state = funding["state"]
    if state == "awaiting":
        state += f" until {_utc(funding['wait_until'])}"
    if funding["gasless"]:
        state += ", gasless (the node submits fundWithAuthorization)"
    print(f"    funding     {state}")
    receipt = payment["settlement"]["receipt"]
    if receipt is not None:
        verdict = "passed" if receipt["passed"] else "failed"
        print(f"    receipt     {verdict}, {usdc_str(int(receipt['amount']))} USDC")
    for tx in payment["txs"]:
        block = "-" if tx["block_number"] is None else tx["block_number"]
        gas = "-" if tx["gas_used"] is None else tx["gas_used"]
        print(f"    tx {tx['purpose']:8} {tx['state']:9} {tx['hash']}  block {block}  gas {gas}")


def _print_accepted(body: dict[str, Any]) -> None:
    print("accepted" if body.get("accepted_now") else "already accepted")
    _print_status(body)


async def cmd_job_submit(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    if args.wallet:
        try:
            return await _submit_paid(args, out, client)
        except PaymentTermsRefused as exc:
            out.error(exc)
            return EXIT_REFUSED
    if args.wait or args.valid_seconds is not None:
        raise _usage("--wait and --valid-seconds need --wallet")
    token = await _request_token(args, client)
    quote = Path(args.quote).read_text().strip() if args.quote else None
    body = await client.submit(token, quote)
    out.emit(body, lambda: _print_accepted(body))
    return EXIT_OK


# -- paying for a job (submit --wallet) ----------------------------------------------------------------


class PaymentTermsRefused(FundingError):
    """Raised when ``job submit --wallet`` will not sign for a quote: the node offers no escrow terms, or
    terms other than the envelope's payment. No authorization is signed and the job is not submitted.

    Unlike a wallet that is not the payer (a usage error, exit 2) the node's answer is at fault here, so
    the command exits 1 as it does when the node refuses.
    """


async def _submit_paid(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    """Quote, sign the payer's EIP-3009 authorization for the quote's escrow terms, submit with it.

    The node submits ``fundWithAuthorization`` itself, so the payer's wallet needs USDC but no gas. Every
    check that can fail locally (wallet, envelope, terms) runs before the job is submitted.
    """
    from payments.receipts import sign_authorization

    if args.valid_seconds is not None and args.valid_seconds <= 0:
        raise _usage("--valid-seconds must be a positive number of seconds")
    if args.token and not args.quote:
        raise _usage("a --token can be sent once; with --wallet give --quote FILE too, or ENVELOPE and --key")
    env = _request_envelope(args)
    wallet = _payer_wallet(Path(args.wallet), env)
    node_did = args.node_did or await client.node_did()
    if args.quote:
        quote_jwt = Path(args.quote).read_text().strip()
    else:
        quote_jwt = str((await client.quote(await _request_token(args, client, node_did)))["jwt"])
    terms = _quoted_terms(quote_jwt, node_did, env)
    valid_before = None if args.valid_seconds is None else int(time.time()) + args.valid_seconds
    auth = sign_authorization(wallet, terms, valid_before=valid_before)
    # a fresh request JWT: the node takes each one once, and asking for the quote used one
    body = await client.submit(await _request_token(args, client, node_did), quote_jwt, auth.to_json())
    doc = {**body, "funding_terms": terms.to_json(), "authorization": auth.to_json()}

    def human() -> None:
        _print_accepted(body)
        t = terms.to_json()
        print(f"  escrow    job {t['escrow_job_id']} (escrow {t['escrow']}, chain {t['chain_id']})")
        print(f"  amount    {t['amount_usdc']} USDC from {t['payer']}")
        print(f"  valid     until {_utc(auth.valid_before)}")
        print("  funding   gasless (the node submits fundWithAuthorization)")

    if not args.wait:
        out.emit(doc, human)
        return EXIT_OK

    def say(line: str) -> None:
        if not out.as_json:  # people follow along; machines get one document at the end
            print(line, flush=True)

    if not out.as_json:
        human()
    say("waiting for the escrow to be funded ...")
    status = await _wait_for_funding(client, str(body["job"]["id"]), say)
    funded, outcome = _funding_outcome(status)
    out.emit({**doc, "status": status}, lambda: print(f"  funding   {outcome}"))
    return EXIT_OK if funded else EXIT_REFUSED


def _request_envelope(args: argparse.Namespace) -> Envelope:
    """The envelope the submission carries (the ENVELOPE file, or a --token's ``job`` claim), checked."""
    if args.token:
        _, claims, _, _ = decode_unverified(Path(args.token).read_text().strip())
        return parse_envelope(claims.get("job"))
    if not args.envelope:
        raise _usage("give an ENVELOPE file and --key, or --token FILE")
    return parse_envelope(read_envelope(Path(args.envelope)))


def _payer_wallet(path: Path, env: Envelope) -> EthSigner:
    """The --wallet key, refused unless it is an Ethereum key of the envelope's payer (nothing sent yet)."""
    signer = load_key(path)
    if not isinstance(signer, EthSigner):
        raise FundingError(
            "wallet_not_ethereum",
            f"{path} holds a {signer.key_type} key; --wallet takes an Ethereum key "
            "(hearth keys new --type eth)",
            http_status=400,
            details={"wallet": str(path), "did": signer.did},
        )
    if signer.address.lower() != env.payment.payer.lower():
        raise FundingError(
            "wallet_not_payer",
            f"the wallet {signer.address} is not the envelope's payer {env.payment.payer}",
            http_status=400,
            details={"wallet": signer.address, "payer": env.payment.payer},
        )
    return signer


def _quoted_terms(quote_jwt: str, node_did: str, env: Envelope) -> FundingTerms:
    """The escrow terms of ``node_did``'s quote for ``env``, checked against the envelope's payment.

    The quote's signature is checked too: the payer is about to sign money over to what it says.
    """
    from payments.receipts import FundingTerms

    try:
        claims = verify_node_token(quote_jwt, node_did)
    except AuthError as exc:
        code = "quote_expired" if exc.code == "expired" else "invalid_quote"
        raise RequestError(
            code, f"not a current quote of {node_did}: {exc.message}", details=exc.details
        ) from None
    quote = claims.get("quote")
    if not isinstance(quote, dict) or quote.get("envelope_hash") != envelope_hash(env):
        raise RequestError(
            "quote_for_another_envelope",
            f"the quote does not price this envelope (job_id {env.job_id}); ask for a new one",
            details={"job_id": env.job_id, "envelope_hash": envelope_hash(env)},
        )
    if quote.get("funding_terms") is None:
        raise PaymentTermsRefused(
            "payments_not_configured",
            f"the node {node_did} takes no payments (its quote has no funding_terms); "
            "submit without --wallet",
            details={"node": node_did},
        )
    terms = FundingTerms.from_json(quote["funding_terms"])
    _check_terms(terms, env)
    return terms


def _check_terms(terms: FundingTerms, env: Envelope) -> None:
    """Refuse escrow terms other than the envelope's: chain, escrow, payer, validator, amount <= max_price."""
    from payments.did import parse_did_pkh
    from payments.receipts import usdc_str, usdc_units

    pay = env.payment
    agreed: dict[str, tuple[object, object]] = {
        "chain_id": (pay.chain_id, terms.chain_id),
        "escrow": (pay.escrow, terms.escrow),
        "payer": (pay.payer, terms.payer),
        "validator": (parse_did_pkh(pay.validator)[1], terms.validator),
    }
    mismatches = [
        {"field": name, "envelope": want, "quote": got}
        for name, (want, got) in agreed.items()
        if str(want).lower() != str(got).lower()
    ]
    if terms.amount > usdc_units(pay.max_price):
        mismatches.append(
            {"field": "amount", "envelope": f"at most {pay.max_price}", "quote": usdc_str(terms.amount)}
        )
    if mismatches:
        raise PaymentTermsRefused(
            "funding_terms_mismatch",
            "the quote's escrow terms differ from the envelope's payment "
            f"({', '.join(str(m['field']) for m in mismatches)}); nothing was signed",
            details={"mismatches": mismatches},
        )


async def _wait_for_funding(client: NodeClient, job: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Poll ``job``'s status until its escrow funding is decided; the last status body.

    Decided: funding ``funded`` or ``refused``, or the job has left ``accepted``. Bounded: the node expires
    a job still unfunded at its ``wait_until``; this waits FUNDING_WAIT_GRACE_SECONDS longer at most, then
    returns the undecided status. ``say`` hears of each fund transaction and state it reaches.
    """
    give_up: float | None = None
    shown: tuple[str, str] | None = None
    while True:
        body = await client.status(job)
        view = body["job"]
        payment = view.get("payment")
        if payment is None:  # the node has no chain (any more): nothing will fund the job
            return body
        funding, tx = payment["funding"], payment["funding"]["tx"]
        if tx is not None and (tx["hash"], tx["state"]) != shown:
            shown = (tx["hash"], tx["state"])
            say(f"  fund tx   {tx['hash']} ({tx['state']})")
        if funding["state"] != "awaiting" or view["state"] != "accepted":
            return body
        if give_up is None:
            left = max(float(funding["wait_until"]) - time.time(), 0.0)
            give_up = time.monotonic() + left + FUNDING_WAIT_GRACE_SECONDS
        if time.monotonic() >= give_up:
            return body
        await asyncio.sleep(FUNDING_POLL_SECONDS)


def _funding_outcome(body: dict[str, Any]) -> tuple[bool, str]:
    """Whether the job of a status body is funded, and a line that says how (or why not)."""
    view = body["job"]
    payment = view.get("payment")
    if payment is None:
        return False, "not watched: the node reports no payment for this job"
    funding, tx = payment["funding"], payment["funding"]["tx"]
    if funding["state"] == "funded":
        if tx is None:
            return True, "funded (the escrow holds the amount)"
        return True, (
            f"funded by tx {tx['hash']} ({tx['state']} in block {tx['block_number']}, "
            f"{tx['gas_used']} gas paid by the node)"
        )
    failure = view.get("failure")
    why = f": {failure['message']}" if failure else ""
    if funding["state"] == "refused" or view["state"] != "accepted":
        return False, f"{funding['state']}, job {view['state']}{why}"
    return False, f"still awaiting after the wait; see `hearth job status {view['id']}`"


async def cmd_job_status(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    body = await client.status(args.id)
    out.emit(body, lambda: _print_status(body))
    return EXIT_OK


async def cmd_job_result(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    body = await client.result(args.id)
    out.emit(body, lambda: print(json.dumps(body["result"], indent=2)))
    return EXIT_OK


async def cmd_job_cancel(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    signer = load_key(Path(args.key))
    node_did = args.node_did or await client.node_did()
    body = await client.cancel(args.id, sign_request(signer, node_did, {"cancel": args.id}))
    out.emit(body, lambda: _print_status(body))
    return EXIT_OK


async def cmd_job_events(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    async for event in client.events(args.id, follow=args.follow):
        if out.as_json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            move = (
                f"{event['from'] or '-'} -> {event['to']}" if event["type"] == "transition" else event["type"]
            )
            print(
                f"#{event['seq']:<4} {event['at']:.3f}  {move:24} {event['actor']}: {event['reason']}",
                flush=True,
            )
    return EXIT_OK


async def cmd_blob_put(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    body = await client.put_blob(Path(args.file))
    out.emit(body, lambda: print(f"{body['cid']}  ({body['size']} bytes)"))
    return EXIT_OK


def cmd_job_replay(args: argparse.Namespace, out: Out) -> int:
    """Re-run a completed job from this node's journal and blockstore; compare the artifact CID."""
    import tempfile

    from node.daemon import Node
    from node.errors import ConflictError, NotFoundError
    from node.executor import TranscodeExecutor, Workspace
    from node.journal import Journal
    from provider.pricing import Pricer

    node = Node.from_home(args.home, config_path=args.config)

    async def go() -> dict[str, Any]:
        journal = Journal.open(
            node.state_dir / node.cfg.journal.filename, synchronous=node.cfg.journal.synchronous
        )
        try:
            job = journal.get(args.id)
            if job is None:
                raise NotFoundError("job_not_found", f"no job {args.id} in this node's journal")
            if job.result is None:
                raise ConflictError(
                    "job_not_completed", f"job {job.id} is {job.state}; only a completed job can be replayed"
                )
            with tempfile.TemporaryDirectory(prefix="hearth-replay-") as work:
                executor = TranscodeExecutor(
                    node.cfg,
                    Pricer(node.cfg.pricing, home=node.home),
                    Workspace(runner=node.runner, store=node.store, work_dir=Path(work), node_did=node.did),
                )
                return await executor.replay(job)
        finally:
            journal.close()
            node.runner.close()

    report = asyncio.run(go())

    def human() -> None:
        verdict = "MATCH" if report["match"] else "DIFFERENT"
        print(f"{verdict}  recorded {report['recorded_cid']}\n         replayed {report['replay_cid']}")
        print(
            f"argv {'same' if report['argv_hash_match'] else 'changed'}, "
            f"image {'same' if report['image_match'] else 'changed'}"
        )

    out.emit(report, human)
    return EXIT_OK if report["match"] else EXIT_REFUSED


def cmd_demo(args: argparse.Namespace, out: Out) -> int:
    """Run scripts/demo.sh: devnet, node, quote, funding, the job, validation and release, step by step."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"
    if not script.is_file():
        raise ConfigError(
            "demo_unavailable",
            f"the demo runs from a source checkout of Hearth; {script} is not there",
            details={"path": str(script)},
        )
    env = dict(os.environ, HEARTH_DEMO_KIND="inference" if args.inference else "transcode")
    return subprocess.run(["bash", str(script)], env=env, check=False).returncode


# -- parser -------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--home", type=Path, default=None, help="node home (default $HEARTH_HOME or ~/.hearth)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _client_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--node", help="node URL (default: from --home's node.toml, or $HEARTH_NODE_URL)")
    p.add_argument("--node-did", help="the node's DID (default: read from GET /v1/capacity)")
    return p


def _request_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("envelope", nargs="?", help="job envelope, YAML or JSON")
    p.add_argument("--key", help="requester key file (from `hearth keys new`)")
    p.add_argument("--token", help="send this already signed request (file) instead of signing one")
    p.add_argument("--ttl", type=int, default=300, help="request lifetime in seconds (default 300)")
    return p


def _config_opt() -> argparse.ArgumentParser:
    """``--config``: a node run as a service keeps its node.toml in /etc/hearth, not in its home."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node.toml to read (default: HOME/node.toml); relative paths in it stay under --home",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common, client, request, config = _common(), _client_opts(), _request_opts(), _config_opt()
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth provider node", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="write a validated node.toml and the node key")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--name", default="hearth-node")
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

    p = sub.add_parser("devnet", parents=[common], help="a local chain with the contracts, for development")
    p.add_argument("--port", type=int, default=DEFAULT_DEVNET_PORT, help="anvil's RPC port on 127.0.0.1")
    p.add_argument("--detach", action="store_true", help="leave anvil running in the background")
    p.add_argument("--stop", action="store_true", help="stop the anvil a --detach run left running")
    p.set_defaults(func=cmd_devnet)

    job = sub.add_parser("job", help="requester commands").add_subparsers(dest="job_cmd", required=True)
    p = job.add_parser("sign", parents=[common, client, request], help="print a signed request (JWT)")
    p.set_defaults(afunc=cmd_job_sign)
    p = job.add_parser("quote", parents=[common, client, request], help="ask the node for a signed quote")
    p.add_argument("--save-quote", help="write the quote JWT to this file")
    p.set_defaults(afunc=cmd_job_quote)
    p = job.add_parser("submit", parents=[common, client, request], help="submit a job (against --quote)")
    p.add_argument("--quote", help="quote JWT file from `hearth job quote --save-quote`")
    p.add_argument(
        "--wallet",
        help="the payer's Ethereum key file: sign an EIP-3009 authorization for the quote's escrow terms; "
        "the node funds the escrow with it (the payer pays no gas)",
    )
    p.add_argument(
        "--valid-seconds",
        type=int,
        help="with --wallet: the authorization lapses after this many seconds (default: the escrow deadline)",
    )
    p.add_argument(
        "--wait", action="store_true", help="with --wallet: wait until the escrow is funded or funding fails"
    )
    p.set_defaults(afunc=cmd_job_submit)
    for name, fn, text in (
        ("status", cmd_job_status, "job status"),
        ("result", cmd_job_result, "job result"),
    ):
        p = job.add_parser(name, parents=[common, client], help=text)
        p.add_argument("id")
        p.set_defaults(afunc=fn)
    p = job.add_parser("events", parents=[common, client], help="the job's events (SSE)")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true", help="keep streaming live events")
    p.set_defaults(afunc=cmd_job_events)
    p = job.add_parser(
        "replay", parents=[common, config], help="re-run a completed job here; does the CID match?"
    )
    p.add_argument("id")
    p.set_defaults(func=cmd_job_replay)
    blob = sub.add_parser("blob", help="content-addressed inputs").add_subparsers(
        dest="blob_cmd", required=True
    )
    p = blob.add_parser("put", parents=[common, client], help="upload a file; prints its CID")
    p.add_argument("file")
    p.set_defaults(afunc=cmd_blob_put)
    p = job.add_parser("cancel", parents=[common, client], help="cancel a job (signed by its requester)")
    p.add_argument("id")
    p.add_argument("--key", required=True)
    p.set_defaults(afunc=cmd_job_cancel)
    add_validate_parser(sub, [common, client])
    add_models_parser(sub, [common, config])
    add_service_parser(sub)
    add_status_parser(sub, [common, client])
    p = sub.add_parser("demo", help="run the whole market round on a local chain (from a source checkout)")
    p.add_argument("--inference", action="store_true", help="a vLLM batch job instead of a transcode")
    p.set_defaults(func=cmd_demo)
    return parser


def _run_async(
    args: argparse.Namespace, out: Out, fn: Callable[[argparse.Namespace, Out, NodeClient], Awaitable[int]]
) -> int:
    async def go() -> int:
        async with NodeClient(node_url(args.home, args.node)) as client:
            return await fn(args, out, client)

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.home is None:
        args.home = default_home()
    out = Out(args.json)
    try:
        if hasattr(args, "afunc"):
            return _run_async(args, out, args.afunc)
        result: int = args.func(args, out)
        return result
    except NodeUnreachable as exc:
        out.error(exc)
        return EXIT_UNREACHABLE
    except NodeError as exc:
        out.error(exc)
        return EXIT_REFUSED
    except HearthError as exc:
        out.error(exc)
        return EXIT_USAGE
    except OSError as exc:
        out.error(HearthError("os_error", str(exc), http_status=400, domain="request"))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Signer", "build_parser", "main"]
