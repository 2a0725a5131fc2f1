#!/usr/bin/env bash
# Submit a stage to the running cluster (outputs land under this checkout's runs/, as with a local run):  cluster/submit.sh STAGE CONFIG [--a.b value ...]
#   STAGE: a `lacy` command: score | train | experiment | sweep (their Ray versions) | calibrate
#   e.g. cluster/submit.sh score configs/tiny.yaml
set -euo pipefail
source "$(dirname "$0")/env.sh"
STAGE=$1; CONFIG=$2; shift 2
RAY_FLAG=--ray; [ "$STAGE" = calibrate ] && RAY_FLAG=  # calibrate has no Ray version: it runs in the job's driver
cd "$LACY_ROOT"
exec ray job submit --address "$RAY_DASHBOARD" --working-dir . \
  --runtime-env-json "{\"excludes\": [\".venv\", \"runs\", \".git\"], \"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\", \"LACY_SHARED\": \"$(cd "$LACY_ROOT/.." && pwd)/shared\", \"LACY_RUN_ROOT\": \"$LACY_ROOT\"}}" \
  -- lacy "$STAGE" $RAY_FLAG --config "$CONFIG" "$@"
