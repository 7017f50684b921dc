"""Containers for real: the stage image built from docker/stages-cpu.Dockerfile with podman
(infra/build-images.sh), and `airflow dags test` with the docker runner running every stage task as a
container of that image through the Docker API (podman's Docker-compatible service), with artifacts
on a real S3 endpoint (moto_server) and lineage in a real `mlflow server`, both on the host's
loopback (containers use host networking). One stage container is killed mid-training: Airflow
retries it and the stage resumes from its saved state.

Needs podman + runc (`.ci/run` installs them). Skipped without them, except in CI (``CI=true``),
where a missing or broken podman fails the test. Time: the image build (cold ~4 min with the base
made by debootstrap, cached afterwards in podman's store) plus one containerized DAG run, a second
trigger and an image smoke run.
"""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES
from test_airflow_e2e import STAGES, airflow, json_out, mlflow_server  # noqa: F401 - mlflow_server is a fixture

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# one tag per checkout: sessions sharing the machine's image store must not retag each other's image
# mid-run (the layer cache is shared all the same)
IMAGE = os.environ.get(
    "S2D_TEST_IMAGE", f"localhost/sparse-to-dense/stages:test-{hashlib.sha256(str(REPO).encode()).hexdigest()[:8]}"
)
TASKS = ["plan", *STAGES, "report", "promote", "close-runs"]  # approval off: nothing to approve, no verdict
# runc behind a wrapper that fits podman's default rlimits to this host's (infra/runc-host-limits:
# sandboxed CI VMs refuse them otherwise); the Docker API service uses the same runtime
RUNTIME = str(REPO / "infra/runc-host-limits")
# distinctive values, so finding them anywhere they must not be is meaningful (moto accepts any)
ACCESS_KEY = "AKIAS2D" + uuid.uuid4().hex[:13].upper()
SECRET_KEY = "s2dsecret" + uuid.uuid4().hex


def podman(*args, timeout=300, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", "--runtime", RUNTIME, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def image():
    missing = [b for b in ("podman", "runc") if not shutil.which(b)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed: .ci/run installs podman, runc and debootstrap")
        pytest.skip(f"needs {missing} (apt-get install podman runc debootstrap)")
    t0 = time.time()
    out = subprocess.run([str(REPO / "infra/build-images.sh")], cwd=REPO, capture_output=True, text=True, timeout=2400,
                         env={**os.environ, "S2D_IMAGE": IMAGE, "PIP": f"{sys.executable} -m pip"})
    assert out.returncode == 0, out.stderr[-6000:]
    assert out.stdout.strip().splitlines()[-1] == IMAGE
    print(f"image build: {time.time() - t0:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def docker_url(image, tmp_path_factory):
    """podman's Docker-compatible API on a private socket (what DockerOperator talks to)."""
    import docker

    d = tmp_path_factory.mktemp("podman")
    url = f"unix://{d}/podman.sock"
    proc = subprocess.Popen(["podman", "--runtime", RUNTIME, "system", "service", "--time=0", url],
                            stdout=subprocess.DEVNULL, stderr=open(d / "service.log", "w"), start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                docker.DockerClient(base_url=url).ping()
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, (d / "service.log").read_text()[-3000:]
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_image_contract(image, tmp_path):
    cfg = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["python", "-m", "stages"]
    assert podman("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "10001"
    ok = podman("run", "--rm", image, "validate", "--config", "tiny")
    assert "tiny" in ok.stdout
    bad = podman("run", "--rm", image, "validate", "--config", "tiny", "--set", "no_such_key=1", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")
    # a tiny workflow inside the image, publishing into a bind-mounted folder the image's user owns
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 10001, 10001)
    sets = [
        a
        for o in TEST_OVERRIDES + ["workflow.stages=[teacher_rl]", "workflow.baseline=false", "teacher_rl.steps=2"]
        for a in ("--set", o)
    ]
    run = podman("run", "--rm", "--network", "none", "-e", "HF_HUB_OFFLINE=1", "-v", f"{out}:/out", image,
                 "workflow", "--config", "tiny", "--root", "/out/run", *sets, timeout=900)
    for stage in ("bootstrap", "teacher_rl"):
        assert (out / "run" / stage / "manifest.json").exists(), run.stdout[-3000:]
    assert (out / "run" / "summary.json").exists()


def _kill_mid_stage(stage: str, state_prefix: str, killed: list, stop: threading.Event):
    """Kill the first container of ``stage`` once it has saved a training state (the resume point)."""
    import boto3

    s3 = boto3.client("s3")
    bucket, prefix = state_prefix[len("s3://"):].split("/", 1)
    while not stop.is_set() and not killed:
        ids = podman("ps", "-q", "--filter", f"label=s2d.stage={stage}", "--filter", "status=running", check=False).stdout.split()
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        if ids and any(o["Key"].endswith("latest.json") for o in listed):
            podman("kill", ids[0])
            killed.append(ids[0])
        time.sleep(0.5)


def test_dag_runs_every_stage_in_a_container(image, docker_url, s3_server, s3_bucket, mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    import boto3
    from mlflow import MlflowClient

    from stages import artifacts

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    home = tmp_path / "airflow"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "MLFLOW_TRACKING_URI": mlflow_server,
           "S2D_ARTIFACT_ROOT": f"s3://{s3_bucket}/runs",  # the base: the form's root must be under it
           "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",  # the run names its MLflow experiment
           "S2D_RUNNER": "docker", "S2D_IMAGE": image, "S2D_DOCKER_URL": docker_url, "S2D_DOCKER_NETWORK": "host",
           "S2D_DOCKER_AUTO_REMOVE": "never", "S2D_GPUS_PER_TASK": "0", "S2D_RETRY_DELAY_S": "5",
           "PYTHONPATH": str(REPO)}
    assert airflow(["db", "migrate"], env, timeout=300).returncode == 0
    assert airflow(["pools", "set", "gpu", "1", "GPU slots"], env, timeout=120).returncode == 0
    root = f"s3://{s3_bucket}/runs/containers"
    # teacher_rl runs longer than the other stages so the kill lands between its saved state and its end
    overrides = [o for o in TEST_OVERRIDES if not o.startswith("tracking.")] + ["tracking.experiment=containers",
                                                                               "teacher_rl.steps=6"]
    conf = json.dumps({"preset": "tiny", "artifact_root": root, "overrides": overrides})

    # the killed container cannot release its S3 stage lock: the retry (5 s later) finds its own previous
    # try's lock and waits for the lease (S2D_LOCK_LEASE_S, 120 s) to lapse instead of failing
    killed, stop = [], threading.Event()
    killer = threading.Thread(
        target=_kill_mid_stage, args=("teacher_rl", f"{root}/teacher_rl/_resume/", killed, stop), daemon=True
    )
    killer.start()
    t0 = time.time()
    first = airflow(["dags", "test", "sparse_to_dense", "-c", conf], env, timeout=2400)
    stop.set()
    killer.join(timeout=30)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    print(f"containerized DAG run: {time.time() - t0:.0f} s")
    runs = json_out(airflow(["dags", "list-runs", "sparse_to_dense", "-o", "json"], env, timeout=120).stdout)
    assert [r["state"] for r in runs] == ["success"]
    run_id = runs[0]["run_id"]
    states = json_out(airflow(["tasks", "states-for-dag-run", "sparse_to_dense", run_id, "-o", "json"], env, timeout=120).stdout)
    # teacher_data (the stored top-k teacher data) is not planned for this config: its container exits 99
    assert {t["task_id"]: t["state"] for t in states} == {
        **{t: "success" for t in TASKS},
        "teacher_data": "skipped",
        "import": "skipped", "prune": "skipped",  # setup stages of other model sources: not planned
        **dict.fromkeys(["approval", "promote_approved", "promote_rejected"], "skipped"),
    }

    # every task ran as a container of the image, as uid 10001; teacher_rl twice: killed (137), then retried
    ps = json.loads(podman("ps", "-a", "--filter", f"label=s2d.run_id={run_id}", "--format", "json").stdout)
    by_task = {}
    for c in ps:
        by_task.setdefault(c["Labels"]["s2d.stage"], []).append(c)
    assert sorted(by_task) == sorted([*TASKS, "teacher_data"])
    image_id = json.loads(podman("image", "inspect", image).stdout)[0]["Id"]
    for task, cs in by_task.items():
        assert all(c["ImageID"] == image_id for c in cs), task
        assert [c["ExitCode"] for c in cs if c["Labels"]["s2d.try_number"] == str(len(cs))] == [
            99 if task == "teacher_data" else 0
        ], task
    assert len(killed) == 1 and len(by_task["teacher_rl"]) == 2
    tries = {c["Labels"]["s2d.try_number"]: c for c in by_task["teacher_rl"]}
    assert tries["1"]["Id"].startswith(killed[0]) and tries["1"]["ExitCode"] == 137 and tries["2"]["ExitCode"] == 0
    specs = podman("inspect", *[c["Id"] for c in ps]).stdout
    assert all(json.loads(specs)[i]["Config"]["User"] == "10001:10001" for i in range(len(ps)))

    # credentials: reached the containers (they wrote to S3) but appear in no spec, XCom or log
    xcoms = sqlite3.connect(home / "airflow.db").execute("select value from xcom").fetchall()
    assert len(xcoms) >= len(TASKS)
    logs = log + "".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file())
    for where, text in {"inspect": specs, "xcom": repr(xcoms), "logs": logs}.items():
        assert ACCESS_KEY not in text and SECRET_KEY not in text, where
    assert "AWS_SHARED_CREDENTIALS_FILE" in specs  # the file's path is in the spec, its content is not
    # the retry knew its killed try's lock as its own (the task's identity reaches the container)
    assert "held by try 1 of this task" in logs
    env2 = json.loads(podman("inspect", tries["2"]["Id"]).stdout)[0]["Config"]["Env"]
    assert {"AIRFLOW_CTX_TASK_ID=teacher_rl", "AIRFLOW_CTX_TRY_NUMBER=2", f"AIRFLOW_CTX_DAG_RUN_ID={run_id}"} <= set(env2)

    # artifacts: every manifest's files are in the bucket, with the checksums the manifest lists
    s3 = boto3.client("s3")
    for stage in STAGES:
        m = artifacts.read_manifest(f"{root}/{stage}")
        assert m is not None and m["files"], stage
        for rel, meta in m["files"].items():
            body = s3.get_object(Bucket=s3_bucket, Key=f"runs/containers/{stage}/{rel}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == meta["sha256"] and len(body) == meta["size"], f"{stage}/{rel}"
        assert not s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/containers/{stage}/_resume/").get("Contents")

    # MLflow: the run tree and the lineage chain; the killed stage resumed its own child run
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("containers")
    parents = client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["s2d.final_student"] == "student_rl/model"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    # one teacher_rl run despite two tries (resumed); a try killed before its first saved state (a
    # process killed from outside) leaves a closed run of its own, so only finished runs are the tree
    assert [c.info.run_name for c in children].count("teacher_rl") == 1
    children = {c.info.run_name: c for c in children if c.info.status == "FINISHED"}
    assert sorted(children) == sorted(STAGES + ["promote"])
    assert {c.data.tags.get("airflow.dag_run_id") for c in children.values()} == {run_id}
    chain = [("teacher_rl", "teacher", "bootstrap/teacher"), ("kl_warmup", "teacher", "teacher_rl/model"),
             ("kl_warmup", "student", "bootstrap/student"), ("onpolicy_distill", "student", "kl_warmup/model"),
             ("student_rl", "student", "onpolicy_distill/model")]
    for stage, role, short in chain:  # each input names the run that produced it
        tags = children[stage].data.tags
        assert tags[f"s2d.input.{role}"] == short and children[stage].data.params[f"input.{role}"] == f"{root}/{short}"
        assert tags[f"s2d.input.{role}.run"] == children[short.split("/")[0]].info.run_id
        assert tags["s2d.output.model"] == f"{stage}/model"
    assert client.get_model_version("s2d-student", "1").source == f"{root}/student_rl/model"
    steps = [m.step for m in client.get_metric_history(children["teacher_rl"].info.run_id, "reward")]
    assert sorted(set(steps)) == list(range(1, 7))
    # resumed, not restarted: the steps before the saved state were trained (and logged) once
    assert steps.count(1) == 1 and steps.count(2) == 1, steps

    stage_runs = sum("s2d.stage" in r.data.tags for r in client.search_runs([exp.experiment_id]))
    # the same trigger again: every published stage is skipped (in containers), nothing retrains
    second = airflow(["dags", "test", "sparse_to_dense", "-c", conf], env, timeout=1200)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert (second.stdout + second.stderr).count('"skipped": true') == len(STAGES)
    assert sum("s2d.stage" in r.data.tags for r in client.search_runs([exp.experiment_id])) == stage_runs


def test_secret_files_hold_every_credential(monkeypatch):
    """The docker runner's credential hand-over, without an engine: files carry the values, the
    environment only their paths (what `docker inspect` would show)."""
    sys.path.insert(0, str(REPO / "dags"))
    import s2d_runners as r

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    files, env = r.secret_files({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "ST",
                                 "MLFLOW_TRACKING_PASSWORD": "PW", "HF_TOKEN": "HT"})
    aws = files[env["AWS_SHARED_CREDENTIALS_FILE"]]
    assert aws.splitlines() == ["[default]", "aws_access_key_id = AK", "aws_secret_access_key = SK", "aws_session_token = ST"]
    assert files[env["HF_TOKEN_PATH"]] == "HT"
    assert "mlflow_tracking_password = PW" in files["/home/s2d/.mlflow/credentials"]
    assert not any(v in json.dumps(env) for v in ("AK", "SK", "ST", "PW", "HT"))
    assert r.secret_files({}) == ({}, {})
