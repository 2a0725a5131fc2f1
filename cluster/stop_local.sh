#!/usr/bin/env bash
# Stop the local Ray cluster and the MLflow server started by start_local.sh.
source "$(dirname "$0")/env.sh"
ray stop --force || true
pkill -f "mlflow server --backend-store-uri sqlite:///$LACY_ROOT/runs/mlflow" || true
