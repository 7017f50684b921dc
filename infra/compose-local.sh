#!/usr/bin/env bash
# infra/compose.yaml, for real, on a machine that cannot pull images: podman-compose with the stand-ins
# of infra/compose.local.yaml, a throwaway .env with random secrets, and checks of what each service
# is for.
#
#   infra/compose-local.sh up       # build the images, start the stack in dependency order, wait for health
#   infra/compose-local.sh check    # Postgres + mlflow DB, bucket, MLflow run -> artifact in S3, Airflow API,
#                                   # pool gpu, DAG sparse_to_dense parsed without import errors
#   infra/compose-local.sh dag-run  # trigger sparse_to_dense (tiny preset, the tests' small sizes) through the
#                                   # REST API; the scheduler starts each stage as a container of S2D_IMAGE
#                                   # through the socket service; waits, checks manifests and MLflow runs
#   infra/compose-local.sh down     # remove containers, volumes, network, the .env, the socket service
#
# podman 4.3 (Debian 12) cannot wait for `service_healthy` (podman-compose ignores it before podman 4.6)
# and, without systemd, never runs healthchecks on its own: this script starts the services in the
# order compose.yaml's depends_on gives and runs each service's own healthcheck (`podman healthcheck
# run`) until it passes. Settings (environment): PODMAN_COMPOSE (default: podman-compose on PATH, else
# .venv/bin/podman-compose), S2D_COMPOSE_PROJECT (s2d-local), S2D_COMPOSE_STATE (the .env and the
# socket's folder), HEALTH_TIMEOUT (seconds per service, 300).
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=${S2D_COMPOSE_PROJECT:-s2d-local}
STATE=${S2D_COMPOSE_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse-to-dense/$PROJECT}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
PC=${PODMAN_COMPOSE:-$(command -v podman-compose || echo .venv/bin/podman-compose)}
ENV_FILE=$STATE/.env
AIRFLOW_IMAGE=${S2D_AIRFLOW_IMAGE:-ghcr.io/sparse-to-dense/airflow:3.3.2-0.1.0}  # tags as in build-images.sh
MLFLOW_IMAGE=${S2D_MLFLOW_IMAGE:-ghcr.io/sparse-to-dense/mlflow:3.17.2}
STAGE_IMAGE=${S2D_IMAGE:-ghcr.io/sparse-to-dense/stages:0.1.0-cpu}  # what the DAG's tasks run
log() { echo "compose-local: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
# runc (crun fails in some sandboxes), behind a wrapper that fits podman's default rlimits to this
# host's (infra/runc-host-limits); S2D_OCI_RUNTIME=runc where podman's defaults apply
RUNTIME=${S2D_OCI_RUNTIME:-$PWD/infra/runc-host-limits}
podman() { command podman --runtime "$RUNTIME" "$@"; }
compose() {
  "$PC" -p "$PROJECT" --in-pod false --podman-args "--runtime $RUNTIME" \
    -f infra/compose.yaml -f infra/compose.local.yaml --env-file "$ENV_FILE" "$@"
}
ctr() {  # the container of a service
  podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}
env_get() { sed -n "s/^$1=//p" "$ENV_FILE"; }

wait_healthy() {  # service...: its compose healthcheck passes
  local s c t
  for s in "$@"; do
    c=$(ctr "$s"); [[ -n $c ]] || die "service $s has no container"
    t=$SECONDS
    until podman healthcheck run "$c" >/dev/null 2>&1; do
      if (( SECONDS - t > HEALTH_TIMEOUT )) || [[ $(podman inspect -f '{{.State.Status}}' "$c") == exited ]]; then
        podman logs --tail 40 "$c" >&2 || true
        die "service $s is not healthy after $((SECONDS - t)) s (logs above)"
      fi
      sleep 3
    done
    log "$s healthy ($((SECONDS - t)) s)"
  done
}

wait_done() {  # one-shot service...: it exited with status 0
  local s c t state
  for s in "$@"; do
    c=$(ctr "$s"); t=$SECONDS
    while state=$(podman inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c"); [[ $state != exited* ]]; do
      (( SECONDS - t > HEALTH_TIMEOUT )) && die "one-shot $s still running after $HEALTH_TIMEOUT s"
      sleep 3
    done
    if [[ $state != "exited 0" ]]; then podman logs --tail 40 "$c" >&2; die "one-shot $s failed: $state"; fi
    log "$s done ($((SECONDS - t)) s)"
  done
}

write_env() {  # random secrets, free ports; the network name is the project's so stacks do not collide
  mkdir -p "$STATE"; chmod 700 "$STATE"
  python3 - "$ENV_FILE" "$STATE/podman.sock" "$PROJECT" "$AIRFLOW_IMAGE" "$MLFLOW_IMAGE" "$STAGE_IMAGE" <<'PY'
import base64, os, secrets, socket, sys
path, sock, project, airflow_image, mlflow_image, stage_image = sys.argv[1:]
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
tok = lambda: secrets.token_urlsafe(24)
env = {
    "AIRFLOW_IMAGE": airflow_image, "MLFLOW_IMAGE": mlflow_image,
    "S2D_IMAGE": stage_image, "S2D_GPUS_PER_TASK": "0", "GPU_POOL_SLOTS": "1",
    "S2D_DOCKER_SOCKET": sock, "DOCKER_GID": "0", "S2D_DOCKER_NETWORK": f"{project}-net",
    "AIRFLOW_ADMIN_USER": "admin", "AIRFLOW_ADMIN_PASSWORD": tok(), "AIRFLOW_DB_PASSWORD": tok(),
    "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
    "AIRFLOW_API_SECRET_KEY": tok(), "AIRFLOW_JWT_SECRET": tok(), "AIRFLOW_PORT": port(),
    "MINIO_ROOT_USER": "s2d-root", "MINIO_ROOT_PASSWORD": tok(), "MINIO_CONSOLE_PORT": port(), "S2D_BUCKET": "s2d",
    "S2D_STAGE_ACCESS_KEY": "s2d-stage", "S2D_STAGE_SECRET_KEY": tok(),
    "MLFLOW_S3_ACCESS_KEY": "s2d-mlflow", "MLFLOW_S3_SECRET_KEY": tok(),
    "MLFLOW_DB_PASSWORD": tok(), "MLFLOW_PORT": port(),
    # where the docker runner writes credential files (same path on the host and in the scheduler)
    "S2D_SECRETS_HOST_DIR": f"/tmp/{project}-secrets",
    # the check run below names its MLflow experiment: a tracking key, allowed only where the deployment says
    "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",
}
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    f.writelines(f"{k}={v}\n" for k, v in env.items())
PY
}

up() {
  command -v "$PC" >/dev/null || die "podman-compose not found (pip install podman-compose==1.6.0, or PODMAN_COMPOSE=...)"
  # every image from its Dockerfile, each time: unchanged inputs are a layer-cache hit (seconds), and
  # the stage image and the DAG baked into the Airflow image never fall behind the checkout
  log "building images (layer cache: fast when nothing changed)"
  S2D_IMAGE=$STAGE_IMAGE S2D_AIRFLOW_IMAGE=$AIRFLOW_IMAGE S2D_MLFLOW_IMAGE=$MLFLOW_IMAGE \
    infra/build-images.sh stages-cpu mlflow airflow postgres s3 >/dev/null
  [[ -s $ENV_FILE ]] || write_env
  # the Docker API the scheduler's DockerOperator talks to (compose.yaml mounts the host's docker.sock)
  if ! [[ -S $STATE/podman.sock ]] || ! kill -0 "$(cat "$STATE/podman.pid" 2>/dev/null)" 2>/dev/null; then
    rm -f "$STATE/podman.sock"
    setsid podman --runtime "$RUNTIME" system service --time=0 "unix://$STATE/podman.sock" >"$STATE/podman-service.log" 2>&1 &
    echo $! > "$STATE/podman.pid"
    for _ in $(seq 50); do [[ -S $STATE/podman.sock ]] && break; sleep 0.2; done
    # as Docker's socket (root:docker 0660): group DOCKER_GID (0 here, the airflow user's group) may use it
    chmod 660 "$STATE/podman.sock"
  fi
  # the credential-file folder: the scheduler (uid 50000, gid 0) writes, the engine bind-mounts from it
  install -d -m 0770 -g 0 "$(env_get S2D_SECRETS_HOST_DIR)"
  local t=$SECONDS
  compose up -d --no-build postgres minio
  wait_healthy postgres minio
  compose up -d --no-build --no-deps minio-init airflow-init
  wait_done minio-init airflow-init
  compose up -d --no-build --no-deps mlflow airflow-apiserver airflow-dag-processor airflow-triggerer
  wait_healthy mlflow airflow-apiserver
  compose up -d --no-build --no-deps airflow-scheduler
  wait_healthy airflow-scheduler airflow-dag-processor airflow-triggerer
  log "up in $((SECONDS - t)) s: MLflow http://127.0.0.1:$(env_get MLFLOW_PORT), Airflow http://127.0.0.1:$(env_get AIRFLOW_PORT) (admin / see $ENV_FILE)"
}

check() {
  [[ -s $ENV_FILE ]] || die "no stack: run '$0 up' first"
  local pg mlflow sched dagp n=0 out
  pg=$(ctr postgres); mlflow=$(ctr mlflow); sched=$(ctr airflow-scheduler); dagp=$(ctr airflow-dag-processor)
  ok() { n=$((n + 1)); echo "ok $n - $*"; }

  # the init script ran: the mlflow user logs in to its database over the network with its password
  podman exec -e PGPASSWORD="$(env_get MLFLOW_DB_PASSWORD)" "$pg" \
    psql -h 127.0.0.1 -U mlflow -d mlflow -tAc 'select current_user, current_database()' | grep -qx 'mlflow|mlflow' \
    || die "postgres: user mlflow cannot reach database mlflow"
  ok "postgres: user mlflow logs in to database mlflow (infra/postgres/10-mlflow-db.sh ran)"

  curl -fsS "http://127.0.0.1:$(env_get MLFLOW_PORT)/health" | grep -q OK || die "mlflow: /health"
  ok "mlflow: /health answers on the published port"

  # a run through the tracking server; its artifact must land in the S3 service (proxied, --serve-artifacts)
  out=$(podman exec -e GIT_PYTHON_REFRESH=quiet "$mlflow" python -c '
import os, boto3, mlflow
mlflow.set_tracking_uri("http://localhost:5000")
mlflow.set_experiment("compose-local-check")
with mlflow.start_run() as run:
    mlflow.log_param("check", "compose-local")
    mlflow.log_text("hello from compose-local", "check/hello.txt")
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="'"$(env_get S2D_BUCKET)"'", Prefix="mlflow/").get("Contents", [])]
hit = [k for k in keys if run.info.run_id in k and k.endswith("check/hello.txt")]
assert hit, f"artifact of run {run.info.run_id} not in the bucket: {keys}"
body = s3.get_object(Bucket="'"$(env_get S2D_BUCKET)"'", Key=hit[0])["Body"].read().decode()
assert body == "hello from compose-local", body
print("stored:", hit[0])' | sed -n 's/^stored: //p') || die "mlflow: artifact not stored in S3"
  ok "mlflow: run's artifact stored in the bucket: s3://$(env_get S2D_BUCKET)/$out"

  [[ -n $sched ]] || { echo "# no Airflow containers: Airflow checks skipped"; return; }
  out=$(curl -fsS "http://127.0.0.1:$(env_get AIRFLOW_PORT)/api/v2/version") || die "airflow: /api/v2/version"
  ok "airflow: api-server answers /api/v2/version: $out"

  podman exec "$sched" airflow pools list --output plain | grep -qw gpu || die "airflow: no pool gpu"
  ok "airflow: pool gpu exists (airflow-init ran)"

  # the dag-processor parses dags/ on its own schedule: wait for the DAG to reach the database
  local t=$SECONDS
  until podman exec "$dagp" airflow dags list --output plain 2>/dev/null | grep -qw sparse_to_dense; do
    (( SECONDS - t > HEALTH_TIMEOUT )) && die "airflow: DAG sparse_to_dense not parsed after $HEALTH_TIMEOUT s"
    sleep 5
  done
  out=$(podman exec "$dagp" airflow dags list-import-errors --output plain 2>/dev/null)
  grep -qx 'No data found' <<<"$out" || die "airflow: import errors: $out"
  ok "airflow: DAG sparse_to_dense parsed, no import errors"

  # the REST API with the admin user airflow-init created (FAB auth manager: token, then a call)
  out=$(python3 - "$(env_get AIRFLOW_PORT)" "$(env_get AIRFLOW_ADMIN_USER)" "$(env_get AIRFLOW_ADMIN_PASSWORD)" <<'PY'
import json, sys, urllib.request
port, user, pw = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
req = urllib.request.Request(f"{base}/auth/token", json.dumps({"username": user, "password": pw}).encode(),
                             {"Content-Type": "application/json"})
token = json.load(urllib.request.urlopen(req, timeout=30))["access_token"]
req = urllib.request.Request(f"{base}/api/v2/dags/sparse_to_dense", headers={"Authorization": f"Bearer {token}"})
dag = json.load(urllib.request.urlopen(req, timeout=30))
print(dag["dag_id"], "paused" if dag["is_paused"] else "active")
PY
) || die "airflow: REST API with the admin user"
  ok "airflow: admin logs in through the REST API, GET /api/v2/dags/sparse_to_dense: $out"
}

dag_run() {
  [[ -s $ENV_FILE ]] || die "no stack: run '$0 up' first"
  local root out
  root="s3://$(env_get S2D_BUCKET)/runs/compose-local-$(date -u +%Y%m%dT%H%M%S)"
  out=$(python3 - "$(env_get AIRFLOW_PORT)" "$(env_get AIRFLOW_ADMIN_USER)" "$(env_get AIRFLOW_ADMIN_PASSWORD)" "$root" \
        "${DAG_TIMEOUT:-1800}" <<'PY'
import json, sys, time, urllib.request
port, user, pw, root, timeout = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
def call(method, path, body=None, token=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    return json.load(urllib.request.urlopen(urllib.request.Request(base + path, data, headers, method=method), timeout=60))
token = call("POST", "/auth/token", {"username": user, "password": pw})["access_token"]
# the test suite's small sizes (tests/conftest.py TEST_OVERRIDES), tracking on: lineage goes to the mlflow service
sizes = ["task.sizes={bootstrap: 2000, teacher_rl: 200, prompts: 400, student_rl: 200, eval: 40}",
         "models.teacher.arch={hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 128}",
         "models.student.arch={hidden_size: 32, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 64}",
         "bootstrap.teacher_steps=4", "bootstrap.student_steps=4", "bootstrap.batch_size=16",
         "teacher_rl.steps=4", "teacher_rl.prompts_per_step=4", "teacher_rl.group_size=4",
         "kl_warmup.steps=3", "kl_warmup.prompts_per_step=8", "kl_warmup.c2_every=2",
         "onpolicy_distill.steps=3", "onpolicy_distill.prompts_per_step=8",
         "student_rl.steps=2", "student_rl.prompts_per_step=4", "student_rl.group_size=4",
         "direct_grpo.prompts_per_step=4", "direct_grpo.group_size=4",
         "eval.problems=8", "eval.samples=2", "eval.c2_prompts=8", "checkpoint_every=2",
         f"tracking.experiment={root.rsplit('/', 1)[1]}"]
conf = {"preset": "tiny", "artifact_root": root, "overrides": sizes}
run = call("POST", "/api/v2/dags/sparse_to_dense/dagRuns", {"logical_date": None, "conf": conf}, token)
path, t = f"/api/v2/dags/sparse_to_dense/dagRuns/{run['dag_run_id']}", time.time()
while (run := call("GET", path, token=token))["state"] not in ("success", "failed"):
    if time.time() - t > float(timeout):
        break
    time.sleep(10)
    token = call("POST", "/auth/token", {"username": user, "password": pw})["access_token"]  # tokens expire
for ti in call("GET", f"{path}/taskInstances", token=token)["task_instances"]:
    print(f"#   {ti['task_id']}: {ti['state']} (try {ti['try_number']})", file=sys.stderr)
print(run["dag_run_id"], run["state"], run.get("duration") or round(time.time() - t))
PY
) || die "dag-run: REST API"
  log "dag run: $out"
  [[ $out == *" success "* ]] || die "dag-run: not successful (task states above; logs: podman exec $(ctr airflow-scheduler) ls /opt/airflow/logs)"
  # what the stages published: one manifest per stage in the bucket, one MLflow run per stage + the parent
  podman exec -e GIT_PYTHON_REFRESH=quiet "$(ctr mlflow)" python -c '
import os, sys, boto3
from mlflow import MlflowClient
root = sys.argv[1].removeprefix("s3://")
bucket, prefix = root.split("/", 1)
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/") for o in p.get("Contents", [])]
manifests = sorted(k[len(prefix) + 1:] for k in keys if k.endswith("/manifest.json"))
exp = MlflowClient("http://localhost:5000").get_experiment_by_name(prefix.rsplit("/", 1)[1])
runs = MlflowClient("http://localhost:5000").search_runs([exp.experiment_id]) if exp else []
print(f"{len(keys)} objects under {sys.argv[1]}, manifests: {manifests}; MLflow experiment {exp.name if exp else None}: {len(runs)} runs")
assert manifests and runs, "nothing published"' "$root"
}

down() {
  if [[ -s $ENV_FILE ]]; then
    compose down -v || true
    [[ -n $(env_get S2D_SECRETS_HOST_DIR) ]] && rm -rf "$(env_get S2D_SECRETS_HOST_DIR)"
  fi
  if [[ -s $STATE/podman.pid ]]; then kill "$(cat "$STATE/podman.pid")" 2>/dev/null || true; fi
  rm -rf "$STATE"
  log "down: containers, volumes, network and $STATE removed"
}

case ${1:-} in
  up) up ;;
  check) check ;;
  dag-run) dag_run ;;
  down) down ;;
  *) echo "error: usage: $0 up|check|dag-run|down" >&2; exit 2 ;;
esac
