#!/usr/bin/env bash
# Hearth demo on embedded defaults: the whole market round on a local chain. A devnet (anvil, TestUSDC,
# HearthEscrow, funded wallets) and a node start; a generated test clip is uploaded; with the CLI the demo
# shows a quote refused for a low max_price (with the node's ask), a tampered request refused, a replay
# refused; then a signed job, its quote with escrow terms, gasless funding (an EIP-3009 authorization the
# node submits), the transcode in its sandbox with live progress, the artifact's CID verified with an
# independent IPFS client (ipfs-car), independent validation (the validator's own ffprobe), the EIP-712
# receipt and the release. USDC balances before and after and every transaction hash are printed.
# HEARTH_DEMO_KIND=inference (`hearth demo --inference`) runs a vLLM batch job instead: a tiny Llama model
# is built locally and registered in the catalog, a batch is uploaded, a bad batch is refused at quote
# time, and the batch runs in the CPU build of vLLM, is validated by its answers and settled the same way;
# then the same weights, registered again as a warm model (`warm = true`), answer the batch twice more: the
# first warm batch starts the model's engine (vLLM's OpenAI server in its own container) and is answered
# there, the second finds the engine running and only answers; the three times are printed side by side.
# Everything lives in .demo/; the node and the devnet stop at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
source scripts/demo_common.sh
DEMO="$PWD/.demo"
KIND="${HEARTH_DEMO_KIND:-transcode}"
[[ "$KIND" == transcode || "$KIND" == inference ]] || { echo "HEARTH_DEMO_KIND: transcode or inference" >&2; exit 2; }
rm -rf "$DEMO"; mkdir -p "$DEMO"
PORT="${HEARTH_DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
NODE="http://127.0.0.1:$PORT"
N=0
numbered() { N=$((N + 1)); step "$N. $*"; }  # the demo's numbered steps (their count depends on KIND)
expect_refusal() {  # the command must fail with exit 1 (the node refused); show its structured error
  printf '\033[2m$ %s\033[0m\n' "$*"
  set +e; "$@"; rc=$?; set -e
  if [[ $rc -ne 1 ]]; then echo "expected a refusal (exit 1), got exit $rc" >&2; exit 1; fi
}

CHAIN_PORT="${HEARTH_DEMO_CHAIN_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
NODE_PID=""
cleanup() {
  if [[ -n "$NODE_PID" ]]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  hearth devnet --home "$DEMO/node" --stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "Start a node on embedded defaults, paid through a local chain"
show hearth init --home "$DEMO/node" --port "$PORT"
show hearth devnet --home "$DEMO/node" --port "$CHAIN_PORT" --detach
if [[ "$KIND" == inference ]]; then
  step "A model for the catalog: a tiny Llama built here (random weights, no download), hashed and registered"
  python -m provider.testmodel "$DEMO/models/tiny-llama" >/dev/null
  show hearth models add "$DEMO/models/tiny-llama" --name tiny-llama --input-1k-tokens 0.5 --output-1k-tokens 2 --home "$DEMO/node"
  step "The same weights again as tiny-llama-warm, marked warm = true: one engine kept running between its batches"
  show hearth models add "$DEMO/models/tiny-llama" --name tiny-llama-warm --input-1k-tokens 0.5 --output-1k-tokens 2 --home "$DEMO/node"
  python - "$DEMO/node/node.toml" <<'PY'
import sys, tomlkit
path = sys.argv[1]
doc = tomlkit.parse(open(path).read())
warm = next(m for m in doc["models"] if m["name"] == "tiny-llama-warm")
warm["warm"] = True  # started by its first batch (no preload), stopped after max_idle_seconds unused
open(path, "w").write(tomlkit.dumps(doc))
print(f"{path}: tiny-llama-warm gets warm = true (engine: warm_cpus, warm_memory_mb and warm_concurrency at their defaults)")
PY
fi
hearth devnet --home "$DEMO/node" --port "$CHAIN_PORT" --detach --json >"$DEMO/devnet.json"
read -r ESCROW PAYER VALIDATOR PAYER_KEY VALIDATOR_KEY < <(python - "$DEMO/devnet.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); a = d["accounts"]
print(d["escrow"], a["requester"]["address"], a["validator"]["did"], a["requester"]["key_file"], a["validator"]["key_file"])
PY
)
hearth run --home "$DEMO/node" >"$DEMO/node.log" 2>&1 &
NODE_PID=$!
python - "$NODE" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=1); break
    except OSError: time.sleep(0.05)
else: sys.exit("node did not become ready; see .demo/node.log")
PY
echo "node ready at $NODE"

step "A requester identity (did:key, Ed25519); it pays from the devnet's funded wallet"
show hearth keys new --out "$DEMO/requester.key"
echo "payer wallet $PAYER ($PAYER_KEY); validator $VALIDATOR"

payment_yaml() {  # payment_yaml MAX_PRICE: an envelope's payment block, on the devnet's escrow and wallets
  cat <<YAML
payment:
  max_price: "$1"
  currency: usdc
  chain_id: 31337
  escrow: "$ESCROW"
  payer: "$PAYER"
  validator: $VALIDATOR
YAML
}

if [[ "$KIND" == transcode ]]; then
step "A 10 s 720p test clip, uploaded to the node: its CID is the job's input"
python -c 'import sys; from sandbox.ffmpeg import make_test_clip; make_test_clip(__import__("pathlib").Path(sys.argv[1]), seconds=10, width=1280, height=720, fps=30)' "$DEMO/clip.mp4"
show hearth blob put "$DEMO/clip.mp4" --node "$NODE"
INPUT=$(hearth blob put "$DEMO/clip.mp4" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')

envelope() {  # envelope FILE JOB_ID MAX_PRICE
  paid_transcode "$1" "$2" "$3"
}
else
step "An OpenAI batch (chat completions JSONL), uploaded to the node: its CID is the job's input"
python - "$DEMO/batch.jsonl" "$DEMO/bad-batch.jsonl" "$DEMO/warm-batch.jsonl" <<'PY'
import json, sys
def line(cid, text, model="tiny-llama", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}})
prompts = ["hello world", "Summarise this paragraph in one sentence, please.", "The quick brown fox", "Name three primes."]
open(sys.argv[1], "w").write("\n".join(line(f"q{i}", p, max_tokens=16) for i, p in enumerate(prompts, 1)) + "\n")
open(sys.argv[2], "w").write(line("ok", "hello") + "\n" + line("too-long", "word " * 2100) + "\n")
open(sys.argv[3], "w").write("\n".join(line(f"q{i}", p, "tiny-llama-warm", max_tokens=16) for i, p in enumerate(prompts, 1)) + "\n")
PY
head -n 2 "$DEMO/batch.jsonl"; echo "... ($(wc -l <"$DEMO/batch.jsonl") requests)"
show hearth blob put "$DEMO/batch.jsonl" --node "$NODE"
INPUT=$(hearth blob put "$DEMO/batch.jsonl" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')
BAD_INPUT=$(hearth blob put "$DEMO/bad-batch.jsonl" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')
WARM_INPUT=$(hearth blob put "$DEMO/warm-batch.jsonl" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')

envelope() {  # envelope FILE JOB_ID MAX_PRICE [INPUT [MODEL]]
  cat >"$1" <<YAML
job_id: $2
kind: vllm_batch
input_uri: ${4:-$INPUT}
output_spec: {format: openai_batch_jsonl, model: ${5:-tiny-llama}, max_tokens: 16, max_requests: 100}
limits: {timeout_seconds: 600, max_output_mb: 20, cpus: 2, memory_mb: 4096, gpus: 0}
validation: {all_answered: true}
YAML
  payment_yaml "$3" >>"$1"
}
fi
envelope "$DEMO/job.yaml" demo-job-1 2.50
if [[ "$KIND" == transcode ]]; then
envelope "$DEMO/cheap.yaml" demo-job-2 0.000001
envelope "$DEMO/other.yaml" demo-job-3 2.50
envelope "$DEMO/replay.yaml" demo-job-4 2.50

numbered "max_price below the node's ask: refused, with the ask"
expect_refusal hearth job quote "$DEMO/cheap.yaml" --key "$DEMO/requester.key" --node "$NODE"

numbered "A tampered request (max_price raised after signing): refused"
hearth job sign "$DEMO/other.yaml" --key "$DEMO/requester.key" --node "$NODE" >"$DEMO/other.jwt"
python - "$DEMO/other.jwt" <<'PY'
import base64, json, sys
h, p, s = open(sys.argv[1]).read().strip().split(".")
claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
claims["job"]["payment"]["max_price"] = "99.00"
p = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
open(sys.argv[1] + ".tampered", "w").write(f"{h}.{p}.{s}")
PY
expect_refusal hearth job quote --token "$DEMO/other.jwt.tampered" --node "$NODE"

numbered "The same signed request sent twice: the replay is refused"
hearth job sign "$DEMO/replay.yaml" --key "$DEMO/requester.key" --node "$NODE" >"$DEMO/replay.jwt"
show hearth job quote --token "$DEMO/replay.jwt" --node "$NODE"
expect_refusal hearth job quote --token "$DEMO/replay.jwt" --node "$NODE"
else
envelope "$DEMO/bad.yaml" demo-job-2 2.50 "$BAD_INPUT"
numbered "A batch with a line too long for the model's context: refused at quote time, naming the line"
echo "   (the node counts every prompt with the model's own tokenizer and chat template; nothing runs)"
expect_refusal hearth job quote "$DEMO/bad.yaml" --key "$DEMO/requester.key" --node "$NODE"
fi

step "USDC balances before the round"
usdc_balances "$DEMO/devnet.json" | tee "$DEMO/balances.before"

if [[ "$KIND" == transcode ]]; then BASIS="the input probed with ffprobe"; ENGINE=ffmpeg; else BASIS="every prompt token counted"; ENGINE="vLLM, CPU build"; fi
numbered "Quote within max_price: priced on $BASIS, with the escrow terms to fund"
show hearth job quote "$DEMO/job.yaml" --key "$DEMO/requester.key" --node "$NODE" --save-quote "$DEMO/quote.jwt"
step "   ... accepted with gasless funding: the payer signs an EIP-3009 authorization, the node sends it"
show hearth job submit "$DEMO/job.yaml" --key "$DEMO/requester.key" --wallet "$PAYER_KEY" --node "$NODE" --quote "$DEMO/quote.jwt" --wait
REQUESTER_DID=$(hearth keys show "$DEMO/requester.key" --json | python -c 'import json,sys; print(json.load(sys.stdin)["did"])')
JOB=$(python -c 'import sys; from core.envelope import node_job_id; print(node_job_id(sys.argv[1], "demo-job-1"))' "$REQUESTER_DID")

numbered "The funded job runs in a hardened container ($ENGINE): its events, live, until it completes"
show hearth job events "$JOB" --node "$NODE" --follow

numbered "The signed result: artifact CID, checks, provenance"
hearth job result "$JOB" --node "$NODE" --json >"$DEMO/result.json"
python - "$DEMO/result.json" "$NODE" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))["result"]
if result["status"] != "completed" or not result["checks"]["passed"]:
    sys.exit(f"the job did not complete cleanly: {json.dumps(result, indent=2)}")
print(f"artifact    {result['artifact_uri']}  ({result['artifact_size']} bytes, sha256 {result['artifact_sha256'][:16]}...)")
print("checks      " + ", ".join(f"{c['name']} {'ok' if c['passed'] else 'FAILED'}" for c in result["checks"]["checks"]))
if "usage" in result:
    u = result["usage"]
    print(f"tokens      {u['prompt_tokens']} prompt + {u['completion_tokens']} completion, {result['requests']} requests")
print(f"cost        {result['cost']} {result['currency']} (runtime {result['runtime_seconds']} s)")
print(f"image       {result['provenance']['image_digest']}")
print(f"gateway URL {sys.argv[2]}/ipfs/{result['artifact_cid']}")
open(sys.argv[1] + ".cid", "w").write(result["artifact_cid"])
PY
CID=$(cat "$DEMO/result.json.cid")

numbered "Fetch the artifact as a CAR from the gateway and verify it with an independent IPFS client"
printf '\033[2m$ GET %s  (Accept: application/vnd.ipld.car) > artifact.car\033[0m\n' "$NODE/ipfs/$CID"
python -c 'import sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={"Accept": "application/vnd.ipld.car"})); open(sys.argv[2], "wb").write(r.read())' "$NODE/ipfs/$CID" "$DEMO/artifact.car"
show node_modules/.bin/ipfs-car roots "$DEMO/artifact.car"
ARTIFACT="$DEMO/artifact.$([[ "$KIND" == transcode ]] && echo mp4 || echo jsonl)"
show node_modules/.bin/ipfs-car unpack "$DEMO/artifact.car" --output "$ARTIFACT"
python - "$ARTIFACT" "$DEMO/result.json" <<'PY'
import hashlib, json, sys
got = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
want = json.load(open(sys.argv[2]))["result"]["artifact_sha256"]
if got != want:
    sys.exit(f"sha256 mismatch: {got} != {want}")
print(f"verified: ipfs-car unpacked {sys.argv[1]} from the CAR, every block checked; sha256 matches the signed result")
PY

if [[ "$KIND" == transcode ]]; then
numbered "Independent validation: the validator fetches the artifact by CID, re-runs the checks with its own"
echo "   ffprobe, signs the EIP-712 receipt (and a W3C credential of it) and posts it; the node sends release"
else
numbered "Independent validation: the validator fetches the requests and the answers by CID, checks that each"
echo "   is answered once within its max_tokens and that the tokens charged are the answers' sum, signs the"
echo "   EIP-712 receipt (and a W3C credential of it) and posts it; the node sends release"
fi
show hearth validate "$JOB" --key "$VALIDATOR_KEY" --node "$NODE" --vc
python - "$NODE" "$JOB" <<'PY'
import json, sys, time, urllib.request
for _ in range(600):
    job = json.load(urllib.request.urlopen(f"{sys.argv[1]}/v1/jobs/{sys.argv[2]}"))["job"]
    if job["state"] in ("settled", "refunded"):
        break
    time.sleep(0.1)
else:
    sys.exit(f"the job did not settle: {job['state']}")
print(f"job {job['id']} is {job['state']}")
PY
show hearth job status "$JOB" --node "$NODE"

step "USDC balances after the round"
usdc_balances "$DEMO/devnet.json" | tee "$DEMO/balances.after"
python - "$NODE" "$JOB" <<'PY'
import json, sys, urllib.request
job = json.load(urllib.request.urlopen(f"{sys.argv[1]}/v1/jobs/{sys.argv[2]}"))["job"]
pay = job["payment"]
print(f"paid {int(pay['settlement']['receipt']['amount']) / 1e6:.6f} USDC of a {int(pay['terms']['amount']) / 1e6:.6f} USDC quote; the rest went back to the payer")
for tx in pay["txs"]:
    print(f"  {tx['purpose']:8} {tx['hash']}  block {tx['block_number']}  {tx['state']}  gas {tx['gas_used']} (paid by the node)")
if job["state"] != "settled":
    sys.exit("the job was not settled")
PY

if [[ "$KIND" == inference ]]; then
numbered "The same batch on a warm engine (tiny-llama-warm): twice, each job quoted, funded and run as before"
echo "   (the first batch starts the model's engine, vLLM's OpenAI server in a hardened container of its own on"
echo "   a unix socket, then streams its requests there; the second finds the engine running: answers only)"
for i in 1 2; do
  envelope "$DEMO/warm-$i.yaml" "demo-warm-$i" 2.50 "$WARM_INPUT" tiny-llama-warm
  show hearth job submit "$DEMO/warm-$i.yaml" --key "$DEMO/requester.key" --wallet "$PAYER_KEY" --node "$NODE" --wait
  WJOB=$(python -c 'import sys; from core.envelope import node_job_id; print(node_job_id(sys.argv[1], sys.argv[2]))' "$REQUESTER_DID" "demo-warm-$i")
  show hearth job events "$WJOB" --node "$NODE" --follow
  hearth job result "$WJOB" --node "$NODE" --json >"$DEMO/warm-$i.json"
  hearth job events "$WJOB" --node "$NODE" --json >"$DEMO/warm-$i.events.json"
done
hearth job events "$JOB" --node "$NODE" --json >"$DEMO/result.events.json"
python - "$DEMO" <<'PY'
import json, sys
demo = sys.argv[1]
def times(name):
    result = json.load(open(f"{demo}/{name}.json"))["result"]
    if result["status"] != "completed" or not result["checks"]["passed"]:
        sys.exit(f"{name} did not complete cleanly: {json.dumps(result, indent=2)}")
    at = {}  # each state's first entry (a retried attempt runs again)
    for raw in open(f"{demo}/{name}.events.json"):
        event = json.loads(raw)
        if event["type"] == "transition":
            at.setdefault(event["to"], event["at"])
    return float(result["runtime_seconds"]), at["completed"] - at["running"], result
rows = [("cold batch   tiny-llama", "result", "vLLM started for this job: load + answers"),
        ("warm batch 1 tiny-llama-warm", "warm-1", "the engine's start + answers"),
        ("warm batch 2 tiny-llama-warm", "warm-2", "answers only: the engine was running, no load")]
for label, name, what in rows:
    runtime, running, result = times(name)
    print(f"{label:29} running -> completed {running:7.2f} s  (runtime_seconds {runtime:6.2f}; {what})")
billed = ", ".join(f"{u['prompt_tokens']} + {u['completion_tokens']}" for u in (times(n)[2]["usage"] for n in ("result", "warm-1", "warm-2")))
print(f"tokens billed (prompt + completion), cold, warm 1, warm 2: {billed}; charged alike, by the tokens")
PY
fi

step "Demo complete"
echo "node log: $DEMO/node.log"
