#!/usr/bin/env bash
# Hearth demo on embedded defaults: start a node, upload a generated test clip, then, with the CLI, show a
# quote accepted, a quote refused for a low max_price (with the node's ask), a tampered request refused,
# a replay refused, and the transcode running in its sandbox with live progress; finally the artifact's
# CID, its checks and its gateway URL, fetched and verified with an independent IPFS client (ipfs-car).
# Everything lives in .demo/ and the node stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
DEMO="$PWD/.demo"
rm -rf "$DEMO"; mkdir -p "$DEMO"
PORT="${HEARTH_DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
NODE="http://127.0.0.1:$PORT"
step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
expect_refusal() {  # the command must fail with exit 1 (the node refused); show its structured error
  printf '\033[2m$ %s\033[0m\n' "$*"
  set +e; "$@"; rc=$?; set -e
  if [[ $rc -ne 1 ]]; then echo "expected a refusal (exit 1), got exit $rc" >&2; exit 1; fi
}

step "Start a node on embedded defaults"
show hearth init --home "$DEMO/node" --port "$PORT"
hearth run --home "$DEMO/node" >"$DEMO/node.log" 2>&1 &
NODE_PID=$!
trap 'kill $NODE_PID 2>/dev/null || true; wait $NODE_PID 2>/dev/null || true' EXIT
python - "$NODE" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=1); break
    except OSError: time.sleep(0.05)
else: sys.exit("node did not become ready; see .demo/node.log")
PY
echo "node ready at $NODE"

step "A requester identity (did:key, Ed25519)"
show hearth keys new --out "$DEMO/requester.key"

step "A 10 s 720p test clip, uploaded to the node: its CID is the job's input"
python -c 'import sys; from sandbox.ffmpeg import make_test_clip; make_test_clip(__import__("pathlib").Path(sys.argv[1]), seconds=10, width=1280, height=720, fps=30)' "$DEMO/clip.mp4"
show hearth blob put "$DEMO/clip.mp4" --node "$NODE"
INPUT=$(hearth blob put "$DEMO/clip.mp4" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')

envelope() {  # envelope FILE JOB_ID MAX_PRICE
  cat >"$1" <<YAML
job_id: $2
kind: ffmpeg_transcode
input_uri: $INPUT
output_spec: {format: mp4, resolution: 480p, codec: h264, audio_codec: aac, clip: {start_seconds: 1, duration_seconds: 8}}
limits: {timeout_seconds: 600, max_output_mb: 200, cpus: 1, memory_mb: 1024, gpus: 0}
validation: {min_duration_seconds: 7.5, max_duration_seconds: 8.5, required_streams: [video, audio]}
payment:
  max_price: "$3"
  currency: usdc
  chain_id: 31337
  escrow: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  payer: "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
  validator: did:pkh:eip155:31337:0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC
YAML
}
envelope "$DEMO/job.yaml" demo-clip-1 2.50
envelope "$DEMO/cheap.yaml" demo-clip-2 0.000001
envelope "$DEMO/other.yaml" demo-clip-3 2.50
envelope "$DEMO/replay.yaml" demo-clip-4 2.50

step "1. Quote within max_price: the node probes the input (ffprobe, sandboxed) and signs a quote"
show hearth job quote "$DEMO/job.yaml" --key "$DEMO/requester.key" --node "$NODE" --save-quote "$DEMO/quote.jwt"
step "   ... and the requester accepts it"
show hearth job submit "$DEMO/job.yaml" --key "$DEMO/requester.key" --node "$NODE" --quote "$DEMO/quote.jwt"

step "2. max_price below the node's ask: refused, with the ask"
expect_refusal hearth job quote "$DEMO/cheap.yaml" --key "$DEMO/requester.key" --node "$NODE"

step "3. A tampered request (max_price raised after signing): refused"
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

step "4. The same signed request sent twice: the replay is refused"
hearth job sign "$DEMO/replay.yaml" --key "$DEMO/requester.key" --node "$NODE" >"$DEMO/replay.jwt"
show hearth job quote --token "$DEMO/replay.jwt" --node "$NODE"
expect_refusal hearth job quote --token "$DEMO/replay.jwt" --node "$NODE"

JOB=$(hearth job submit "$DEMO/job.yaml" --key "$DEMO/requester.key" --node "$NODE" --json | python -c 'import json,sys; print(json.load(sys.stdin)["job"]["id"])')
step "5. The accepted job runs in a hardened container: its events, live, until it completes"
show hearth job events "$JOB" --node "$NODE" --follow
show hearth job status "$JOB" --node "$NODE"

step "6. The signed result: artifact CID, checks, provenance"
hearth job result "$JOB" --node "$NODE" --json >"$DEMO/result.json"
python - "$DEMO/result.json" "$NODE" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))["result"]
if result["status"] != "completed" or not result["checks"]["passed"]:
    sys.exit(f"the job did not complete cleanly: {json.dumps(result, indent=2)}")
print(f"artifact    {result['artifact_uri']}  ({result['artifact_size']} bytes, sha256 {result['artifact_sha256'][:16]}...)")
print("checks      " + ", ".join(f"{c['name']} {'ok' if c['passed'] else 'FAILED'}" for c in result["checks"]["checks"]))
print(f"cost        {result['cost']} {result['currency']} (runtime {result['runtime_seconds']} s)")
print(f"image       {result['provenance']['image_digest']}")
print(f"gateway URL {sys.argv[2]}/ipfs/{result['artifact_cid']}")
open(sys.argv[1] + ".cid", "w").write(result["artifact_cid"])
PY
CID=$(cat "$DEMO/result.json.cid")

step "7. Fetch the artifact as a CAR from the gateway and verify it with an independent IPFS client"
printf '\033[2m$ GET %s  (Accept: application/vnd.ipld.car) > artifact.car\033[0m\n' "$NODE/ipfs/$CID"
python -c 'import sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={"Accept": "application/vnd.ipld.car"})); open(sys.argv[2], "wb").write(r.read())' "$NODE/ipfs/$CID" "$DEMO/artifact.car"
show node_modules/.bin/ipfs-car roots "$DEMO/artifact.car"
show node_modules/.bin/ipfs-car unpack "$DEMO/artifact.car" --output "$DEMO/artifact.mp4"
python - "$DEMO/artifact.mp4" "$DEMO/result.json" <<'PY'
import hashlib, json, sys
got = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
want = json.load(open(sys.argv[2]))["result"]["artifact_sha256"]
if got != want:
    sys.exit(f"sha256 mismatch: {got} != {want}")
print(f"verified: ipfs-car unpacked {sys.argv[1]} from the CAR, every block checked; sha256 matches the signed result")
PY

step "Demo complete"
echo "node log: $DEMO/node.log"
