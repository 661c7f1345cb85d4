# What the demo scripts share (sourced by scripts/demo.sh, demo_market.sh and demo_agent.sh, run from the
# repository root with the venv on PATH): output steps, free ports, node.toml edits, waiting for a URL.

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
