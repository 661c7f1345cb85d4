#!/usr/bin/env bash
# Hearth agent demo (`hearth demo --agent`): the autonomous round. Two nodes with different prices on one
# devnet list themselves in the on-chain registry; a validator service (`hearth validator run`) runs with the
# devnet's validator key. The owner (the devnet's requester wallet, which holds TestUSDC) opens a spending
# grant for a fresh agent key that never holds money. A scripted MCP client (scripts/demo_agent_client.py,
# the SDK's stdio client, no LLM) launches `hearth mcp` on the agent's requester home and works through the
# tools: providers, upload, quotes, a paid transcode routed to the cheapest node, validated by the service
# with no manual step and released, the same idempotency key again (no second spend), more jobs until the
# grant's per-day cap refuses one, and the budget. USDC balances before and after, every transaction hash
# and each job's time from submit to settled are printed. Everything lives in .demo-agent/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
source scripts/demo_common.sh
DEMO="$PWD/.demo-agent"
rm -rf "$DEMO"; mkdir -p "$DEMO"
START=$SECONDS

NAMES=(alpha beta)
PRICES=(0.20 0.30)  # USDC per transcode (minimum_per_job, rates at zero): alpha is the cheaper
PER_JOB=0.25        # the grant: the most one job may cost (beta's price is over it),
PER_DAY=0.45        # and all jobs of one day: two of alpha's jobs fit, the third is refused
BATCH="${HEARTH_DEMO_AGENT_BATCH:-1}"  # 1: the second job is a vllm_batch on a tiny Llama (vLLM CPU, ~1 min)
declare -A PORT PID URL
for name in "${NAMES[@]}"; do PORT[$name]=$(free_port); URL[$name]="http://127.0.0.1:${PORT[$name]}"; PID[$name]=""; done
CHAIN_PORT="${HEARTH_DEMO_CHAIN_PORT:-$(free_port)}"
VALIDATOR_PORT=$(free_port); VALIDATOR_URL="http://127.0.0.1:$VALIDATOR_PORT"; VALIDATOR_PID=""
FIRST="$DEMO/alpha"
cleanup() {
  for pid in "${PID[@]}" "$VALIDATOR_PID"; do
    if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  done
  hearth devnet --home "$FIRST" --stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "Two nodes on one devnet, each with its own identity, wallet and price"
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}; home="$DEMO/$name"
  hearth init --home "$home" --port "${PORT[$name]}" --name "$name" >/dev/null
  if [[ $name == alpha ]]; then
    hearth devnet --home "$home" --port "$CHAIN_PORT" --detach --json >"$DEMO/devnet.json"
  else
    hearth devnet --home "$home" --join "$FIRST" --detach --json >"$DEMO/devnet-$name.json"
  fi
  toml_set "$home" pricing cpu_second '"0"'
  toml_set "$home" pricing output_mb '"0"'
  toml_set "$home" pricing minimum_per_job "\"${PRICES[$i]}\""
  toml_set "$home" pricing.surge max_factor 1.0  # a flat price on this small machine, whatever the load
  toml_set "$home" market endpoint "\"${URL[$name]}\""
  toml_set "$home" webhooks allow_private_addresses true  # the validator service listens on 127.0.0.1
  echo "  $name  ${URL[$name]}  ${PRICES[$i]} USDC a job"
done
if [[ "$BATCH" == 1 ]]; then
  step "A model for alpha's catalog: a tiny Llama built here (random weights, no download), hashed and registered"
  python -m provider.testmodel "$DEMO/models/tiny-llama" >/dev/null
  show hearth models add "$DEMO/models/tiny-llama" --name tiny-llama --input-1k-tokens 0.05 --output-1k-tokens 0.2 --home "$FIRST"
fi
cp "$DEMO/devnet.json" "$DEMO/devnet-alpha.json"
read -r RPC REGISTRY ESCROW CHAIN_ID OWNER OWNER_KEY VALIDATOR VALIDATOR_KEY < <(python - "$DEMO/devnet.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); a = d["accounts"]
print(d["rpc_url"], d["registry"], d["escrow"], d["chain_id"], a["requester"]["address"],
      a["requester"]["key_file"], a["validator"]["did"], a["validator"]["key_file"])
PY
)
echo "  devnet $RPC; registry $REGISTRY; escrow $ESCROW"

step "Start the nodes: each lists itself in the registry from its wallet"
for name in "${NAMES[@]}"; do
  hearth run --home "$DEMO/$name" >"$DEMO/$name.log" 2>&1 &
  PID[$name]=$!
done
for name in "${NAMES[@]}"; do wait_url "${URL[$name]}/readyz"; done
python - "$RPC" "$REGISTRY" "${#NAMES[@]}" <<'PY'
import asyncio, sys
from web3 import AsyncWeb3
from payments.registry_chain import RegistryChain
async def main() -> None:
    registry = RegistryChain(AsyncWeb3(AsyncWeb3.AsyncHTTPProvider(sys.argv[1])), sys.argv[2], rpc_url=sys.argv[1])
    for _ in range(300):
        block, listings = await registry.listings()
        if len(listings) >= int(sys.argv[3]):
            break
        await asyncio.sleep(0.1)
    else:
        sys.exit(f"the nodes did not register: {listings}")
    for listing in listings:
        print(f"  registered  wallet {listing.wallet}  {listing.endpoint}  {listing.did[:32]}...")
asyncio.run(main())
PY

step "The validator service, with the devnet's validator key: nodes notify it, it validates and signs receipts"
hearth validator run --home "$DEMO/validator" --key "$VALIDATOR_KEY" --port "$VALIDATOR_PORT" \
  --allow-private-addresses >"$DEMO/validator.log" 2>&1 &
VALIDATOR_PID=$!
wait_url "$VALIDATOR_URL/healthz"
echo "  $VALIDATOR  $VALIDATOR_URL"

step "A fresh agent key (Ethereum): it signs requests and spends from a grant; it never holds USDC or gas"
mkdir -p "$DEMO/agent/requester"
hearth keys new --type eth --chain-id "$CHAIN_ID" --out "$DEMO/agent/requester/agent.key" >/dev/null
AGENT=$(hearth keys show "$DEMO/agent/requester/agent.key" --json | python -c 'import json,sys; print(json.load(sys.stdin)["address"])')
echo "  agent $AGENT"

balances() {  # USDC of the owner, the agent, each node's wallet and the escrow
  python - "$DEMO" "$AGENT" "${NAMES[@]}" <<'PY'
import json, sys
from web3 import Web3
from payments.escrow_build import load_artifact
demo, agent, names = sys.argv[1], sys.argv[2], sys.argv[3:]
d = json.load(open(f"{demo}/devnet.json"))
w3 = Web3(Web3.HTTPProvider(d["rpc_url"]))
token = w3.eth.contract(address=d["token"], abi=load_artifact("TestUSDC").abi)
rows = [("owner (requester)", d["accounts"]["requester"]["address"]), ("agent", agent)]
rows += [(f"node {n}", json.load(open(f"{demo}/devnet-{n}.json"))["accounts"]["node"]["address"]) for n in names]
rows.append(("escrow", d["escrow"]))
for name, address in rows:
    address = Web3.to_checksum_address(address)
    print(f"  {name:18} {address}  {token.functions.balanceOf(address).call() / 1e6:>12.6f} USDC")
PY
}

step "USDC balances before the round"
balances | tee "$DEMO/balances.before"

step "The owner opens a spending grant for the agent: $PER_JOB USDC a job, $PER_DAY USDC a day, for 1 day"
printf '\033[2m$ %s\033[0m\n' "hearth grant open --home $FIRST --owner-key $OWNER_KEY --agent $AGENT --per-job $PER_JOB --per-period $PER_DAY --period 1d --expires 1d"
hearth grant open --home "$FIRST" --owner-key "$OWNER_KEY" --agent "$AGENT" --per-job "$PER_JOB" \
  --per-period "$PER_DAY" --period 1d --expires 1d --json >"$DEMO/grant.json" || { cat "$DEMO/grant.json"; exit 1; }
GRANT=$(python - "$DEMO/grant.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for tx in r["txs"]:
    print(f"  tx {tx['purpose']:20} {tx['hash']}  block {tx['block_number']}  gas {tx['gas_used']}", file=sys.stderr)
print(r["grant"]["grant"])
PY
)
show hearth grant show "$GRANT" --home "$FIRST"

step "The agent's requester home: its key, the grant, the registry, the chain, a local per-day budget"
cat >"$DEMO/agent/requester/requester.toml" <<TOML
[budgets]
per_day = "1.00"            # USDC per UTC day, counted here; the grant's cap on chain is the tighter one

[agent]
key_file = "agent.key"
grant = $GRANT
registry = "$REGISTRY"
rpc_url = "$RPC"
allow_private_endpoints = true   # the demo's nodes listen on 127.0.0.1
TOML
python - "$FIRST" "$DEMO/agent" <<'PY'
import sys
from pathlib import Path
from core.config import load_config
from payments import devnet
chain = load_config(Path(sys.argv[1])).chain
assert chain is not None
devnet.set_chain_config(Path(sys.argv[2]), chain)  # node.toml's [chain]: the devnet's RPC, escrow, token
PY
sed 's/^/  /' "$DEMO/agent/requester/requester.toml"

step "A 10 s 720p test clip for the agent to transcode"
python -c 'import sys; from sandbox.ffmpeg import make_test_clip; make_test_clip(__import__("pathlib").Path(sys.argv[1]), seconds=10, width=1280, height=720, fps=30)' "$DEMO/clip.mp4"

BATCH_ARGS=()
if [[ "$BATCH" == 1 ]]; then
  python - "$DEMO/batch.jsonl" <<'PY'
import json, sys
prompts = ["hello world", "Summarise this paragraph in one sentence, please.", "The quick brown fox", "Name three primes."]
open(sys.argv[1], "w").write("".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": p}], "max_tokens": 16}}) + "\n"
    for i, p in enumerate(prompts, 1)))
PY
  echo "  and an OpenAI batch of $(wc -l <"$DEMO/batch.jsonl") chat completions for tiny-llama"
  BATCH_ARGS=(--batch "$DEMO/batch.jsonl" --model tiny-llama)
fi

step "The agent: an MCP client (no LLM) launches \`hearth mcp --home $DEMO/agent\` and works through the tools"
python scripts/demo_agent_client.py --home "$DEMO/agent" --clip "$DEMO/clip.mp4" \
  --validator-url "$VALIDATOR_URL/v1/validations" --validator "$VALIDATOR" --owner "$OWNER" --escrow "$ESCROW" \
  --chain-id "$CHAIN_ID" --out "$DEMO/jobs.json" "${BATCH_ARGS[@]}"

step "USDC balances after the round"
balances | tee "$DEMO/balances.after"

step "Each job: its node, the time from submit to settled, what was paid, every transaction hash"
python - "$DEMO/jobs.json" "$DEMO/grant.json" "$DEMO/agent" "$RPC" <<'PY'
import json, sys, urllib.request
from web3 import Web3
jobs = json.load(open(sys.argv[1]))
grant = json.load(open(sys.argv[2]))
for tx in grant["txs"]:
    print(f"  grant    {tx['purpose']:8} {tx['hash']}  block {tx['block_number']}  gas {tx['gas_used']} (paid by the owner)")
paid = 0
for j in jobs:
    job = json.load(urllib.request.urlopen(f"{j['endpoint']}/v1/jobs/{j['job']}"))["job"]
    pay = job["payment"]
    amount = int(pay["settlement"]["receipt"]["amount"])
    paid += amount
    print(f"  {job['id']} ({j['kind']}) at {j['endpoint']}: {job['state']} {j['seconds']:.1f} s after submit_job;"
          f" paid {amount / 1e6:.6f} USDC of a {int(pay['terms']['amount']) / 1e6:.6f} USDC quote")
    for tx in pay["txs"]:
        print(f"    {tx['purpose']:8} {tx['hash']}  block {tx['block_number']}  {tx['state']}  gas {tx['gas_used']} (paid by the node)")
    if job["state"] != "settled":
        sys.exit(f"job {job['id']} was not settled")
print(f"  {len(jobs)} jobs settled, {paid / 1e6:.6f} USDC paid to the nodes, from the owner's grant")
PY
AGENT_NONCE=$(python -c 'import sys; from web3 import Web3; print(Web3(Web3.HTTPProvider(sys.argv[1])).eth.get_transaction_count(Web3.to_checksum_address(sys.argv[2])))' "$RPC" "$AGENT")
echo "  the agent sent $AGENT_NONCE transactions (it signs, the nodes and the owner send)"
show hearth grant show "$GRANT" --home "$FIRST"

step "Demo complete in $((SECONDS - START)) s"
echo "logs: $DEMO/*.log"
