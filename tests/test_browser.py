"""What a user sees, in a real browser (Debian's chromium driven by Playwright) against the real stack
(`infra/local-stack.sh`: Airflow's components + an MLflow server, on random free ports): log in, fill
the trigger form by typing, check the created run's conf through the REST API, wait for the run to
succeed, read the run tree in the MLflow UI. Screenshots go to ``$S2D_TEST_ARTIFACTS/browser`` (else
the test's tmp folder). About 5-8 minutes on 2 busy cores, most of it the run itself."""

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
playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (the 'dev' extra)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
# Chromium on a machine without a network: no background connections, no sandbox as root
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = {"teacher_rl_steps": 3, "kl_warmup_steps": 2, "onpolicy_distill_steps": 2}
# the tests' small sizes, tracking on (the run tree is what we look at); budgets come from the fields
OVERRIDES = [o for o in TEST_OVERRIDES if not o.startswith("tracking.") and ".steps=" not in o] + [
    "tracking.experiment=browser"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    ap, mp = free_port(), free_port()
    env = {"HOME": str(d), "PATH": "/usr/bin:/bin", "VENV": str(Path(sys.executable).parent.parent),
           "AIRFLOW_HOME": str(d / "airflow"), "AIRFLOW_PORT": str(ap), "MLFLOW_PORT": str(mp),
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{d}/mlflow.db", "MLFLOW_ARTIFACTS": str(d / "mlruns"),
           "S2D_ARTIFACT_ROOT": str(d / "runs"), "S2D_WORKDIR": str(d), "PYTHONPATH": str(REPO),
           "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",  # the run names its MLflow experiment
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
        print(f"stack healthy in {time.monotonic() - t0:.0f} s ({ready.read_text().strip()})")
        yield {"airflow": f"http://127.0.0.1:{ap}", "mlflow": f"http://127.0.0.1:{mp}", "password": password,
               "base": d / "runs", "dir": d, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the script stops everything it started (tested below)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    root = os.environ.get("S2D_TEST_ARTIFACTS")
    out = Path(root) / "browser" if root else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def api(stack, path, body=None, token=None):
    req = urllib.request.Request(stack["airflow"] + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    for attempt in range(4):  # the API server shares two busy cores with the run: a slow answer is retried
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except (TimeoutError, urllib.error.URLError) as e:
            if isinstance(e, urllib.error.HTTPError) or attempt == 3:
                raise
            time.sleep(5)


def test_trigger_from_the_form_and_read_lineage_in_mlflow(stack, shots):
    from playwright.sync_api import sync_playwright

    typed_root = f"{stack['base']}/browser"
    token = api(stack, "/auth/token", {"username": "admin", "password": stack["password"]})["access_token"]
    deadline = time.monotonic() + 300
    while True:  # the dag-processor's first parse: the UI has no DAG page before it
        try:
            api(stack, "/api/v2/dags/sparse_to_dense", token=token)
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "the DAG was not parsed in 300 s"
            time.sleep(2)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            _walk(page, stack, shots, token, typed_root)
        except Exception:
            page.screenshot(path=shots / "failure.png")
            raise
        finally:
            browser.close()
    # what reaches the API is refused in words, naming the field: a negative seed, an empty stage list
    for bad, said in [
        ({"seed": -1}, "seed: -1 is less than the minimum of 0"),
        ({"stages": []}, "stages: [] should be non-empty"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as e:
            api(stack, "/api/v2/dags/sparse_to_dense/dagRuns", {"logical_date": None, "conf": bad}, token=token)
        assert e.value.code == 400 and said in e.value.read().decode()


def _walk(page, stack, shots, token, typed_root):
    """The user's path through both UIs; screenshots on the way."""

    # log in (simple auth manager: admin, password from the generated file)
    page.goto(stack["airflow"] + "/")
    page.get_by_label("Username").press_sequentially("admin")
    page.get_by_label("Password").press_sequentially(stack["password"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(stack["airflow"] + "/")

    page.goto(stack["airflow"] + "/dags/sparse_to_dense")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")

    def section(name):
        dialog.get_by_role("button", name=name, exact=True).click()
        page.wait_for_timeout(300)

    def field(name):  # the form's widget for a param: an input/textarea named element_<param>
        return dialog.locator(f'#element_{name}, [name="element_{name}"]:not([type=hidden])').first

    section("What to run")
    seed = field("seed")
    seed.fill("")
    seed.press_sequentially("-1")
    page.wait_for_timeout(500)
    page.screenshot(path=shots / "1-seed-negative.png")  # the UI's number field turns it into NaN
    seed.fill("")
    seed.press_sequentially("3")
    # stages: drop the last one (student GRPO) from the multi-select with the keyboard
    dialog.locator("#element_stages [role=combobox]").focus()
    page.keyboard.press("Backspace")
    page.keyboard.press("Tab")  # leave the multi-select (Escape would close the whole dialog)
    field("baseline").focus()  # the switch: off, with the keyboard
    page.keyboard.press("Space")
    page.screenshot(path=shots / "2-what-to-run.png")

    section("Step budgets (empty: the preset's)")
    for name, value in STEPS.items():
        field(name).press_sequentially(str(value))
    page.screenshot(path=shots / "3-step-budgets.png")

    section("Where the artifacts go")
    field("artifact_root").press_sequentially(typed_root)

    section("Config overrides (advanced)")
    box = field("overrides")
    for i, line in enumerate(OVERRIDES):  # the UI re-renders per key press: slow, so a line at a time
        box.press_sequentially(("\n" if i else "") + line, timeout=120_000)
    page.screenshot(path=shots / "4-overrides.png")
    dialog.get_by_role("button", name="Trigger").click()
    page.wait_for_timeout(2000)
    page.screenshot(path=shots / "5-triggered.png")

    # the run was created with exactly what was typed
    runs = api(stack, "/api/v2/dags/sparse_to_dense/dagRuns?order_by=-run_after", token=token)["dag_runs"]
    assert len(runs) == 1, runs
    conf = runs[0]["conf"]
    assert {k: conf[k] for k in ("seed", "stages", "baseline", "artifact_root", "overrides", *STEPS)} == {
        "seed": 3, "stages": ["teacher_rl", "kl_warmup", "onpolicy_distill"], "baseline": False,
        "artifact_root": typed_root, "overrides": OVERRIDES, **STEPS}
    assert conf["preset"] == "tiny" and conf.get("student_rl_steps") is None and conf.get("teacher") is None

    # wait for the run (the tiny preset at the tests' sizes)
    run_id = runs[0]["dag_run_id"]
    deadline = time.monotonic() + 900
    while True:
        run = api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{urllib.request.quote(run_id)}", token=token)
        if run["state"] in ("success", "failed") or time.monotonic() > deadline:
            break
        time.sleep(5)
    tis = api(stack, f"/api/v2/dags/sparse_to_dense/dagRuns/{urllib.request.quote(run_id)}/taskInstances", token=token)
    states = {t["task_id"]: t["state"] for t in tis["task_instances"]}
    page.goto(f"{stack['airflow']}/dags/sparse_to_dense/runs/{urllib.request.quote(run_id)}")
    page.wait_for_timeout(3000)
    page.screenshot(path=shots / "6-airflow-run.png")
    assert run["state"] == "success", (states, (stack["dir"] / "stack.log").read_text()[-3000:])
    print(f"triggered run: {run['start_date']} -> {run['end_date']}")
    assert states == {"plan": "success", "bootstrap": "success", "teacher_rl": "success", "teacher_data": "skipped",
                      "kl_warmup": "success", "onpolicy_distill": "success", "student_rl": "skipped",
                      "direct_grpo": "skipped", "report": "success", "close-runs": "success",
                      "promote": "success", "approval": "skipped", "promote_approved": "skipped", "promote_rejected": "skipped"}  # the gate: first version, approval off
    assert json.loads((Path(typed_root) / "summary.json").read_text())["final_student"] == f"{typed_root}/onpolicy_distill/model"

    # MLflow: the experiment's runs, the workflow parent with one child per stage
    from mlflow import MlflowClient

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("browser")
    page.goto(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}/runs")
    page.wait_for_timeout(4000)
    page.screenshot(path=shots / "7-mlflow-runs.png")
    parent = client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")[0]  # named "<preset> · <run id>"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["bootstrap", "kl_warmup", "onpolicy_distill", "promote", "teacher_rl"]
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # the parent's [+]
    page.wait_for_timeout(1500)
    page.screenshot(path=shots / "8-mlflow-run-tree.png")
    body = page.inner_text("body")
    assert all(name in body for name in ("tiny · manual__", "bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill")), body[
        :2000
    ]
    child = next(c for c in children if c.info.run_name == "onpolicy_distill")
    page.goto(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}")
    page.wait_for_timeout(4000)
    page.screenshot(path=shots / "9-mlflow-stage-run.png", full_page=True)
    body = page.inner_text("body")  # the stage run names its parent and its inputs and output
    assert "tiny · manual__" in body and all(f"s2d.{t}" in body for t in ("input.teacher", "input.student", "output.model")), (
        body[:3000]
    )

    # the registered final student: its version page names the teacher version, datasets, the Airflow run
    versions = client.search_model_versions("name = 's2d-student'")
    assert len(versions) == 1, versions
    mv = versions[0]
    assert mv.tags["s2d.teacher_version"] == "s2d-teacher/1" and mv.tags["s2d.uri"] == f"{typed_root}/onpolicy_distill/model"
    page.goto(f"{stack['mlflow']}/#/models/s2d-student/versions/{mv.version}")
    page.wait_for_timeout(4000)
    page.screenshot(path=shots / "10-mlflow-registered-student.png", full_page=True)
    body = page.inner_text("body")
    assert all(t in body for t in ("s2d.teacher_version", "s2d-teacher/1", "s2d.datasets", "airflow.dag_run_id")), body[:3000]


def _tree(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        c, parent = map(int, line.split())
        children.setdefault(parent, []).append(c)
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        seen.add(p)
        todo += children.get(p, [])
    return seen


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_stack_listens_on_loopback_only_and_stops_everything(stack):
    """Runs last (module order). Every listening socket of the stack's processes is on 127.0.0.1
    (no log servers); TERM to the script leaves none of its processes, although the scheduler's
    executor workers ignore TERM."""
    pids = _tree(stack["proc"].pid)
    titles = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, pids))], capture_output=True, text=True).stdout
    assert "airflow worker" in titles and "scheduler" in titles and "mlflow" in titles, titles
    inodes = set()
    for pid in pids:
        try:
            inodes |= {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f"socket:[{f[9]}]" in inodes:  # LISTEN, owned by the stack
                listening.append(f[1])
    assert listening and all(a.startswith("0100007F:") for a in listening), listening  # 127.0.0.1 only
    stack["proc"].send_signal(signal.SIGTERM)
    stack["proc"].wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in pids if _alive(p)]
