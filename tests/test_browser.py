"""What a user sees, in a real browser (Debian's chromium driven by Playwright) against the real stack,
started as a person does (`make stack`: Airflow's components + an MLflow server, on random free ports):
log in, see a broken schedule file among the DAG import errors (the other schedule's DAG loaded), open
the trigger form and see what will run (the preset's step budgets, bootstrap's, the artifact base),
fill it by typing, check the created run's conf through the REST API, wait for the run to succeed, read
the run tree in the MLflow UI's model-training view, follow the registered version's links, run the
docs' lineage snippet as written against the stack's MLflow; last, TERM to the make process stops
everything. Screenshots go to ``$S2D_TEST_ARTIFACTS/browser`` (else the test's tmp folder). About 6-10
minutes on 2 busy cores, most of it the run itself."""

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TEST_OVERRIDES, free_port, run_docs_python

pytest.importorskip("airflow", reason="needs the 'airflow' extra")
playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (the 'dev' extra)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
# Chromium on a machine without a network: no background connections, no sandbox as root
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = {"bootstrap_teacher_steps": 4, "bootstrap_student_steps": 4, "teacher_rl_steps": 3, "kl_warmup_steps": 2,
         "onpolicy_distill_steps": 2}
# the tests' small sizes, tracking on (the run tree is what we look at); budgets come from the fields
OVERRIDES = [o for o in TEST_OVERRIDES if not o.startswith(("tracking.", "bootstrap.teacher_steps", "bootstrap.student_steps"))
             and ".steps=" not in o] + ["tracking.experiment=browser"]
BROKEN_SCHEDULE = 'description: a typo in the cron\ncron: "61 3 * * 1"\n'


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`make stack` in its own session, as a person's terminal or a supervisor starts it, with a schedules
    folder holding the shipped example (enabled) and a broken file."""
    d = tmp_path_factory.mktemp("stack")
    ap, mp = free_port(), free_port()
    venv = Path(sys.executable).parent.parent
    schedules = d / "schedules"
    schedules.mkdir()
    (schedules / "nightly.yaml").write_text((REPO / "dags" / "schedules" / "example.yaml.disabled").read_text())
    (schedules / "bad-cron.yaml").write_text(BROKEN_SCHEDULE)
    env = {"HOME": str(d), "PATH": "/usr/bin:/bin", "AIRFLOW_PORT": str(ap), "MLFLOW_PORT": str(mp),
           "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db", "MLFLOW_ARTIFACTS": str(d / "mlruns"),
           "S2D_ARTIFACT_BASE": str(d / "runs"), "S2D_SCHEDULES": str(schedules), "PYTHONPATH": str(REPO),
           "S2D_ALLOWED_OVERRIDES": "default,tracking.experiment",  # the run names its MLflow experiment
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # -o: the venv is the one running these tests, never (re)installed by make
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "-o", f"{venv}/.installed", "stack", f"VENV={venv}",
           f"AIRFLOW_HOME={d / 'airflow'}", f"S2D_WORKDIR={d}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=open(d / "stack.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    ready = d / "airflow" / "stack-logs" / "ready"
    try:
        while not ready.exists():
            assert proc.poll() is None, (d / "stack.log").read_text()[-5000:]
            assert time.monotonic() - t0 < 400, "the stack did not come up in 400 s"
            time.sleep(1)
        password = json.loads((d / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        print(f"stack healthy in {time.monotonic() - t0:.0f} s ({ready.read_text().strip()})")
        yield {"airflow": f"http://127.0.0.1:{ap}", "mlflow": f"http://127.0.0.1:{mp}", "password": password,
               "base": d / "runs", "dir": d, "proc": proc, "ports": (ap, mp)}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # make forwards it; the script stops everything (tested below)
            proc.wait(timeout=90)


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
            errors = api(stack, "/api/v2/importErrors", token=token)["import_errors"]
            if errors:
                break
        except urllib.error.HTTPError:
            pass
        assert time.monotonic() < deadline, "the DAG and the schedule check were not parsed in 300 s"
        time.sleep(2)
    # the broken schedule file is an import error of the schedule check, which holds no DAG: the manual DAG
    # and the good schedule's DAG are loaded, not stale, triggerable
    assert [e["filename"] for e in errors] == ["sparse_to_dense_schedules.py"], errors
    assert "bad-cron.yaml: cron '61 3 * * 1'" in errors[0]["stack_trace"], errors[0]["stack_trace"]
    for dag_id in ("sparse_to_dense", "sparse_to_dense__nightly"):
        dag = api(stack, f"/api/v2/dags/{dag_id}", token=token)
        assert not dag["has_import_errors"] and not dag["is_stale"], dag
    assert api(stack, "/api/v2/dags/sparse_to_dense__nightly", token=token)["description"] == "Nightly tiny retrain (example)"
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

    # the DAG list: the broken schedule file among the DAG import errors, the good schedule's DAG listed
    page.goto(stack["airflow"] + "/dags")
    page.get_by_role("button", name=re.compile(r"^Dag Import Errors?$")).first.click()  # the red badge by the DAG count
    errors = page.get_by_role("dialog")
    errors.get_by_text("sparse_to_dense_schedules.py").first.click()  # the file's entry opens its error
    page.wait_for_timeout(1000)
    page.screenshot(path=shots / "0-import-errors.png")
    said = errors.inner_text()
    assert "sparse_to_dense_schedules.py" in said and "bad-cron.yaml" in said and "61 3 * * 1" in said, said[:2000]
    page.keyboard.press("Escape")
    page.goto(stack["airflow"] + "/dags")
    page.get_by_text("sparse_to_dense__nightly", exact=True).first.wait_for()  # the good schedule's DAG is listed

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

    section("Step budgets")
    page.screenshot(path=shots / "3a-step-budgets-shown.png")
    # what will run: every field holds the preset's budget (tiny.yaml), the baseline's is empty (= equal)
    tiny = yaml.safe_load((REPO / "stages" / "configs" / "tiny.yaml").read_text())
    for name, key in [("bootstrap_teacher_steps", ("bootstrap", "teacher_steps")),
                      ("bootstrap_student_steps", ("bootstrap", "student_steps")),
                      *[(f"{n}_steps", (n, "steps")) for n in ("teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl")]]:
        assert field(name).input_value() == str(tiny[key[0]][key[1]]), name
    assert field("direct_grpo_steps").input_value() == ""
    assert "Shown: preset tiny's" in dialog.inner_text()
    for name, value in STEPS.items():
        field(name).fill("")
        field(name).press_sequentially(str(value))
    page.screenshot(path=shots / "3b-step-budgets.png")

    section("Where the artifacts go")
    assert f"{stack['base']}/<dag_id>/<run_id>" in dialog.inner_text()  # the help names the base folder in force
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
    assert conf["preset"] == "tiny" and conf["student_rl_steps"] == 20 and conf["direct_grpo_steps"] is None
    assert conf.get("teacher") is None

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
    assert states == {
        "plan": "success",
        "bootstrap": "success",
        "import": "skipped",  # setup stages of other model sources: not planned
        "prune": "skipped",
        "teacher_rl": "success",
        "teacher_data": "skipped",
        "kl_warmup": "success",
        "onpolicy_distill": "success",
        "student_rl": "skipped",
        "direct_grpo": "skipped",
        "report": "success",
        "close-runs": "success",
        "promote": "success",
        "approval": "skipped",
        "promote_approved": "skipped",
        "promote_rejected": "skipped",
    }  # the gate: first version, approval off
    assert json.loads((Path(typed_root) / "summary.json").read_text())["final_student"] == f"{typed_root}/onpolicy_distill/model"

    # MLflow: the experiment's runs, the workflow parent with one child per stage
    from mlflow import MlflowClient

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("browser")
    # as docs/tracking.md says: MLflow 3.17 opens an experiment on the GenAI view whatever its tags say; one
    # click on the sidebar's "Model training" (remembered by the browser) and it opens on its runs
    page.goto(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}")
    page.wait_for_timeout(4000)
    assert "workflowType=genai" in page.url and exp.tags["mlflow.experimentKind"] == "custom_model_development", page.url
    page.screenshot(path=shots / "7a-mlflow-genai-view.png")
    got_it = page.get_by_role("button", name="Got it")  # the GenAI view's "Detect Issues" tip covers the page
    if got_it.count() and got_it.first.is_visible():
        got_it.first.click()
    page.goto(f"{stack['mlflow']}/#/experiments")
    page.wait_for_timeout(3000)
    page.get_by_text("Model training", exact=True).first.click()
    page.wait_for_timeout(1500)
    page.goto(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}")
    page.wait_for_timeout(4000)
    assert f"/experiments/{exp.experiment_id}/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
    page.screenshot(path=shots / "7-mlflow-runs.png")
    parent = client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")[0]
    when = datetime.datetime.fromisoformat(run_id.split("__", 1)[1])
    parent_name = f"tiny · {when:%m-%d %H:%M:%S} manual"  # the DAG run's time: runs differ at a glance
    assert parent.info.run_name == parent_name and parent.data.tags["airflow.dag_run_id"] == run_id
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["bootstrap", "kl_warmup", "onpolicy_distill", "promote", "teacher_rl"]
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # the parent's [+]
    page.wait_for_timeout(1500)
    page.screenshot(path=shots / "8-mlflow-run-tree.png")
    body = page.inner_text("body")
    assert all(name in body for name in (parent_name, "bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill")), body[:2000]
    child = next(c for c in children if c.info.run_name == "onpolicy_distill")
    page.goto(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}")
    page.wait_for_timeout(4000)
    page.screenshot(path=shots / "9-mlflow-stage-run.png", full_page=True)
    body = page.inner_text("body")  # the stage run names its parent and its inputs and output
    assert parent_name in body and all(f"s2d.{t}" in body for t in ("input.teacher", "input.student", "output.model")), (
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
    assert "Model registry" in body  # the sidebar's registry entry: the model-training view
    # the lineage a person clicks: the description's links to the workflow run, the training run, the teacher
    desc_links = {
        a: h for a, h in page.eval_on_selector_all("a", "es => es.map(e => [e.innerText.trim(), e.getAttribute('href')])")
    }
    od = child.info.run_id
    assert desc_links.get(parent_name, "").startswith(f"#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"), desc_links
    assert any(h.startswith(f"#/experiments/{exp.experiment_id}/runs/{od}") for h in desc_links.values()), desc_links
    with page.context.expect_page() as opened:  # MLflow opens a description's links in a new tab
        page.get_by_role("link", name="s2d-teacher version 1").click()
    tab = opened.value
    tab.get_by_text("Version 1").first.wait_for()
    tab.wait_for_timeout(2000)
    assert "/models/s2d-teacher/versions/1" in tab.url and "The RL teacher of workflow run" in tab.inner_text("body"), tab.url
    tab.screenshot(path=shots / "11-mlflow-teacher-version.png", full_page=True)

    # the docs' Python lineage snippet, as written, against this stack's MLflow
    out = run_docs_python("tracking.md", "## Seeing it", stack["mlflow"], stack["dir"])
    assert f"{typed_root}/onpolicy_distill/model" in out and f"{typed_root}/teacher_rl/model" in out, out


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
    (no log servers); TERM to the `make stack` process (as a supervisor stops what it started; make
    forwards TERM to the script, which stops its whole tree, although the scheduler's executor workers
    ignore TERM) leaves no process and both ports free. tests/test_stack_signals.py stops it every other
    way."""
    pids = _tree(stack["proc"].pid)
    titles = subprocess.run(["ps", "-ww", "-o", "args=", "-p", ",".join(map(str, pids))], capture_output=True, text=True).stdout
    assert "make" in titles and "local-stack.sh" in titles, titles
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
    t0 = time.monotonic()
    stack["proc"].send_signal(signal.SIGTERM)
    stack["proc"].wait(timeout=90)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in pids if _alive(p)]
    print(f"TERM to make: {len(pids)} processes gone in {time.monotonic() - t0:.1f} s")
    for port in stack["ports"]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # free: nothing listens there any more
