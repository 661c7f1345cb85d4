"""Admission benchmark: signed quote+submit requests/s through the node vs a bare aiohttp handler.

Both servers run as separate processes on this machine, in the same run, loaded by the same client
(one process, keep-alive connections, pre-signed tokens so the client's signing is not measured).
The node path is the full admission path: DID-JWT verify, replay cache, envelope, policy, estimate,
price, capacity hold, journal write (committed before the answer) and signed quote/status. The bare
handler reads the same body and answers a small JSON document.

The two are measured in alternating rounds (bare, node, bare, node, ...) so that both see the same
machine; the ratio reported is the median of the rounds' ratios. Each server's CPU time per request
(user + system, from /proc) is reported beside its rate: on a small machine the bare handler is often
limited by the client, not by itself.

Also measured: the daemon's peak RSS and its restart-to-ready time with 10,000 jobs in the journal.

Targets: node rate >= 40% of bare; peak RSS <= 250 MB; restart-to-ready <= 1 s.
Usage: python bench/admission.py [--requests N] [--rounds R] [--concurrency C] [--jobs 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.envelope import envelope_dict, envelope_hash, idempotency_key, node_job_id, parse_envelope  # noqa: E402
from core.journal import Journal  # noqa: E402
from payments.keys import new_ed25519, save_key  # noqa: E402
from requester.client import sign_request  # noqa: E402

BARE_SERVER = r"""
import sys
from aiohttp import web

async def handle(request):
    body = await request.read()
    return web.json_response({"ok": True, "bytes": len(body)}, status=201)

app = web.Application(client_max_size=256 * 1024)
app.router.add_post("/v1/quotes", handle)
app.router.add_post("/v1/jobs", handle)
app.router.add_get("/readyz", lambda r: web.json_response({"status": "ready"}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.005)
    raise TimeoutError(url)


def envelope(job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "kind": "ffmpeg_transcode",
        "input_uri": "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        "output_spec": {
            "format": "mp4",
            "resolution": "720p",
            "clip": {"start_seconds": 0, "duration_seconds": 30},
        },
        "limits": {"timeout_seconds": 600, "max_output_mb": 200, "cpus": 0.01, "memory_mb": 64, "gpus": 0},
        "payment": {
            "max_price": "5.00",
            "chain_id": 31337,
            "escrow": "0x" + "e" * 40,
            "payer": "0x" + "a" * 40,
            "validator": "did:pkh:eip155:31337:0x" + "b" * 40,
        },
    }


def write_home(home: Path, port: int) -> str:
    home.mkdir(parents=True, exist_ok=True)
    signer = new_ed25519()
    save_key(signer, home / "node.key")
    (home / "node.toml").write_text(
        f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
        "[capacity]\novercommit = 1000.0\n"
        "[policy]\nper_did_concurrency = 1000000\nmax_cpus = 4\n"
        "[scheduler]\npaused = true\n"  # admission only: accepted jobs queue
    )
    return signer.did


async def load(url: str, pairs: list[tuple[str, str]], concurrency: int) -> tuple[float, int]:
    """Send each (quote, submit) pair in order on ``concurrency`` connections; returns (seconds, errors)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    errors = 0
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for pair in pairs:
        queue.put_nowait(pair)
    headers = {"Content-Type": "application/jwt"}

    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                quote_token, submit_token = queue.get_nowait()
                async with session.post(url + "/v1/quotes", data=quote_token, headers=headers) as r:
                    body = await r.read()
                    if r.status != 201:
                        errors += 1
                        continue
                quote_jwt = json.loads(body).get("jwt", "x")
                doc = json.dumps({"request": submit_token, "quote": quote_jwt})
                async with session.post(
                    url + "/v1/jobs", data=doc, headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    errors += r.status != 201

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, errors


REQUESTERS = 64  # a population of agents, each with its own DID, taking turns


def tokens(node_did: str, n: int, tag: str) -> list[tuple[str, str]]:
    requesters = [new_ed25519() for _ in range(REQUESTERS)]
    pairs = []
    for i in range(n):
        requester = requesters[i % REQUESTERS]
        env = envelope(f"{tag}-{i}")
        pairs.append(
            (
                sign_request(requester, node_did, {"job": env}, ttl_seconds=3600),
                sign_request(requester, node_did, {"job": env}, ttl_seconds=3600),
            )
        )
    return pairs


def fill_journal(home: Path, n: int) -> None:
    """``n`` jobs straight into the journal: most finished, some quoted, some accepted."""
    state = home / "state"
    state.mkdir(parents=True, exist_ok=True)
    requester = new_ed25519()
    now = time.time()
    with Journal.open(state / "journal.sqlite3") as j:
        for i in range(n):
            env = parse_envelope(envelope(f"fill-{i}"))
            job = node_job_id(requester.did, env.job_id)
            j.create_priced(
                id=job,
                iss=requester.did,
                job_id=env.job_id,
                kind=env.kind,
                idem_key=idempotency_key(requester.did, env),
                envelope_hash=envelope_hash(env),
                envelope=envelope_dict(env),
                price="0.05",
                quote_id="q_" + secrets.token_hex(8),
                quote_jwt="x.y.z",
                quote_expires_at=now + 3600,
                cpus=0.01,
                memory_mb=64,
                gpus=0,
                actor=requester.did,
                reason="bench fill",
            )
            if i % 10 == 0:
                continue  # stays priced
            j.transition(job, "accepted", actor="bench", reason="bench fill")
            if i % 10 < 8:
                j.transition(job, "cancelled", actor="bench", reason="bench fill")
            j.check_and_record(requester.did, secrets.token_hex(8), int(now) + 3600)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, pid: int, pairs: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
    """One round of ``pairs`` against the server ``pid`` at ``url``: rate, errors, its CPU per request."""
    cpu0 = cpu_seconds(pid)
    secs, errs = asyncio.run(load(url, pairs, concurrency))
    requests = 2 * len(pairs)
    return {
        "seconds": secs,
        "errors": errs,
        "rps": requests / secs,
        "cpu_us_per_request": (cpu_seconds(pid) - cpu0) / requests * 1e6,
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_node(home: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", "--home", str(home), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HEARTH_LOGGING__LEVEL": "WARNING"},
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "requests_per_pair": 2,
        "pairs_per_round": args.requests,
        "concurrency": args.concurrency,
    }
    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp:
        tmpdir = Path(tmp)
        bare_port = free_port()
        script = tmpdir / "bare.py"
        script.write_text(BARE_SERVER)
        bare = subprocess.Popen([sys.executable, str(script), str(bare_port)])
        port = free_port()
        home = tmpdir / "node"
        node_did = write_home(home, port)
        node = start_node(home, port)
        bare_url, url = f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{port}"
        rounds: list[dict[str, Any]] = []
        try:
            wait_ready(bare_url, bare)
            wait_ready(url, node)
            asyncio.run(load(bare_url, tokens("did:key:bare", 200, "warm"), args.concurrency))
            asyncio.run(load(url, tokens(node_did, 200, "warm"), args.concurrency))
            for n in range(args.rounds):
                bare_pairs = tokens("did:key:bare", args.requests, f"bare{n}")
                b = measure(bare_url, bare.pid, bare_pairs, args.concurrency)
                h = measure(url, node.pid, tokens(node_did, args.requests, f"run{n}"), args.concurrency)
                rounds.append({"bare": b, "node": h, "ratio": h["rps"] / b["rps"]})
        finally:
            for proc in (bare, node):
                proc.terminate()
                proc.wait()
        results["rounds"] = rounds
        results["ratio"] = statistics.median(r["ratio"] for r in rounds)
        for side in ("bare", "node"):
            results[side] = {
                "rps": statistics.median(r[side]["rps"] for r in rounds),
                "cpu_us_per_request": statistics.median(r[side]["cpu_us_per_request"] for r in rounds),
                "errors": sum(r[side]["errors"] for r in rounds),
            }

        # 10k jobs: restart-to-ready and peak RSS
        fill_home = tmpdir / "filled"
        write_home(fill_home, free_port())
        fill_journal(fill_home, args.jobs)
        port = free_port()
        times = []
        rss = 0.0
        for _ in range(3):
            node = start_node(fill_home, port)
            try:
                times.append(wait_ready(f"http://127.0.0.1:{port}", node))
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                    r.read()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/capacity") as r:
                    r.read()
                rss = max(rss, peak_rss_mb(node.pid))
            finally:
                node.terminate()
                node.wait()
        results["jobs_in_journal"] = args.jobs
        results["restart_to_ready_s"] = {"min": min(times), "max": max(times)}
        results["peak_rss_mb"] = rss
    results["targets"] = {
        "ratio>=0.40": results["ratio"] >= 0.40,
        "peak_rss<=250MB": results["peak_rss_mb"] <= 250,
        "restart_to_ready<=1s": results["restart_to_ready_s"]["max"] <= 1.0,
    }
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="quote+submit pairs per server and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/node rounds (median reported)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        for n, rd in enumerate(r["rounds"], 1):
            print(
                f"round {n}      : bare {rd['bare']['rps']:6.0f} req/s, node {rd['node']['rps']:6.0f} req/s, "
                f"ratio {rd['ratio']:.2f}"
            )
        for side, name in (("bare", "bare aiohttp "), ("node", "hearth node  ")):
            d = r[side]
            print(
                f"{name}: {d['rps']:8.0f} req/s  {d['cpu_us_per_request']:6.0f} us CPU/request "
                f"({d['errors']} errors)"
            )
        print(f"ratio        : {r['ratio']:.2f}   (median of {len(r['rounds'])} rounds; target >= 0.40)")
        print(f"peak RSS     : {r['peak_rss_mb']:.1f} MB with {r['jobs_in_journal']} jobs (target <= 250 MB)")
        rt = r["restart_to_ready_s"]
        print(
            f"restart->ready: {rt['min']:.3f}-{rt['max']:.3f} s "
            f"with {r['jobs_in_journal']} jobs (target <= 1 s)"
        )
    ok = all(r["targets"].values()) and r["node"]["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
