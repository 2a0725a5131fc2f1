# Two commands on a fresh machine: `make run` (set up + the main job: the synthetic benchmark, whose data the
# project generates), `make test`. Wikipedia: `make run CONFIG=configs/default.yaml`.
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/synthbio-quick.yaml
PYTEST_ARGS ?=

# Single-node environment from ../shared/PLATFORM.md (never set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER on a
# real multi-node cluster).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export LACY_CACHE ?= $(HOME)/.cache/lacy
export TORCH_EXTENSIONS_DIR ?= $(LACY_CACHE)/torch_extensions

.PHONY: setup browser run test lint bench clean

setup: $(STAMP)

# torch first and pinned, so nothing pulls the CUDA build; DeepSpeed as pure Python.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: setup
	$(PY) -m jobs.experiment --config $(CONFIG) --publish docs/results

# Debian's Chromium for the HTML-view test (skipped, with a reason, where it cannot be installed).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

lint: setup
	$(PY) -m ruff check .

test: setup browser
	$(PY) -m ruff check .
	$(abspath $(VENV))/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

# The speed benchmarks against this machine's limits (bench/README.md); each refuses a busy machine.
bench: setup
	$(PY) -m bench.limits
	$(PY) -m bench.pretrain
	$(PY) -m bench.score

clean:
	rm -rf runs .pytest_cache
