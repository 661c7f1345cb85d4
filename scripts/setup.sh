#!/usr/bin/env bash
# Installs what Hearth needs on a Debian machine (root), idempotently: system packages, the Python
# virtual environment with Hearth and its dev tools (the versions requirements.lock pins), and the npm
# packages the interop tests use.
# Each step is skipped when its inputs have not changed (stamps in .stamps/).
set -euo pipefail
cd "$(dirname "$0")/.."
STAMPS=.stamps
mkdir -p "$STAMPS"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v gcc >/dev/null || need_apt+=(build-essential python3-dev)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
command -v sqlite3 >/dev/null || need_apt+=(sqlite3)
command -v ffprobe >/dev/null || need_apt+=(ffmpeg)  # host ffmpeg: test clips; ffprobe reads our own outputs
command -v openssl >/dev/null || need_apt+=(openssl)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)  # verifies and scores systemd/hearth.service
command -v useradd >/dev/null || need_apt+=(passwd)  # install-service creates the hearth user
command -v chromium >/dev/null || need_apt+=(chromium)  # headless: the dashboard test screenshots /ui
if ((${#need_apt[@]})); then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Hearth needs Python 3.11+, found {sys.version.split()[0]}")
PY

# The venv holds exactly requirements.lock (`make lock` writes it from pyproject.toml; pip checks its
# hashes), then hearth itself, editable, with no dependency of its own choosing.
py_stamp="$STAMPS/venv.$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -x .venv/bin/python || ! -f "$py_stamp" ]]; then
  log "python venv (.venv) from requirements.lock, with hearth (editable)"
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q -e . --no-deps
  mapfile -t extra < <(.venv/bin/python scripts/venv_lock.py extras)
  if ((${#extra[@]})); then
    log "pip uninstall ${extra[*]} (not in requirements.lock)"
    .venv/bin/pip uninstall -q -y "${extra[@]}"
  fi
  .venv/bin/python scripts/venv_lock.py check  # a lock older than pyproject.toml stops here
  .venv/bin/pip check >/dev/null || { .venv/bin/pip check; exit 1; }
  rm -f "$STAMPS"/venv.*; touch "$py_stamp"
fi

npm_stamp="$STAMPS/npm.$(cat package.json package-lock.json | sha256sum | cut -c1-16)"
if [[ ! -d node_modules || ! -f "$npm_stamp" ]]; then
  log "npm packages (interop tools)"
  # `npm install` from the lock file, not `npm ci`: npm leaves other platforms' optional packages (anvil's
  # per-OS binaries) out of the lock, and `npm ci` then refuses it as out of sync. --no-save keeps the lock.
  npm install --no-save --no-audit --no-fund --loglevel=error
  rm -f "$STAMPS"/npm.*; touch "$npm_stamp"
fi
scripts/docker.sh  # the Docker engine and the sandbox images (the README's Execution)
log "ready"
