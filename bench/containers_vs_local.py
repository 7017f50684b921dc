"""The docker runner against the local runner: the same DAG run (the tiny preset, every stage,
artifacts on a moto S3 server, tracking on an `mlflow server`) once with ``S2D_RUNNER=local`` and once
with ``S2D_RUNNER=docker`` (every task a container of the stage image, through podman's Docker API),
back to back in this one command, then where the extra time goes: a bare container start, and the
stage command's start-up (imports) inside the image and outside.

    python bench/containers_vs_local.py --out bench/results     # needs podman + runc; builds the image
    python bench/containers_vs_local.py --small                 # the tests' small config: start-up costs only

Writes ``containers_vs_local.{json,md}``. Wall times on a shared machine are noisy: compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import TEST_OVERRIDES, free_port, wait_http  # noqa: E402

BIN = Path(sys.executable).parent
RUNTIME = str(REPO / "infra/runc-host-limits")
IMAGE = "localhost/sparse-to-dense/stages:test-cpu"


def sh(cmd, env=None, timeout=1800, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd[:4]))} failed: {(out.stdout + out.stderr)[-3000:]}")
    return out


def timed(cmd, n=3, **kw) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sh(cmd, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dag_run(runner: str, tmp: Path, base_env: dict, root: str, small: bool) -> dict:
    home = tmp / f"airflow-{runner}"
    env = {**base_env, "AIRFLOW_HOME": str(home), "S2D_RUNNER": runner}
    sh([str(BIN / "airflow"), "db", "migrate"], env)
    sh([str(BIN / "airflow"), "pools", "set", "gpu", "1", "GPU slots"], env)
    small_cfg = [o for o in TEST_OVERRIDES if not o.startswith("tracking.")] if small else []
    overrides = small_cfg + [f"tracking.experiment=bench-{runner}"]
    conf = json.dumps({"preset": "tiny", "artifact_root": root, "overrides": overrides})
    t0 = time.perf_counter()
    sh([str(BIN / "airflow"), "dags", "test", "sparse_to_dense", "-c", conf], env)
    wall = time.perf_counter() - t0
    runs = sh([str(BIN / "airflow"), "dags", "list-runs", "sparse_to_dense", "-o", "json"], env).stdout
    run_id = json.loads(next(line for line in runs.splitlines() if line.startswith("[")))[0]["run_id"]
    states = sh([str(BIN / "airflow"), "tasks", "states-for-dag-run", "sparse_to_dense", run_id, "-o", "json"], env).stdout
    tasks = {}
    for t in json.loads(next(line for line in states.splitlines() if line.startswith("["))):
        start, end = (datetime.fromisoformat(t[k]) for k in ("start_date", "end_date"))
        tasks[t["task_id"]] = round((end - start).total_seconds(), 1)
    return {"wall_s": round(wall, 1), "tasks_s": tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    ap.add_argument("--small", action="store_true",
                    help="the tests' small config (seconds per stage: start-up dominates) instead of the tiny preset (the demo)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    procs = []
    with tempfile.TemporaryDirectory(prefix="s2d-bench-") as d:
        tmp = Path(d)
        try:
            t0 = time.perf_counter()
            sh([str(REPO / "infra/build-images.sh")], {**os.environ, "S2D_IMAGE": IMAGE, "PIP": f"{sys.executable} -m pip"})
            build_s = time.perf_counter() - t0
            size = int(json.loads(sh(["podman", "image", "inspect", IMAGE]).stdout)[0]["Size"])
            s3 = f"http://127.0.0.1:{free_port()}"
            procs.append(subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", s3.rsplit(":", 1)[1]],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            wait_http(s3)
            creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex, "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": s3}
            import boto3

            bucket = "s2d-bench"
            boto3.client("s3", endpoint_url=s3, aws_access_key_id="x", aws_secret_access_key="x",
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            mlflow = f"http://127.0.0.1:{free_port()}"
            menv = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
            procs.append(subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                                           "--host", "127.0.0.1", "--port", mlflow.rsplit(":", 1)[1], "--workers", "1"],
                                          env={**menv, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            wait_http(f"{mlflow}/health", timeout=120)
            sock = f"unix://{tmp}/podman.sock"
            procs.append(subprocess.Popen(["podman", "--runtime", RUNTIME, "system", "service", "--time=0", sock],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            base_env = {
                **os.environ,
                **creds,
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "MLFLOW_TRACKING_URI": mlflow,
                "HF_HUB_OFFLINE": "1",
                "TQDM_DISABLE": "1",
                "PYTHONPATH": str(REPO),
                "S2D_STAGE_PYTHON": sys.executable,
                "S2D_WORKDIR": str(tmp),
                "S2D_IMAGE": IMAGE,
                "S2D_DOCKER_URL": sock,
                "S2D_DOCKER_NETWORK": "host",
                "S2D_GPUS_PER_TASK": "0",
                "S2D_ARTIFACT_BASE": f"s3://{bucket}",
                "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",
            }
            time.sleep(2)
            results = {r: dag_run(r, tmp, base_env, f"s3://{bucket}/{r}", args.small) for r in ("local", "docker")}
            podman = ["podman", "--runtime", RUNTIME, "run", "--rm", "--network", "host"]
            startup = {
                "container_start_s": timed([*podman, "--entrypoint", "true", IMAGE]),
                "validate_local_s": timed([sys.executable, "-m", "stages", "validate", "--config", "tiny"], env=base_env),
                "validate_container_s": timed([*podman, IMAGE, "validate", "--config", "tiny"]),
            }
        finally:
            for p in procs:
                os.killpg(p.pid, 15)
                p.wait(timeout=30)
    ratio = results["docker"]["wall_s"] / results["local"]["wall_s"]
    config = "tests' small config (tests/conftest.py TEST_OVERRIDES)" if args.small else "the tiny preset (make demo's config)"
    out = {
        "config": config,
        "image": IMAGE,
        "image_size_bytes": size,
        "build_s": round(build_s, 1),
        "runs": results,
        "ratio_docker_over_local": round(ratio, 2),
        "startup": {k: round(v, 2) for k, v in startup.items()},
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "note": "local then docker, back to back in one command; compare the ratio, not the wall times",
    }
    (args.out / "containers_vs_local.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = "\n".join(f"| {t} | {results['local']['tasks_s'].get(t, '')} | {results['docker']['tasks_s'].get(t, '')} |"
                     for t in results["local"]["tasks_s"])
    (args.out / "containers_vs_local.md").write_text(f"""# Docker runner vs local runner (`bench/containers_vs_local.py`)

Same DAG run ({config}, all stages, S3 on moto, `mlflow server`), `local` then `docker`,
back to back in one command on a {os.cpu_count()}-CPU machine (1-minute load average at the end:
{out['load_avg_1m_at_end']}).

| | local | docker (podman) |
|---|---|---|
| DAG run wall time | {results['local']['wall_s']} s | {results['docker']['wall_s']} s |
| ratio docker / local | | **{ratio:.2f}x** |

Per task (s, start to end as Airflow records it):

| task | local | docker |
|---|---|---|
{rows}

Start-up (median of 3): bare container start {startup['container_start_s']:.2f} s; `validate --config tiny`
(imports + config) {startup['validate_local_s']:.2f} s locally, {startup['validate_container_s']:.2f} s in the image.
Image: {size / 1e9:.2f} GB; `infra/build-images.sh` in this run: {build_s:.0f} s.
""")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
