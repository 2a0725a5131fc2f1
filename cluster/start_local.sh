#!/usr/bin/env bash
# Start a one-machine Ray cluster (head only) and the MLflow server, both on 127.0.0.1.
#   cluster/start_local.sh [NUM_CPUS]      then: cluster/submit.sh experiment configs/default.yaml
set -euo pipefail
source "$(dirname "$0")/env.sh"
NUM_CPUS=${1:-$(nproc)}
"$LACY_ROOT/cluster/mlflow_server.sh"
ray start --head --num-cpus="$NUM_CPUS" --dashboard-host=127.0.0.1 --include-dashboard=true \
  --object-store-memory=$((1024 * 1024 * 1024)) --disable-usage-stats
echo "Ray dashboard: $RAY_DASHBOARD   MLflow UI: $MLFLOW_TRACKING_URI"
