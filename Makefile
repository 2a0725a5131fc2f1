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

.PHONY: setup llama-server browser run test lint bench clean

setup: $(STAMP) llama-server

# torch first and pinned, so nothing pulls the CUDA build; DeepSpeed as pure Python.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`), the big model's real server in
# tests/test_openai_big.py: llama-cpp-python is a source package, built once (≈7.5 min on 2 cores) into a wheel
# cached under $(LACY_CACHE)/wheels, so a second setup (or a fresh venv) installs it in seconds. Portable
# (GGML_NATIVE=OFF): a native build can trap with an invalid opcode on another CPU of the pool.
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(LACY_CACHE)/wheels
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

llama-server: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source (once; ≈7.5 min on 2 cores)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip wheel -q --no-deps -w $(WHEELS) \
	    llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(PY) -m pip install -q --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $@

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
