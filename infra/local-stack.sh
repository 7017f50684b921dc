#!/usr/bin/env bash
# Airflow 3 (api-server, scheduler, dag-processor, triggerer: what `airflow standalone` runs, started
# one by one so that nothing listens beyond 127.0.0.1) and an MLflow server, on localhost, the
# sparse_to_dense DAG loaded. Trigger the tiny workflow from the browser.
#
#   make stack                      # or: infra/local-stack.sh (VENV, AIRFLOW_PORT, MLFLOW_PORT, AIRFLOW_HOME)
#
# Runs from a plain shell (nothing needed on PATH). Fails with the log tail when a component does not
# come up. Ctrl-C (or TERM) stops every process it started, task processes included.
# One MLflow store with `make demo`: the server serves MLFLOW_BACKEND_STORE_URI (default
# sqlite:///<repo>/mlflow.db, the file `make demo` writes) with artifacts in <repo>/mlruns.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$(cd "${VENV:-.venv}" && pwd)
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-240}
export PATH="$VENV/bin:$PATH"
export AIRFLOW_HOME=${AIRFLOW_HOME:-$REPO/.airflow}
export AIRFLOW__CORE__DAGS_FOLDER=${AIRFLOW__CORE__DAGS_FOLDER:-$REPO/dags} AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$AIRFLOW_PORT/execution/
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$AIRFLOW_PORT
export AIRFLOW__API__BASE_URL=http://127.0.0.1:$AIRFLOW_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$REPO/mlflow.db}
export S2D_ARTIFACT_ROOT=${S2D_ARTIFACT_ROOT:-$REPO/runs} S2D_WORKDIR=${S2D_WORKDIR:-$REPO}
LOGS=$AIRFLOW_HOME/stack-logs
mkdir -p "$AIRFLOW_HOME" "$LOGS" "${MLFLOW_ARTIFACTS:-$REPO/mlruns}"
PASSWORDS=$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated

pids=()
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
stop() {
  trap - EXIT INT TERM
  local all=() p
  for p in "${pids[@]}"; do all+=("$p" $(descendants "$p")); done
  [ ${#all[@]} -eq 0 ] && exit "${1:-0}"
  echo "stopping ${#all[@]} processes..." >&2
  # the scheduler's executor workers ignore TERM: TERM every process group and process, then KILL
  for p in "${pids[@]}"; do kill -TERM -- -"$p" 2>/dev/null || true; done
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "${all[@]}" 2>/dev/null || break; sleep 0.5; done
  for p in "${pids[@]}"; do kill -KILL -- -"$p" 2>/dev/null || true; done
  kill -KILL "${all[@]}" 2>/dev/null || true
  exit "${1:-0}"
}
trap 'stop 0' INT TERM
trap 'stop $?' EXIT
fail() {
  echo "error: $1" >&2
  for f in "$LOGS"/*.log; do echo "--- tail of $f" >&2; tail -n 30 "$f" >&2; done
  stop 1
}
start() {  # start NAME CMD...: its own process group (setsid), output in $LOGS/NAME.log
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 &
  pids+=($!)
}
wait_up() {  # wait_up NAME URL
  local deadline=$((SECONDS + STARTUP_TIMEOUT)) p
  until curl -sf -o /dev/null "$2"; do
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "a component exited before $1 came up"; done
    [ $SECONDS -lt $deadline ] || fail "$1 did not answer at $2 within ${STARTUP_TIMEOUT}s"
    sleep 1
  done
}

t0=$SECONDS
"$VENV/bin/airflow" db migrate >"$LOGS/db-migrate.log" 2>&1 || fail "airflow db migrate failed"
"$VENV/bin/airflow" pools set gpu 1 "GPU slots: one stage at a time per GPU" >/dev/null 2>&1 || fail "airflow pools set failed"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --default-artifact-root "${MLFLOW_ARTIFACTS:-$REPO/mlruns}" --no-serve-artifacts --workers 1
start api-server "$VENV/bin/airflow" api-server --host 127.0.0.1 --port "$AIRFLOW_PORT" --workers 1
# task logs are files on this host, read by the api-server: no log servers (they would listen on all interfaces)
start scheduler "$VENV/bin/airflow" scheduler --skip-serve-logs
start dag-processor "$VENV/bin/airflow" dag-processor
start triggerer "$VENV/bin/airflow" triggerer --skip-serve-logs
wait_up MLflow "http://127.0.0.1:$MLFLOW_PORT/health"
wait_up Airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health"
for _ in $(seq 60); do [ -s "$PASSWORDS" ] && break; sleep 1; done
echo "healthy after $((SECONDS - t0)) s" >"$LOGS/ready"
cat <<TXT
Airflow: http://127.0.0.1:$AIRFLOW_PORT   log in as admin, password: $("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("admin", "?"))' "$PASSWORDS" 2>/dev/null || echo "see $PASSWORDS")
         (users: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS; passwords: $PASSWORDS)
         DAG sparse_to_dense -> Trigger -> the form (preset tiny runs on this CPU)
MLflow:  http://127.0.0.1:$MLFLOW_PORT   (store $MLFLOW_BACKEND_STORE_URI, the same as make demo's)
Artifacts: $S2D_ARTIFACT_ROOT/sparse_to_dense/<run_id>/
Logs: $LOGS/.   Up in $((SECONDS - t0)) s.   Ctrl-C stops everything.
TXT
# stay in the foreground; a component that dies takes the stack down with its log tail
while true; do
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "a component stopped"; done
  sleep 2
done
