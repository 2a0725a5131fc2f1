# Source me: the environment for single-node runs (../shared/PLATFORM.md). Never use
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 on a real multi-node cluster.
LACY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LACY_ROOT
export PATH="$LACY_ROOT/.venv/bin:$PATH"   # the jobs' `python` resolves through the PATH of `ray start`
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# Serve's HTTP proxy gets 60 s, not 5, to pass its first readiness check on loaded cores (services.runtime.RAY_ENV_DEFAULTS).
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-60}
# A request whose Serve replica dies gets 503 + Retry-After or a stream's error event (lacy.serve.proxy).
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=${RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH:-lacy.serve.proxy:middlewares}
export LACY_CACHE=${LACY_CACHE:-$HOME/.cache/lacy}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$LACY_CACHE/torch_extensions}
export MLFLOW_PORT=${MLFLOW_PORT:-5000}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://127.0.0.1:$MLFLOW_PORT}
export RAY_DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
