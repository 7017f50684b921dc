"""The approval step after the promotion gate, through the real stack (`infra/local-stack.sh`: Airflow's
api-server, scheduler, dag-processor and triggerer + an MLflow server, on random free ports): two DAG runs
triggered with the form's ``approval`` on. The first version passes the gate (no champion yet) and waits in
the run's *Required actions*; it is rejected through the REST API: the champion stays unset and the verdict is
on the version. The second run's version is approved by clicking **Approve** in the Airflow UI (Debian's
chromium driven by Playwright; without chromium, through the REST API, and the test says so): it becomes
``@champion`` and ``models:/s2d-student@champion`` resolves to its checkpoint. About 6-10 minutes on 2 busy
cores. Screenshots go to ``$S2D_TEST_ARTIFACTS/approval`` (else the test's tmp folder)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES, free_port

pytest.importorskip("airflow", reason="needs the 'airflow' extra")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OVERRIDES = [o for o in TEST_OVERRIDES if not o.startswith("tracking.")] + ["tracking.experiment=approval"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    ap, mp = free_port(), free_port()
    env = {"HOME": str(d), "PATH": "/usr/bin:/bin", "VENV": str(Path(sys.executable).parent.parent),
           "AIRFLOW_HOME": str(d / "airflow"), "AIRFLOW_PORT": str(ap), "MLFLOW_PORT": str(mp),
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{d}/mlflow.db", "MLFLOW_ARTIFACTS": str(d / "mlruns"),
           "S2D_ARTIFACT_BASE": str(d / "runs"), "S2D_WORKDIR": str(d), "PYTHONPATH": str(REPO), "S2D_RETRY_DELAY_S": "5",
           "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",  # the runs name their MLflow experiment
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    proc = subprocess.Popen([str(REPO / "infra" / "local-stack.sh")], env=env, stdout=open(d / "stack.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    ready = d / "airflow" / "stack-logs" / "ready"
    try:
        while not ready.exists():
            assert proc.poll() is None, (d / "stack.log").read_text()[-5000:]
            assert time.monotonic() - t0 < 400, "the stack did not come up in 400 s"
            time.sleep(1)
        password = json.loads((d / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        yield {"airflow": f"http://127.0.0.1:{ap}", "mlflow": f"http://127.0.0.1:{mp}", "password": password,
               "base": d / "runs", "dir": d}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the script stops everything it started
            proc.wait(timeout=60)


def api(stack, path, body=None, token=None, method=None):
    req = urllib.request.Request(stack["airflow"] + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers={"Content-Type": "application/json",
                                                         **({"Authorization": f"Bearer {token}"} if token else {})})
    for attempt in range(4):  # the API server shares two busy cores with the run: a slow answer is retried
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except (TimeoutError, urllib.error.URLError) as e:
            if isinstance(e, urllib.error.HTTPError) or attempt == 3:
                raise
            time.sleep(5)


def _trigger(stack, token, conf) -> str:
    run = api(stack, "/api/v2/dags/sparse_to_dense/dagRuns", {"logical_date": None, "conf": conf}, token=token)
    return run["dag_run_id"]


def _states(stack, token, run_id) -> dict:
    q = urllib.request.quote(run_id)
    tis = api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{q}/taskInstances", token=token)["task_instances"]
    return {t["task_id"]: t["state"] for t in tis}


def _wait(stack, token, run_id, until, timeout=1200):
    deadline = time.monotonic() + timeout
    while True:
        states = _states(stack, token, run_id)
        run = api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{urllib.request.quote(run_id)}", token=token)
        if until(run, states):
            return run, states
        assert run["state"] not in ("failed",) and time.monotonic() < deadline, (
            run["state"], states, (stack["dir"] / "airflow" / "stack-logs" / "scheduler.log").read_text()[-3000:])
        time.sleep(5)


def _waiting(run, states):
    return states.get("approval") == "awaiting_input"


def _done(run, states):
    return run["state"] in ("success", "failed")


def test_reject_then_approve_a_promotion(stack, tmp_path_factory):
    from mlflow import MlflowClient

    token = api(stack, "/auth/token", {"username": "admin", "password": stack["password"]})["access_token"]
    deadline = time.monotonic() + 300
    while True:  # the dag-processor's first parse
        try:
            api(stack, "/api/v2/dags/sparse_to_dense", token=token)
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "the DAG was not parsed in 300 s"
            time.sleep(2)
    api(stack, "/api/v2/dags/sparse_to_dense", {"is_paused": False}, token=token, method="PATCH")  # new DAGs start paused
    base = stack["base"]
    conf = {"preset": "tiny", "stages": ["onpolicy_distill"], "baseline": False, "approval": True, "overrides": OVERRIDES}

    # run 1: the first version passes the gate and waits; rejected through the REST API
    first = _trigger(stack, token, {**conf, "artifact_root": f"{base}/first"})
    _, states = _wait(stack, token, first, _waiting)
    assert states["promote"] == "success"
    q = urllib.request.quote(first)
    detail = api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{q}/taskInstances/approval/-1/hitlDetails", token=token)
    assert detail["options"] == ["Approve", "Reject"] and "Make version 1 of the student the champion?" in detail["subject"]
    assert "Promotion gate: avg@2 on eval" in detail["body"]  # the comparison the person decides on
    api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{q}/taskInstances/approval/-1/hitlDetails",
        {"chosen_options": ["Reject"]}, token=token, method="PATCH")
    run, states = _wait(stack, token, first, _done)
    assert run["state"] == "success", states
    assert {k: states[k] for k in ("promote", "approval", "promote_approved", "promote_rejected")} == {
        "promote": "success", "approval": "success", "promote_approved": "skipped", "promote_rejected": "success"}
    c = MlflowClient(stack["mlflow"])
    v1 = c.get_model_version("s2d-student", "1")
    assert v1.tags["s2d.gate.status"] == "rejected" and v1.tags["s2d.gate.approved_by"] == "admin"
    assert "champion" not in v1.aliases and "challenger" in v1.aliases
    assert "approval: rejected by admin" in (base / "first" / "summary.md").read_text()

    # run 2 (from run 1's base models): its version waits too, and is approved in the UI
    second = _trigger(stack, token, {**conf, "artifact_root": f"{base}/second", "teacher": f"{base}/first/bootstrap/teacher",
                                     "student": f"{base}/first/bootstrap/student"})
    _wait(stack, token, second, _waiting)
    how = _approve_in_the_ui(stack, second, tmp_path_factory) if Path(CHROMIUM).exists() else None
    if how is None:
        print("chromium is not installed: approved through the REST API instead of the UI")
        api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{urllib.request.quote(second)}/taskInstances/approval/-1/hitlDetails",
            {"chosen_options": ["Approve"]}, token=token, method="PATCH")
    run, states = _wait(stack, token, second, _done)
    assert run["state"] == "success", states
    assert states["promote_approved"] == "success" and states["promote_rejected"] == "skipped"
    assert states["bootstrap"] == "skipped"  # run 1's base models: nothing to make
    champion = c.get_model_version_by_alias("s2d-student", "champion")
    assert champion.version == "2" and champion.tags["s2d.gate.approved_by"] == "admin"
    assert champion.tags["s2d.gate.status"] == "approved"
    os.environ["MLFLOW_TRACKING_URI"] = stack["mlflow"]
    from stages.lineage import resolve_model_uri

    assert resolve_model_uri("models:/s2d-student@champion") == f"{base}/second/onpolicy_distill/model"
    summary = json.loads((base / "second" / "summary.json").read_text())
    assert summary["promotion"]["approval"]["verdict"] == "approved" and summary["promotion"]["champion_now"] == "2"


def _approve_in_the_ui(stack, run_id, tmp_path_factory) -> str:
    """Log in, open the run's approval task (its Required actions), click Approve; screenshots on the way."""
    from playwright.sync_api import sync_playwright

    root = os.environ.get("S2D_TEST_ARTIFACTS")
    shots = Path(root) / "approval" if root else tmp_path_factory.mktemp("approval-shots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(stack["airflow"] + "/")
            page.get_by_label("Username").press_sequentially("admin")
            page.get_by_label("Password").press_sequentially(stack["password"])
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(stack["airflow"] + "/")
            page.goto(f"{stack['airflow']}/dags/sparse_to_dense/runs/{urllib.request.quote(run_id)}/tasks/approval/required_actions")
            page.get_by_text("Make version 2 of the student the champion?").first.wait_for()
            page.wait_for_timeout(1500)
            page.screenshot(path=shots / "1-required-action.png", full_page=True)
            body = page.inner_text("body")
            assert "Promotion gate" in body and "first version" in body, body[:3000]
            page.get_by_role("button", name="Approve").first.click()
            page.wait_for_timeout(3000)
            page.screenshot(path=shots / "2-approved.png", full_page=True)
        except Exception:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
    return "ui"
