"""End to end through the real pieces: `airflow dags test` of the DAG (local runner) on the tiny
preset, artifacts on an S3-compatible server, tracking on a real `mlflow server` whose artifacts go
to that S3 endpoint. A second trigger with the same artifact root skips every finished stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES, free_port, wait_http

pytest.importorskip("airflow", reason="needs the 'airflow' extra (pip install -e '.[airflow]')")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo"]


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="mlflow-artifacts")
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": s3_server,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                             "--serve-artifacts", "--artifacts-destination", "s3://mlflow-artifacts/mlflow",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=open(d / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def airflow(args, env, **kw):
    return subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, **kw)


def json_out(stdout: str):
    """The JSON document in a CLI's stdout (Airflow prints warnings to stdout before it)."""
    for line in stdout.splitlines():
        if line.startswith(("[", "{")):
            return json.loads(line)
    raise AssertionError(f"no JSON in: {stdout[-2000:]}")


def test_dag_run_on_s3_and_mlflow_server(tmp_path, s3_bucket, mlflow_server):
    from mlflow import MlflowClient

    from stages import artifacts, storage

    home = tmp_path / "airflow"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "MLFLOW_TRACKING_URI": mlflow_server,
           "S2D_RUNNER": "local", "S2D_STAGE_PYTHON": sys.executable, "S2D_WORKDIR": str(tmp_path),
           "S2D_ARTIFACT_BASE": f"s3://{s3_bucket}/runs",  # the base: the form's root must be under it
           "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",  # lineage keys: only where the deployment names them
           "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    assert airflow(["db", "migrate"], env, timeout=300).returncode == 0
    assert airflow(["pools", "set", "gpu", "1", "GPU slots"], env, timeout=120).returncode == 0
    root = f"s3://{s3_bucket}/runs/e2e"
    overrides = [o for o in TEST_OVERRIDES if not o.startswith("tracking.")] + ["tracking.experiment=e2e"]
    conf = json.dumps({"preset": "tiny", "artifact_root": root, "overrides": overrides})

    first = airflow(["dags", "test", "sparse_to_dense", "-c", conf], env, timeout=1200)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    runs = json_out(airflow(["dags", "list-runs", "sparse_to_dense", "-o", "json"], env, timeout=120).stdout)
    assert [r["state"] for r in runs] == ["success"]
    states = json_out(airflow(["tasks", "states-for-dag-run", "sparse_to_dense", runs[0]["run_id"], "-o", "json"],
                              env, timeout=120).stdout)
    assert {t["task_id"]: t["state"] for t in states} == {
        **{t: "success" for t in ["plan", *STAGES, "report", "close-runs"]},
        "teacher_data": "skipped",  # not planned: kl_warmup.form token_kl
        "import": "skipped", "prune": "skipped",  # setup stages of other model sources: not planned
        # the gate: the first version becomes champion, nothing to approve
        "promote": "success",
        "approval": "skipped",
        "promote_approved": "skipped",
        "promote_rejected": "skipped",
    }

    # artifacts: every stage published on S3, checksums verify, the checkpoint loads
    for stage in STAGES:
        m = artifacts.read_manifest(f"{root}/{stage}")
        assert m is not None, stage
        for uri in m["outputs"].values():
            assert (artifacts.fetch(uri, cache_dir=tmp_path / "cache") / "config.json").exists()
    summary = json.loads(storage.store_for(root).read_bytes(f"{root}/summary.json"))
    assert summary["final_student"] == f"{root}/student_rl/model"

    # MLflow: one parent run, one child per stage, tagged with the Airflow run, lineage readable
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    parents = client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_name.startswith("tiny · ") and parent.data.tags["s2d.final_student"] == "student_rl/model"
    children = {
        c.info.run_name: c for c in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    assert sorted(children) == sorted(STAGES + ["promote"])
    for c in children.values():
        assert c.data.tags["airflow.dag_id"] == "sparse_to_dense" and c.data.tags["airflow.try_number"] == "1"
        assert c.info.status == "FINISHED"
    chain = [("teacher_rl", "teacher", "bootstrap/teacher"), ("kl_warmup", "teacher", "teacher_rl/model"),
             ("kl_warmup", "student", "bootstrap/student"), ("onpolicy_distill", "student", "kl_warmup/model"),
             ("student_rl", "student", "onpolicy_distill/model")]
    for stage, role, short in chain:  # uniform role keys, short values, the producing run, full URIs in params
        tags = children[stage].data.tags
        assert tags[f"s2d.input.{role}"] == short and children[stage].data.params[f"input.{role}"] == f"{root}/{short}"
        assert tags[f"s2d.input.{role}.run"] == children[short.split("/")[0]].info.run_id
        assert tags["s2d.output.model"] == f"{stage}/model"
    # the final student is a registered version whose source is its S3 checkpoint (no copy of the weights)
    mv = client.get_model_version("s2d-student", "1")
    assert mv.source == f"{root}/student_rl/model" and mv.run_id == children["student_rl"].info.run_id
    assert mv.tags["s2d.teacher_version"] == "s2d-teacher/1" and mv.tags["airflow.dag_id"] == "sparse_to_dense"
    assert len(client.get_metric_history(children["teacher_rl"].info.run_id, "reward")) == 4
    assert "final.c2_after" in children["kl_warmup"].data.metrics and "c2" in children["kl_warmup"].data.metrics
    inputs = children["teacher_rl"].inputs.dataset_inputs
    assert any(d.dataset.name == "arithmetic/teacher_rl" for d in inputs)
    arts = [a.path for a in client.list_artifacts(children["onpolicy_distill"].info.run_id)]
    assert "metrics.jsonl" in arts and any(a.endswith(".png") for a in arts)  # stored on S3 via the server

    # the same trigger again: every stage is skipped, no new child runs, no training
    second = airflow(["dags", "test", "sparse_to_dense", "-c", conf], env, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert (second.stdout + second.stderr).count('"skipped": true') == len(STAGES)
    assert sum("s2d.stage" in r.data.tags for r in client.search_runs([exp.experiment_id])) == len(STAGES) + 1  # + promote
    assert len(client.search_model_versions("name = 's2d-student'")) == 1
    # ... and no empty parent run: the results stay on the first run's (issue 30)
    again = client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")
    assert [r.info.run_id for r in again] == [parent.info.run_id]
