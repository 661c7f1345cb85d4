# Hearth. `make demo` runs the main job end to end on embedded defaults; `make test` runs every check.
# Both install what they need first (scripts/setup.sh, idempotent).
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup lock images demo test lint typecheck unit bench chaos gpu-check clean

setup:
	@scripts/setup.sh

# requirements.lock: every package `make setup` installs, pinned with hashes, from pyproject.toml's
# dependencies and its dev extra, for any platform and Python >= 3.11. Versions already in the lock are
# kept where they still fit; LOCK_ARGS passes options (e.g. --upgrade, --upgrade-package NAME).
LOCK_ARGS ?=
lock:
	@[[ -x .venv/bin/uv ]] || { [[ -x .venv/bin/python ]] || python3 -m venv .venv; .venv/bin/pip install -q uv; }
	.venv/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command 'make lock' --quiet -o requirements.lock $(LOCK_ARGS)

images:
	@scripts/docker.sh

demo: setup
	@scripts/demo.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports  # the floors of the house and private modules (pyproject.toml [tool.importlinter])

typecheck: setup
	.venv/bin/mypy
	.venv/bin/mypy bench  # scripts, not a package: checked as files, as strictly

unit: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench: setup
	$(PY) bench/admission.py; a=$$?; $(PY) bench/cid.py; c=$$?; $(PY) bench/transcode.py; t=$$?; \
	$(PY) bench/inference.py --repeat 3; i=$$?; $(PY) bench/market.py; m=$$?; $(PY) bench/ray_cluster.py; k=$$?; \
	exit $$((a || c || t || i || m || k))

# The fault scoreboard at its stated counts (README, "Fault scoreboard"); about 20 minutes. Prints the table
# and writes it as JSON; CHAOS_ARGS passes options (e.g. --only NAME, --short).
CHAOS_ARGS ?=
chaos: setup
	$(PY) -m tests.chaos --json bench/results/chaos.json $(CHAOS_ARGS)

# On a machine with an NVIDIA GPU, PyTorch and nvidia-ml-py (no Docker, vLLM or network needed): NVML
# discovery against nvidia-smi, the GPU self-test's kernels on each GPU, the health verdict and the GPUs a
# node would offer (scripts/gpu_check.py; a few minutes at most). Runs under the venv's Python where there
# is one, else python3; the kernels under whichever of the two has PyTorch. GPU_CHECK_ARGS passes options
# (e.g. --json, --home DIR, --kernel-python PATH).
GPU_CHECK_ARGS ?=
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	timeout 600 $(GPU_CHECK_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf .stamps .demo .demo-market .demo-agent .demo-cluster .mypy_cache .ruff_cache .pytest_cache
