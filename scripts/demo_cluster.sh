#!/usr/bin/env bash
# Hearth cluster demo (`hearth demo --cluster`): one paid round on a node in front of a Ray cluster, with a
# worker lost mid-job. A local Ray cluster starts (a head with no CPUs of its own, two workers of one CPU
# each joined with `hearth worker join`), then a devnet and a node whose [cluster] table points at it: the
# node keeps its API, journal, pricing and settlement, and every container runs as a Ray task on a worker.
# A paid transcode is quoted, funded gaslessly and placed on a worker; once it transcodes there, that
# worker's raylet is killed (SIGKILL, as a box dropping off the network looks to the head). The journal
# shows the attempt failing with worker_lost and the second attempt on the other worker; the artifact is
# validated independently, the receipt posted and the escrow released, as in `make demo`.
# Everything lives in .demo-cluster/; the node, the cluster and the devnet stop at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
source scripts/demo_common.sh
DEMO="$PWD/.demo-cluster"
STATE="$DEMO/cluster.json"
HOME_DIR="$DEMO/node"
rm -rf "$DEMO"; mkdir -p "$DEMO"
PORT="${HEARTH_DEMO_PORT:-$(free_port)}"
CHAIN_PORT="${HEARTH_DEMO_CHAIN_PORT:-$(free_port)}"
NODE="http://127.0.0.1:$PORT"
NODE_PID=""
cleanup() {
  if [[ -n "$NODE_PID" ]]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  python -m cluster.devcluster down --state "$STATE" >/dev/null 2>&1 || true
  hearth devnet --home "$HOME_DIR" --stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
started=$(date +%s)

step "1. A Ray cluster on this machine: a head with no CPUs of its own, two workers (1 CPU each) joined with 'hearth worker join'"
UP=(python -m cluster.devcluster up --root "$DEMO/ray" --state "$STATE" --worker demo-a --worker demo-b --cpus 1 --memory-mb 2048)
printf '\033[2m$ %s\033[0m\n' "${UP[*]}"
"${UP[@]}" >"$DEMO/cluster-up.json"
cat "$DEMO/cluster-up.json"
ADDRESS=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["address"])' "$STATE")
# what a driver of the cluster runs with (the cluster's own Ray token): the node is its driver
EXPORTS=$(python -c 'import json, shlex, sys; [print(f"export {k}={shlex.quote(v)}") for k, v in json.load(open(sys.argv[1]))["env"].items()]' "$DEMO/cluster-up.json")
eval "$EXPORTS"
echo "head $ADDRESS (token authentication, the cluster's own token); worker homes and logs under $DEMO/ray"

step "2. A node paid through a local chain, in front of the cluster ([cluster] in node.toml)"
show hearth init --home "$HOME_DIR" --port "$PORT"
hearth devnet --home "$HOME_DIR" --port "$CHAIN_PORT" --detach --json >"$DEMO/devnet.json"
toml_set "$HOME_DIR" cluster address "\"$ADDRESS\""
toml_set "$HOME_DIR" cluster head_url "\"$NODE\""  # where the workers fetch the job's input (its gateway)
toml_set "$HOME_DIR" cluster refresh_seconds 1
python - "$HOME_DIR/node.toml" <<'PY'
import sys, tomllib
print("[cluster]", ", ".join(f"{k} = {v!r}" for k, v in tomllib.load(open(sys.argv[1], "rb"))["cluster"].items()))
PY
read -r ESCROW PAYER VALIDATOR PAYER_KEY VALIDATOR_KEY < <(python - "$DEMO/devnet.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); a = d["accounts"]
print(d["escrow"], a["requester"]["address"], a["validator"]["did"], a["requester"]["key_file"], a["validator"]["key_file"])
PY
)
hearth run --home "$HOME_DIR" >"$DEMO/node.log" 2>&1 &
NODE_PID=$!
wait_url "$NODE/readyz"
python - "$NODE" <<'PY'
import json, sys, time, urllib.request
for _ in range(150):  # the node's view of the cluster is refreshed every second
    offer = json.load(urllib.request.urlopen(sys.argv[1] + "/v1/capacity"))
    machine = offer.get("machine") or offer["capacity"]["machine"]
    workers = [w for w in machine.get("workers") or [] if w.get("alive", True)]
    if len(workers) == 2:
        break
    time.sleep(0.2)
else:
    sys.exit(f"the node does not see both workers: {machine}")
print(f"node ready at {sys.argv[1]}; it offers the sum of its workers: {machine['offered']}")
for w in workers:
    print(f"  worker {w['name']:4} {w['cpus']:g} CPU, {w['memory_mb']} MB, alive")
PY

step "3. A requester (did:key) paying from the devnet's funded wallet; a 10 s 720p test clip uploaded to the node"
hearth keys new --out "$DEMO/requester.key" >/dev/null
echo "payer wallet $PAYER; validator $VALIDATOR"
python -c 'import sys; from sandbox.ffmpeg import make_test_clip; make_test_clip(__import__("pathlib").Path(sys.argv[1]), seconds=10, width=1280, height=720, fps=30)' "$DEMO/clip.mp4"
INPUT=$(hearth blob put "$DEMO/clip.mp4" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')
echo "input $INPUT"
paid_transcode "$DEMO/job.yaml" cluster-job-1

step "USDC balances before the round"
usdc_balances "$DEMO/devnet.json"

step "4. Quote, then submit with gasless funding (an EIP-3009 authorization the node sends)"
show hearth job quote "$DEMO/job.yaml" --key "$DEMO/requester.key" --node "$NODE" --save-quote "$DEMO/quote.jwt"
show hearth job submit "$DEMO/job.yaml" --key "$DEMO/requester.key" --wallet "$PAYER_KEY" --node "$NODE" --quote "$DEMO/quote.jwt" --wait
REQUESTER_DID=$(hearth keys show "$DEMO/requester.key" --json | python -c 'import json,sys; print(json.load(sys.stdin)["did"])')
JOB=$(python -c 'import sys; from core.envelope import node_job_id; print(node_job_id(sys.argv[1], "cluster-job-1"))' "$REQUESTER_DID")

step "5. The job is placed on a worker as a Ray task; once it transcodes there, that worker's raylet is killed"
LOST=$(python - "$NODE" "$JOB" <<'PY'
import json, sys, time, urllib.request
url = f"{sys.argv[1]}/v1/jobs/{sys.argv[2]}/events?follow=false"
for _ in range(1200):
    lines = urllib.request.urlopen(url).read().decode().splitlines()
    seen = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    placed = [e["data"]["worker"] for e in seen if e["type"] == "note" and "worker" in (e.get("data") or {})
              and e["data"].get("program") == "ffmpeg"]
    going = any(e["type"] == "progress" and e["data"].get("stage") == "transcoding" for e in seen)
    if placed and going:
        print(placed[-1]); break
    if any(e["type"] == "transition" and e["to"] in ("completed", "failed", "cancelled") for e in seen):
        sys.exit("the job ended before it was seen transcoding")
    time.sleep(0.1)
else:
    sys.exit("the job never started transcoding on a worker")
PY
)
echo "attempt 1 transcodes on worker $LOST"
show python -m cluster.devcluster kill-raylet --state "$STATE" "$LOST"

step "6. The journal, live: the attempt fails with worker_lost, the second runs on the other worker"
show hearth job events "$JOB" --node "$NODE" --follow
python - "$NODE" "$JOB" "$LOST" <<'PY'
import json, sys, urllib.request
node, job, lost = sys.argv[1:]
lines = urllib.request.urlopen(f"{node}/v1/jobs/{job}/events?follow=false").read().decode().splitlines()
seen = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
placed = [(e["data"]["attempt"], e["data"]["worker"]) for e in seen
          if e["type"] == "note" and "worker" in (e.get("data") or {}) and e["data"].get("program") == "ffmpeg"]
failure = next((e for e in seen if e["type"] == "transition" and e["to"] == "failed"), None)
if failure is None or not failure["reason"].startswith("worker_lost"):
    sys.exit(f"expected a worker_lost failure, the journal says: {seen[-5:]}")
print(f"attempt 1 on {placed[0][1]}: {failure['reason']} (retryable, queued again)")
print(f"attempt 2 on {placed[-1][1]}: {seen[-1].get('to', seen[-1]['type'])}")
if placed[0][1] != lost or placed[-1][1] == lost or len(placed) != 2:
    sys.exit(f"unexpected placements: {placed}")
PY

step "7. The signed result: artifact CID, checks, provenance (the worker that made it)"
hearth job result "$JOB" --node "$NODE" --json >"$DEMO/result.json"
python - "$DEMO/result.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))["result"]
if result["status"] != "completed" or not result["checks"]["passed"]:
    sys.exit(f"the job did not complete cleanly: {json.dumps(result, indent=2)}")
p = result["provenance"]
print(f"artifact    {result['artifact_uri']}  ({result['artifact_size']} bytes)")
print("checks      " + ", ".join(f"{c['name']} {'ok' if c['passed'] else 'FAILED'}" for c in result["checks"]["checks"]))
print(f"made by     worker {p.get('worker')}, attempt {p['attempt']}")
print(f"cost        {result['cost']} {result['currency']} (runtime {result['runtime_seconds']} s)")
PY

step "8. Independent validation: the validator fetches the artifact by CID, re-runs the checks with its own ffprobe, signs the EIP-712 receipt and posts it; the node sends release"
show hearth validate "$JOB" --key "$VALIDATOR_KEY" --node "$NODE"
python - "$NODE" "$JOB" <<'PY'
import json, sys, time, urllib.request
for _ in range(600):
    job = json.load(urllib.request.urlopen(f"{sys.argv[1]}/v1/jobs/{sys.argv[2]}"))["job"]
    if job["state"] in ("settled", "refunded"):
        break
    time.sleep(0.1)
else:
    sys.exit(f"the job did not settle: {job['state']}")
pay = job["payment"]
print(f"job {job['id']} is {job['state']}")
print(f"paid {int(pay['settlement']['receipt']['amount']) / 1e6:.6f} USDC of a {int(pay['terms']['amount']) / 1e6:.6f} USDC quote; the rest went back to the payer")
for tx in pay["txs"]:
    print(f"  {tx['purpose']:8} {tx['hash']}  block {tx['block_number']}  {tx['state']}  gas {tx['gas_used']} (paid by the node)")
if job["state"] != "settled":
    sys.exit("the job was not settled")
PY

step "USDC balances after the round"
usdc_balances "$DEMO/devnet.json"

step "Demo complete in $(( $(date +%s) - started )) s"
echo "node log: $DEMO/node.log; cluster logs: $DEMO/ray"
