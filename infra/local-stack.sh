#!/usr/bin/env bash
# Airflow 3 (api-server, scheduler, dag-processor, triggerer: what `airflow standalone` runs, started
# one by one so that nothing listens beyond 127.0.0.1) and an MLflow server, on localhost, the
# sparse_to_dense DAG loaded. Trigger the tiny workflow from the browser.
#
#   make stack                      # or: infra/local-stack.sh (VENV, AIRFLOW_PORT, MLFLOW_PORT, AIRFLOW_HOME)
#
# Runs from a plain shell (nothing needed on PATH). Fails with the log tail when a component does not
# come up. However it is stopped, it leaves no process and both ports free:
# - Ctrl-C, TERM, INT, HUP or QUIT to this script (closing its terminal sends HUP) stops every process
#   it started, task processes included: each carries S2D_STACK_TOKEN in its environment, so one that
#   left the tree (a new session, a re-parented worker) is found too;
# - under `make stack` (make forwards only TERM to its recipe, and waits for it on INT/HUP/QUIT) the
#   script watches make: a signal make caught, or make gone, stops the stack the same way. A make
#   started in the background of a non-interactive shell ignores INT (POSIX): send it TERM.
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
# the base folder of every run's root (the old name S2D_ARTIFACT_ROOT is taken over, without its warning)
export S2D_ARTIFACT_BASE=${S2D_ARTIFACT_BASE:-${S2D_ARTIFACT_ROOT:-$REPO/runs}} S2D_WORKDIR=${S2D_WORKDIR:-$REPO}
unset S2D_ARTIFACT_ROOT
LOGS=$AIRFLOW_HOME/stack-logs
mkdir -p "$AIRFLOW_HOME" "$LOGS" "${MLFLOW_ARTIFACTS:-$REPO/mlruns}"
PASSWORDS=$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated

pids=()
# every process this run starts inherits the token: stop() finds them all, wherever they moved
export S2D_STACK_TOKEN="s2d-stack-$$-$(date +%s%N)"
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
tokened() {  # live processes (not this one) whose environment holds our token (Linux /proc)
  grep -lzx "S2D_STACK_TOKEN=$S2D_STACK_TOKEN" /proc/[0-9]*/environ 2>/dev/null | sed 's|^/proc/||; s|/environ$||' | grep -vx "$$"
}
ours() {  # the components, their process trees and every tokened process
  local p
  { for p in "${pids[@]}"; do echo "$p"; descendants "$p"; done; tokened; } | sort -u
}
say() { echo "$@" >&2 2>/dev/null || true; }  # a closed terminal or pipe must not stop the cleanup
stop() {
  # nothing interrupts the cleanup: no second signal, no write to a closed terminal (EIO, SIGPIPE), no set -e
  trap '' INT TERM HUP QUIT PIPE
  trap - EXIT
  set +e
  local all p
  all=$(ours)
  [ -z "$all" ] && exit "${1:-0}"
  say "stopping $(echo "$all" | wc -l) processes..."
  # the scheduler's executor workers ignore TERM: TERM every process group and process, then KILL
  for p in "${pids[@]}"; do kill -TERM -- -"$p" 2>/dev/null; done
  kill -TERM $all 2>/dev/null
  for _ in $(seq 20); do
    all=$(ours)
    [ -z "$all" ] && break
    sleep 0.5
  done
  for _ in 1 2 3; do  # a process forked while we were stopping is caught on the next pass
    all=$(ours)
    [ -z "$all" ] && break
    for p in "${pids[@]}"; do kill -KILL -- -"$p" 2>/dev/null; done
    kill -KILL $all 2>/dev/null
    sleep 0.2
  done
  exit "${1:-0}"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP
trap 'stop 131' QUIT
trap 'stop $?' EXIT
pause() { sleep "$1" & wait $! || true; }  # a trapped signal is handled at once, not after the sleep

# make forwards TERM to its recipe, but on INT, HUP or QUIT (a kill of make alone, not of its process
# group) it only waits for the recipe. Make's handler resets the signal to its default: a fatal signal
# that make caught at our start and no longer catches means make was told to stop. So does make gone.
PARENT=$PPID PARENT_CAUGHT=
FATAL_MASK=$(( (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) ))  # HUP INT QUIT TERM (bit = signal - 1)
caught() { local m; m=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null) && [ -n "$m" ] && echo $(( 0x$m & FATAL_MASK )); }
case "$(cat "/proc/$PARENT/comm" 2>/dev/null)" in make|gmake) PARENT_CAUGHT=$(caught "$PARENT" || true) ;; esac
parent_stopped() {  # 0 when the make that started us was signalled or is gone
  [ -n "$PARENT_CAUGHT" ] || return 1
  local ppid
  ppid=$(awk '{print $4}' "/proc/$$/stat" 2>/dev/null) || return 1
  [ "$ppid" != "$PARENT" ] && return 0
  [ "$(caught "$PARENT" || echo "$PARENT_CAUGHT")" != "$PARENT_CAUGHT" ]
}
watch_parent() {  # a background watcher: TERM to this script when make is stopped
  [ -n "$PARENT_CAUGHT" ] || return 0
  local me=$$
  ( trap - INT TERM HUP QUIT EXIT
    while kill -0 "$me" 2>/dev/null; do
      if parent_stopped; then kill -TERM "$me"; exit 0; fi
      sleep 0.5
    done ) &
}
fail() {
  say "error: $1"
  for f in "$LOGS"/*.log; do say "--- tail of $f"; tail -n 30 "$f" >&2 2>/dev/null; done
  stop 1
}
run() {  # run CMD...: in the background and waited for, so that a signal is handled at once
  "$@" &
  wait $!
}
start() {  # start NAME CMD...: its own process group (setsid), output in $LOGS/NAME.log
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 &
  pids+=($!)
}
wait_up() {  # wait_up NAME URL
  local deadline=$((SECONDS + STARTUP_TIMEOUT)) p
  until curl -sf --max-time 5 -o /dev/null "$2"; do
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "a component exited before $1 came up"; done
    [ $SECONDS -lt $deadline ] || fail "$1 did not answer at $2 within ${STARTUP_TIMEOUT}s"
    pause 1
  done
}

t0=$SECONDS
watch_parent
run "$VENV/bin/airflow" db migrate >"$LOGS/db-migrate.log" 2>&1 || fail "airflow db migrate failed"
run "$VENV/bin/airflow" pools set gpu 1 "GPU slots: one stage at a time per GPU" >/dev/null 2>&1 || fail "airflow pools set failed"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --default-artifact-root "${MLFLOW_ARTIFACTS:-$REPO/mlruns}" --no-serve-artifacts --workers 1
start api-server "$VENV/bin/airflow" api-server --host 127.0.0.1 --port "$AIRFLOW_PORT" --workers 1
# task logs are files on this host, read by the api-server: no log servers (they would listen on all interfaces)
start scheduler "$VENV/bin/airflow" scheduler --skip-serve-logs
start dag-processor "$VENV/bin/airflow" dag-processor
start triggerer "$VENV/bin/airflow" triggerer --skip-serve-logs
wait_up MLflow "http://127.0.0.1:$MLFLOW_PORT/health"
wait_up Airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health"
for _ in $(seq 60); do [ -s "$PASSWORDS" ] && break; pause 1; done
echo "healthy after $((SECONDS - t0)) s" >"$LOGS/ready"
cat <<TXT
Airflow: http://127.0.0.1:$AIRFLOW_PORT   log in as admin, password: $("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("admin", "?"))' "$PASSWORDS" 2>/dev/null || echo "see $PASSWORDS")
         (users: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS; passwords: $PASSWORDS)
         DAG sparse_to_dense -> Trigger -> the form (preset tiny runs on this CPU)
MLflow:  http://127.0.0.1:$MLFLOW_PORT/#/experiments?workflowType=machine_learning
         (store $MLFLOW_BACKEND_STORE_URI, the same as make demo's; the sidebar's GenAI | Model training
         toggle: pick Model training once for the runs and the model registry)
Artifacts: $S2D_ARTIFACT_BASE/sparse_to_dense/<run_id>/
Logs: $LOGS/.   Up in $((SECONDS - t0)) s.   Ctrl-C (or TERM/HUP to this command) stops everything.
TXT
# stay in the foreground; a component that dies takes the stack down with its log tail
while true; do
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "a component stopped"; done
  pause 2
done
