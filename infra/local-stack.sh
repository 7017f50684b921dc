#!/usr/bin/env bash
# Airflow 3 (standalone: api-server, scheduler, dag-processor, triggerer on SQLite) and an MLflow
# server on localhost, the sparse_to_dense DAG loaded. Trigger the tiny workflow from the browser.
# Run through `make stack` (it prepares the venv and AIRFLOW_HOME). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$PWD/.airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/dags AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__API__PORT=$AIRFLOW_PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$AIRFLOW_PORT/execution/
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export S2D_ARTIFACT_ROOT=${S2D_ARTIFACT_ROOT:-$PWD/runs} S2D_WORKDIR=$PWD
mkdir -p "$AIRFLOW_HOME"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --backend-store-uri "sqlite:///$PWD/mlflow-server.db" --artifacts-destination "$PWD/mlartifacts" --workers 1 \
  >"$AIRFLOW_HOME/mlflow.log" 2>&1 &
pids+=($!)
setsid "$VENV/bin/airflow" standalone >"$AIRFLOW_HOME/standalone.log" 2>&1 &
pids+=($!)

for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" >/dev/null 2>&1 && break
  sleep 1
done
"$VENV/bin/airflow" pools set gpu 1 "GPU slots" >/dev/null
cat <<TXT
Airflow: http://127.0.0.1:$AIRFLOW_PORT  (user admin, password in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)
         DAG sparse_to_dense -> Trigger -> the form (preset tiny runs on this CPU)
MLflow:  http://127.0.0.1:$MLFLOW_PORT  (experiment sparse-to-dense-tiny)
Artifacts: $S2D_ARTIFACT_ROOT/sparse_to_dense/<run_id>/
Logs: $AIRFLOW_HOME/standalone.log, $AIRFLOW_HOME/mlflow.log.  Ctrl-C stops both.
TXT
wait
