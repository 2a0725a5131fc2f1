#!/usr/bin/env bash
# Start the MLflow tracking server (SQLite store, proxied artifacts) on 127.0.0.1:$MLFLOW_PORT and
# wait until it answers /health. Open $MLFLOW_TRACKING_URI in a browser for the UI.
set -euo pipefail
source "$(dirname "$0")/env.sh"
STORE="$LACY_ROOT/runs/mlflow"
mkdir -p "$STORE"
if curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null; then echo "MLflow already up at $MLFLOW_TRACKING_URI"; exit 0; fi
nohup mlflow server --backend-store-uri "sqlite:///$STORE/mlflow.db" \
  --artifacts-destination "$STORE/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  > "$STORE/server.log" 2>&1 &
for _ in $(seq 60); do
  curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null && { echo "MLflow UI: $MLFLOW_TRACKING_URI"; exit 0; }
  sleep 1
done
echo "MLflow server did not start; see $STORE/server.log" >&2; exit 1
