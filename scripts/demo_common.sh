# What the demo scripts share (sourced by scripts/demo.sh, demo_market.sh, demo_agent.sh and demo_cluster.sh,
# run from the repository root with the venv on PATH): output steps, free ports, node.toml edits, waiting for
# a URL, the USDC balances of a round and the paid transcode envelope the rounds submit.

step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

toml_set() {  # toml_set HOME TABLE KEY VALUE: one key of node.toml (VALUE a TOML literal; TABLE may be dotted)
  python - "$1/node.toml" "$2" "$3" "$4" <<'PY'
import sys, tomlkit
from core.config import parse_config
path, table, key, value = sys.argv[1:]
doc = tomlkit.parse(open(path).read())
at = doc
for part in table.split("."):
    at = at.setdefault(part, tomlkit.table())
at[key] = tomlkit.parse(f"v = {value}")["v"]
parse_config(doc.unwrap(), source=path)  # refuse to write an invalid file
open(path, "w").write(tomlkit.dumps(doc))
PY
}

wait_url() {  # wait_url URL: until it answers (20 s at most)
  python - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(400):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1); break
    except OSError: time.sleep(0.05)
else: sys.exit(f"{sys.argv[1]} did not answer")
PY
}

usdc_balances() {  # usdc_balances DEVNET_JSON: USDC of the payer, the provider (node wallet) and the escrow
  python - "$1" <<'PY'
import json, sys
from web3 import Web3
from payments.escrow_build import load_artifact
d = json.load(open(sys.argv[1]))
w3 = Web3(Web3.HTTPProvider(d["rpc_url"]))
token = w3.eth.contract(address=d["token"], abi=load_artifact("TestUSDC").abi)
for name, address in (("payer (requester)", d["accounts"]["requester"]["address"]),
                      ("provider (node)", d["accounts"]["node"]["address"]), ("escrow", d["escrow"])):
    print(f"  {name:18} {address}  {token.functions.balanceOf(address).call() / 1e6:>12.6f} USDC")
PY
}

paid_transcode() {  # paid_transcode FILE JOB_ID [MAX_PRICE]: an 8 s 480p cut of $INPUT, paid from $PAYER through $ESCROW
  cat >"$1" <<YAML
job_id: $2
kind: ffmpeg_transcode
input_uri: $INPUT
output_spec: {format: mp4, resolution: 480p, codec: h264, audio_codec: aac, clip: {start_seconds: 1, duration_seconds: 8}}
limits: {timeout_seconds: 600, max_output_mb: 200, cpus: 1, memory_mb: 1024, gpus: 0}
validation: {min_duration_seconds: 7.5, max_duration_seconds: 8.5, required_streams: [video, audio]}
payment:
  max_price: "${3:-2.50}"
  currency: usdc
  chain_id: 31337
  escrow: "$ESCROW"
  payer: "$PAYER"
  validator: $VALIDATOR
YAML
}
