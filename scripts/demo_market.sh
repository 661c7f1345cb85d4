#!/usr/bin/env bash
# Hearth market demo (`hearth demo --market`): three nodes with different prices on one devnet list
# themselves in the on-chain registry (HearthRegistry) at start; a fourth wallet, a squatter, registers the
# first node's DID and endpoint. A requester reads the registry, fetches every node's signed offer, checks
# the binding both ways (the squatter is dropped), asks every node for a quote at once and routes a paid
# transcode to the cheapest; the job is validated and released. The cheapest node is then stopped and the
# next job goes to the next best. At the end, each provider's reputation is read from the escrow's events.
# Everything lives in .demo-market/; the nodes and the devnet stop at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
source scripts/demo_common.sh
DEMO="$PWD/.demo-market"
rm -rf "$DEMO"; mkdir -p "$DEMO"

NAMES=(alpha beta gamma)
PRICES=(0.01 0.02 0.04)  # USDC per CPU-second: alpha is the cheapest, gamma the dearest
declare -A PORT PID URL
for name in "${NAMES[@]}"; do PORT[$name]=$(free_port); URL[$name]="http://127.0.0.1:${PORT[$name]}"; PID[$name]=""; done
CHAIN_PORT="${HEARTH_DEMO_CHAIN_PORT:-$(free_port)}"
FIRST="$DEMO/alpha"
cleanup() {
  for name in "${NAMES[@]}"; do
    if [[ -n "${PID[$name]}" ]]; then kill "${PID[$name]}" 2>/dev/null || true; wait "${PID[$name]}" 2>/dev/null || true; fi
  done
  hearth devnet --home "$FIRST" --stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "Three nodes on one devnet, each with its own identity, wallet and price"
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}; home="$DEMO/$name"
  hearth init --home "$home" --port "${PORT[$name]}" --name "$name" >/dev/null
  if [[ $name == alpha ]]; then
    hearth devnet --home "$home" --port "$CHAIN_PORT" --detach --json >"$DEMO/devnet.json"
  else
    hearth devnet --home "$home" --join "$FIRST" --detach --json >/dev/null
  fi
  toml_set "$home" pricing cpu_second "\"${PRICES[$i]}\""
  toml_set "$home" market endpoint "\"${URL[$name]}\""
  echo "  $name  ${URL[$name]}  cpu_second ${PRICES[$i]} USDC  did $(hearth keys show "$home/node.key" --json | python -c 'import json,sys; print(json.load(sys.stdin)["did"])')"
done
read -r RPC REGISTRY ESCROW PAYER VALIDATOR PAYER_KEY VALIDATOR_KEY < <(python - "$DEMO/devnet.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); a = d["accounts"]
print(d["rpc_url"], d["registry"], d["escrow"], a["requester"]["address"], a["validator"]["did"],
      a["requester"]["key_file"], a["validator"]["key_file"])
PY
)
echo "  devnet $RPC; registry $REGISTRY; escrow $ESCROW"
MARKET=(--registry "$REGISTRY" --rpc "$RPC" --home "$DEMO/requester")
LOCAL=(--allow-private-endpoints)  # the demo's nodes listen on 127.0.0.1

step "Start the nodes: each lists itself in the registry from its wallet ([market] endpoint), through its transaction outbox"
for name in "${NAMES[@]}"; do
  hearth run --home "$DEMO/$name" >"$DEMO/$name.log" 2>&1 &
  PID[$name]=$!
done
for name in "${NAMES[@]}"; do wait_url "${URL[$name]}/readyz"; done
python - "$RPC" "$REGISTRY" <<'PY'
import asyncio, sys, time
from web3 import AsyncWeb3
from payments.registry_chain import RegistryChain
async def main() -> None:
    registry = RegistryChain(AsyncWeb3(AsyncWeb3.AsyncHTTPProvider(sys.argv[1])), sys.argv[2], rpc_url=sys.argv[1])
    for _ in range(300):
        block, listings = await registry.listings()
        if len(listings) >= 3:
            break
        await asyncio.sleep(0.1)
    else:
        sys.exit(f"the nodes did not register: {listings}")
    for listing in listings:
        print(f"  registered  wallet {listing.wallet}  {listing.endpoint}  {listing.did[:32]}...")
asyncio.run(main())
PY

step "A squatter: a fourth wallet registers alpha's DID and endpoint as its own"
python - "$DEMO/devnet.json" "$DEMO/alpha" <<'PY'
import json, sys
from pathlib import Path
from web3 import Web3
from payments.escrow_build import load_artifact
from eth_account import Account
from payments.keys import load_key, new_eth
d = json.load(open(sys.argv[1]))
home = Path(sys.argv[2])
w3 = Web3(Web3.HTTPProvider(d["rpc_url"]))
squatter = new_eth(d["chain_id"])
w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": squatter.address, "value": 10**18})
registry = w3.eth.contract(address=d["registry"], abi=load_artifact("HearthRegistry").abi)
did = load_key(home / "node.key").did
endpoint = open(home / "node.toml").read().split('endpoint = "')[1].split('"')[0]
call = registry.functions.register(did, endpoint).build_transaction(
    {"from": squatter.address, "nonce": w3.eth.get_transaction_count(squatter.address), "chainId": d["chain_id"]})
raw = Account.sign_transaction(call, squatter.private_key_bytes()).raw_transaction
receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw))
print(f"  squatter {squatter.address} registered {did[:32]}... at {endpoint} (block {receipt['blockNumber']})")
PY

step "The market as a requester sees it: signed offers fetched at once, binding checked both ways"
show hearth market providers "${MARKET[@]}" "${LOCAL[@]}" --escrow "$ESCROW" --kind ffmpeg_transcode

step "A requester identity, and a 10 s 720p test clip placed on every node (a CID is the same everywhere)"
hearth keys new --out "$DEMO/requester.key" >/dev/null
python -c 'import sys; from sandbox.ffmpeg import make_test_clip; make_test_clip(__import__("pathlib").Path(sys.argv[1]), seconds=10, width=1280, height=720, fps=30)' "$DEMO/clip.mp4"
for name in "${NAMES[@]}"; do
  INPUT=$(hearth blob put "$DEMO/clip.mp4" --node "${URL[$name]}" --json | python -c 'import json,sys; print(json.load(sys.stdin)["cid"])')
done
echo "  input $INPUT"

wait_job() {  # wait_job NODE JOB SECONDS STATE...: until the job is in one of the states; print it
  python - "$@" <<'PY'
import json, sys, time, urllib.request
node, job_id, seconds, states = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
deadline = time.monotonic() + seconds
while True:
    job = json.load(urllib.request.urlopen(f"{node}/v1/jobs/{job_id}"))["job"]
    if job["state"] in states:
        break
    if time.monotonic() > deadline:
        sys.exit(f"job {job_id} is {job['state']} after {seconds:.0f} s, not {' or '.join(states)}")
    time.sleep(0.1)
receipt = (job.get("payment") or {}).get("settlement", {}).get("receipt")
paid = f": paid {int(receipt['amount']) / 1e6:.6f} USDC" if job["state"] == "settled" and receipt else ""
print(f"  job {job['id']} {job['state']}{paid}")
PY
}

route_and_settle() {  # route_and_settle JOB_ID: route through the market, then validate and settle
  paid_transcode "$DEMO/$1.yaml" "$1"
  show hearth job submit "$DEMO/$1.yaml" --market --strategy cheapest --key "$DEMO/requester.key" \
    --wallet "$PAYER_KEY" --wait "${MARKET[@]}" "${LOCAL[@]}"
  REQUESTER_DID=$(hearth keys show "$DEMO/requester.key" --json | python -c 'import json,sys; print(json.load(sys.stdin)["did"])')
  JOB=$(python -c 'import sys; from core.envelope import node_job_id; print(node_job_id(sys.argv[1], sys.argv[2]))' "$REQUESTER_DID" "$1")
  NODE=""  # the node that accepted the job; exactly one may (the others only priced it)
  for name in "${NAMES[@]}"; do
    [[ -n "${PID[$name]}" ]] || continue
    state=$(curl -sf "${URL[$name]}/v1/jobs/$JOB" | python -c 'import json,sys; print(json.load(sys.stdin)["job"]["state"])' || true)
    echo "  $name: ${state:-no such job}"
    if [[ -n "$state" && "$state" != priced && "$state" != expired ]]; then
      [[ -z "$NODE" ]] || { echo "job $JOB was accepted by two nodes" >&2; exit 1; }
      NODE="${URL[$name]}"
    fi
  done
  [[ -n "$NODE" ]] || { echo "no node accepted job $JOB" >&2; exit 1; }
  echo "  routed to $NODE: job $JOB"
  wait_job "$NODE" "$JOB" 120 completed failed
  show hearth validate "$JOB" --key "$VALIDATOR_KEY" --node "$NODE"
  wait_job "$NODE" "$JOB" 60 settled refunded
}

step "Job 1, routed through the market: every candidate with its ask, the cheapest wins"
route_and_settle market-job-1

step "alpha (the cheapest) goes down; job 2 is routed again"
kill "${PID[alpha]}"; wait "${PID[alpha]}" 2>/dev/null || true; PID[alpha]=""
route_and_settle market-job-2

step "Reputation, read from the escrow's events (never self-reported)"
python -c 'import sys; from web3 import Web3; w3 = Web3(Web3.HTTPProvider(sys.argv[1])); w3.provider.make_request("anvil_mine", [4])' "$RPC"
show hearth market reputation "${MARKET[@]}" --escrow "$ESCROW"

step "Demo complete"
echo "node logs: $DEMO/*.log"
