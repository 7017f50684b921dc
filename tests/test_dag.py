"""The Airflow DAG: integrity, the trigger form, and the container runners' specs rendered offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

airflow = pytest.importorskip("airflow", reason="the DAG tests need the 'airflow' extra (pip install -e '.[airflow]')")

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


def load_dag(monkeypatch, runner="local", **env):
    from airflow.dag_processing.dagbag import DagBag

    for k in ("S2D_ARTIFACT_ROOT", "S2D_ARTIFACT_BASE", "MLFLOW_TRACKING_URI"):  # the deployment's, not this shell's
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("S2D_RUNNER", runner)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(DAGS))
    sys.modules.pop("sparse_to_dense", None)
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["sparse_to_dense"]


def test_dag_imports_without_errors_and_without_torch():
    """The DAG file imports the stage table (stages/registry.py) and nothing heavy: no torch, no stage code."""
    code = f"import sys; sys.path.insert(0, {str(DAGS)!r}); import sparse_to_dense; " \
           "heavy = ('torch', 'transformers', 'mlflow', 'stages.config', 'stages.workflow', 'stages.artifacts'); " \
           "bad = [m for m in heavy if m in sys.modules]; assert not bad, bad; " \
           "assert set(m for m in sys.modules if m.startswith('stages')) == {'stages', 'stages.registry'}"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dag_shape(monkeypatch):
    dag = load_dag(monkeypatch)
    assert set(dag.task_ids) == {"plan", "bootstrap", "import", "prune", "teacher_rl", "teacher_data", "kl_warmup",
                                 "onpolicy_distill", "student_rl", "direct_grpo", "report", "promote", "approval",
                                 "promote_approved", "promote_rejected", "close-runs"}
    t = dag.task_dict
    assert t["close-runs"].is_teardown and t["close-runs"].upstream_task_ids == {"plan", "report", "promote"}
    # the gate after the report, then the optional approval and its two verdicts (tests/test_approval.py)
    assert t["promote"].upstream_task_ids == {"plan", "report"} and t["promote"].pool == "gpu"
    assert t["approval"].upstream_task_ids == {"promote"} and t["approval"].options == ["Approve", "Reject"]
    assert t["approval"].defaults == ["Reject"] and t["approval"].response_timeout.total_seconds() == 72 * 3600
    for verdict in ("promote_approved", "promote_rejected"):
        assert t[verdict].upstream_task_ids == {"plan", "approval"} and t[verdict].pool == "default_pool"
    assert dag.on_failure_callback is not None
    assert t["teacher_data"].upstream_task_ids == {"plan", "teacher_rl"}  # skipped unless kl_warmup.form is topk
    assert t["kl_warmup"].upstream_task_ids == {"plan", "teacher_data"}
    # setup: import and bootstrap after plan; prune reads the teacher either may make
    assert t["import"].upstream_task_ids == {"plan"} and t["prune"].upstream_task_ids == {"plan", "bootstrap", "import"}
    assert t["direct_grpo"].upstream_task_ids == {"plan", "prune"}
    assert t["report"].upstream_task_ids == {"plan", "student_rl", "direct_grpo"}
    for name in ("bootstrap", "teacher_rl", "student_rl", "direct_grpo"):
        assert t[name].pool == "gpu" and t[name].retries == 2 and t[name].execution_timeout is not None
        assert t[name].retry_exponential_backoff
    assert t["plan"].pool == "default_pool"
    assert [a.uri for a in t["report"].outlets] == ["s2d://sparse_to_dense/final_student"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # no schedule unless deployment config sets one


def test_wiring_follows_the_stage_table(monkeypatch):
    """Each stage task waits for plan and for the earlier stages that make the roles it reads (reduced to the
    direct ones); the report waits for the stages nobody else waits for."""
    dag = load_dag(monkeypatch)
    import s2d_table as table

    from stages import registry

    t = dag.task_dict
    assert [n for n in dag.task_ids if n in registry.STAGES] == list(registry.RUNNABLE + registry.GATES)
    for name in registry.RUNNABLE:
        assert t[name].upstream_task_ids == {"plan", *table.upstream(name)}, name
    assert table.upstream("kl_warmup") == {"teacher_data"} and table.upstream("direct_grpo") == {"prune"}
    assert table.last_stages() == ["student_rl", "direct_grpo"]
    assert [s.uri for n in registry.RUNNABLE for s in t[n].outlets] == [f"s2d://sparse_to_dense/{n}" for n in registry.RUNNABLE]


THROWAWAY_ROW = ('    Stage("self_distill", "self_distill", "workflow", {"teacher": "teacher", "student": "student"},\n'
                 '          output="student", splits=("prompts",), uses_teacher=True,\n'
                 '          title="2c · Self-distillation (a throwaway stage)"),\n')


def test_a_new_stage_is_a_row_and_a_module(tmp_path):
    """Adding a stage: one row in the table and its module, nothing else. In a copy of the checkout with a
    throwaway stage between 2b and 3, the CLI's plan runs it, the DAG has its task in the right place, and
    the form offers it."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=ignore)
    shutil.copytree(DAGS, tmp_path / "dags", ignore=ignore)
    registry = tmp_path / "stages" / "registry.py"
    text = registry.read_text()
    assert text.count('    Stage("student_rl"') == 1
    registry.write_text(text.replace('    Stage("student_rl"', THROWAWAY_ROW + '    Stage("student_rl"'))
    (tmp_path / "stages" / "recipes" / "self_distill.py").write_text(
        '"""A throwaway stage."""\n\n\ndef main(run, teacher, student):\n    raise NotImplementedError\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tmp_path), AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW_HOME=str(tmp_path / "airflow"))

    plan = subprocess.run([sys.executable, "-m", "stages", "plan", "--config", "tiny", "--root", str(tmp_path / "root"),
                           "--set", "tracking.enabled=false"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    stages = json.loads(plan.stdout.strip().splitlines()[-1])["stages"]
    assert stages[stages.index("onpolicy_distill") + 1] == "self_distill" and "student_rl" in stages

    code = f"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(tmp_path / "dags")!r})
assert bag.import_errors == {{}}, bag.import_errors
dag = bag.dags["sparse_to_dense"]
import stages
print("RESULT " + json.dumps({{"stages_from": stages.__file__,
                              "tasks": {{t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}},
    "form": dag.params.get_param("stages").schema, "params": sorted(dag.params)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["stages_from"] == str(tmp_path / "stages" / "__init__.py")
    tasks = out["tasks"]
    assert tasks["self_distill"] == ["onpolicy_distill", "plan"] and tasks["student_rl"] == ["plan", "self_distill"]
    assert out["form"]["items"]["enum"] == ["teacher_rl", "kl_warmup", "onpolicy_distill", "self_distill", "student_rl"]
    assert out["form"]["values_display"]["self_distill"] == "2c · Self-distillation (a throwaway stage)"
    assert "self_distill_steps" not in out["params"]  # it spends no step budget (no `trains`)


def _airflow_env(tmp_path, dags, **extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(dags), **extra)
    return env


def test_airflow_cli_loads_the_shipped_dags_folder_without_pythonpath(tmp_path):
    """`airflow dags list --local` and `airflow dags list-import-errors --local` load dags/ as shipped, with no
    PYTHONPATH (issue 30); the helper modules are not DAG files (.airflowignore)."""
    airflow_bin = str(Path(sys.executable).parent / "airflow")
    env = _airflow_env(tmp_path, DAGS)
    assert subprocess.run([airflow_bin, "db", "migrate"], env=env, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    listed = subprocess.run([airflow_bin, "dags", "list", "--local", "-o", "json"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    errors = subprocess.run([airflow_bin, "dags", "list-import-errors", "--local", "-o", "json"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and errors.returncode == 0, listed.stderr[-2000:] + errors.stderr[-2000:]
    rows = json.loads([x for x in listed.stdout.splitlines() if x.startswith("[")][-1])
    assert [r["dag_id"] for r in rows] == ["sparse_to_dense"] and rows[0]["fileloc"] == str(DAGS / "sparse_to_dense.py")
    assert json.loads([x for x in errors.stdout.splitlines() if x.startswith("[")][-1]) == []


def test_dags_folder_loads_as_deployed_with_only_the_table(tmp_path):
    """Production: only dags/ is synced (Helm gitSync subPath dags) and the Airflow image carries the stage
    table on PYTHONPATH (docker/airflow.Dockerfile): no other stage code is needed."""
    import shutil

    lines = (REPO / "docker" / "airflow.Dockerfile").read_text().splitlines()
    copy = [x.split() for x in lines if x.startswith("COPY") and "stages/" in x][0]
    image_path = [x for x in lines if x.startswith("ENV PYTHONPATH=")][0].removeprefix("ENV PYTHONPATH=")
    sources, target = copy[-3:-1], copy[-1]
    assert sources == ["stages/__init__.py", "stages/registry.py"] and target == f"{image_path}/stages/"
    site = tmp_path / "image" / image_path.strip("/")
    (site / "stages").mkdir(parents=True)
    for src in sources:
        shutil.copy(REPO / src, site / "stages")
    configs = [x.split() for x in lines if x.startswith("COPY") and "stages/configs/" in x][0]
    assert configs[-2:] == ["stages/configs/", f"{image_path}/stages/configs/"]  # the form shows the presets' budgets
    shutil.copytree(REPO / "stages" / "configs", site / "stages" / "configs")
    shutil.copytree(DAGS, tmp_path / "opt/airflow/dags", ignore=shutil.ignore_patterns("__pycache__"))
    env = _airflow_env(tmp_path, tmp_path / "opt/airflow/dags", PYTHONPATH=str(site))
    code = f"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower() + str(f).lower()]
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(tmp_path / 'opt/airflow/dags')!r})
import stages
print("RESULT " + json.dumps({{"errors": {{k: v[-300:] for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dags),
      "stages": stages.__file__, "files": sorted(bag.dagbag_stats and [s.file for s in bag.dagbag_stats]),
      "steps": bag.dags["sparse_to_dense"].params["teacher_rl_steps"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["errors"] == {} and out["dags"] == ["sparse_to_dense"]
    assert out["stages"] == str(site / "stages" / "__init__.py") and out["steps"] == 40
    # helpers are not DAG files; the schedule check is one (it defines no DAG: see test_schedules_folder)
    assert sorted(f.rsplit("/", 1)[-1] for f in out["files"]) == ["sparse_to_dense.py", "sparse_to_dense_schedules.py"]


def test_no_variable_is_read_while_parsing(monkeypatch):
    """Parsing the DAG file reads settings from the environment only; a running task also reads Variables."""
    from airflow.sdk import Variable
    from airflow.sdk.execution_time.context import set_current_context

    calls = []
    monkeypatch.setattr(Variable, "get", classmethod(lambda cls, key, default=None, **_: calls.append(key) or "from-variable"))
    load_dag(monkeypatch)
    assert calls == []
    import s2d_settings as s

    monkeypatch.setenv("AIRFLOW_VAR_S2D_GPU_POOL", "env-pool")
    assert s.setting("gpu_pool") == "env-pool" and s.setting("image") is None and calls == []
    with set_current_context(_context(PARAMS)):
        assert s.setting("image") == "from-variable" and calls == ["s2d_image"]


def test_artifact_base_setting_and_its_old_name(monkeypatch, tmp_path):
    """S2D_ARTIFACT_BASE names the base folder; the old S2D_ARTIFACT_ROOT still works, with a deprecation warning."""
    monkeypatch.syspath_prepend(str(DAGS))
    import s2d_settings as s

    monkeypatch.delenv("S2D_ARTIFACT_BASE", raising=False)
    monkeypatch.setenv("S2D_ARTIFACT_ROOT", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match="S2D_ARTIFACT_BASE"):
        assert s.artifact_base() == str(tmp_path / "old")
    monkeypatch.setenv("S2D_ARTIFACT_BASE", "s3://bucket/runs/")
    assert s.artifact_base() == "s3://bucket/runs"
    monkeypatch.delenv("S2D_ARTIFACT_BASE")
    monkeypatch.delenv("S2D_ARTIFACT_ROOT")
    monkeypatch.setenv("S2D_WORKDIR", str(tmp_path))
    assert s.artifact_base() == str(tmp_path / "runs")


@pytest.mark.parametrize("conf, bad", [
    ({"preset": "gpt-9"}, "preset"),
    ({"stages": ["teacher_rl", "teacher_rl"]}, "stages"),
    ({"stages": ["sft"]}, "stages"),
    ({"stages": []}, "stages"),
    ({"seed": -1}, "seed"),
    ({"teacher_rl_steps": -5}, "teacher_rl_steps"),
    ({"kl_warmup_steps": "ten"}, "kl_warmup_steps"),
    ({"overrides": "teacher_rl.steps=3"}, "overrides"),
])
def test_invalid_params_are_refused_by_the_form(monkeypatch, conf, bad):
    dag = load_dag(monkeypatch)
    with pytest.raises(Exception) as e:
        _with_conf(dag, conf).validate()
    assert bad in str(e.value)


def test_form_widgets_cannot_be_mistyped(monkeypatch):
    """One integer field per step budget, a multi-select of the stages, titles and sections on every
    field; nothing marked required that may be empty (the UI requires a field whose type has no null)."""
    dag = load_dag(monkeypatch)
    import s2d_table as table

    schema = {k: p.schema for k, p in dag.params.items()}
    for stage in table.STEP_STAGES:
        assert schema[f"{stage}_steps"]["type"] == ["null", "integer"] and schema[f"{stage}_steps"]["minimum"] == 0
    stages = schema["stages"]
    assert "array" in stages["type"] and stages["examples"] == stages["items"]["enum"]  # renders as a multi-select
    assert set(stages["values_display"]) == set(stages["examples"])
    for name in ("teacher", "student", "artifact_root", "overrides", *(f"{s}_steps" for s in table.STEP_STAGES)):
        assert "null" in schema[name]["type"], name
    for name, s in schema.items():
        assert s.get("title") and s.get("section"), name
    assert "steps" not in schema  # no JSON editor


def test_valid_params_pass(monkeypatch):
    dag = load_dag(monkeypatch, S2D_ARTIFACT_BASE="s3://my-bucket/runs")
    import s2d_contract as contract
    import s2d_policy as policy
    import sparse_to_dense as m

    conf = {"preset": "qwen3-1.7b", "stages": ["teacher_rl", "onpolicy_distill"], "teacher_rl_steps": 10,
            "artifact_root": "s3://my-bucket/runs/x", "teacher": "Qwen/Qwen3-8B", "overrides": ["teacher_rl.group_size=4"]}
    params = _with_conf(dag, conf).validate()
    assert policy.refusal(params, m.FORM) is None
    sets = contract.overrides(params)
    assert "teacher_rl.steps=10" in sets and not any(o.startswith("kl_warmup.steps") for o in sets)


def test_the_form_shows_what_runs(monkeypatch, tmp_path):
    """The step fields hold the form's preset's budgets (bootstrap's too), the others' in the help; the
    baseline's stays equal to the workflow's unless set; the artifact root's help names the base folder.
    A field left at the shown value with another preset is that preset's own, and the plan task says so."""
    import yaml

    base = tmp_path / "base"
    dag = load_dag(monkeypatch, S2D_ARTIFACT_BASE=str(base))
    import s2d_contract as contract
    import s2d_table as table

    tiny = yaml.safe_load((REPO / "stages" / "configs" / "tiny.yaml").read_text())
    qwen = yaml.safe_load((REPO / "stages" / "configs" / "qwen3-1.7b.yaml").read_text())
    shown = {k: dag.params[k] for k in table.budget_fields()}
    assert shown == {"bootstrap_teacher_steps": tiny["bootstrap"]["teacher_steps"],
                     "bootstrap_student_steps": tiny["bootstrap"]["student_steps"],
                     **{f"{n}_steps": tiny[n]["steps"] for n in table.STEP_STAGES}}
    assert shown["teacher_rl_steps"] == 40 and shown["direct_grpo_steps"] is None and dag.params["preset"] == "tiny"
    help_ = dag.params.get_param("teacher_rl_steps").description
    assert "Shown: preset tiny's (tiny 40 · qwen3-1.7b 200 · llama3.1-8b 200)" in help_, help_
    assert "equal to the workflow's student steps" in dag.params.get_param("direct_grpo_steps").description
    assert f"`{base}/<dag_id>/<run_id>`" in dag.params.get_param("artifact_root").schema["description_md"]
    assert dag.params.get_param("bootstrap_teacher_steps").schema["section"] == "Step budgets"

    values = _with_conf(dag, {}).validate()  # the form as shown: the preset's budgets, set explicitly
    assert contract.budgets(values) == {"bootstrap.teacher_steps": 500, "bootstrap.student_steps": 700, "teacher_rl.steps": 40,
                                        "kl_warmup.steps": 30, "onpolicy_distill.steps": 30, "student_rl.steps": 20}
    values = _with_conf(dag, {"bootstrap_student_steps": 9, "direct_grpo_steps": 5}).validate()
    assert contract.budgets(values)["bootstrap.student_steps"] == 9 and contract.budgets(values)["direct_grpo.steps"] == 5
    # another preset, the fields as shown: that preset's own budgets (a trigger naming only the preset runs it)
    values = _with_conf(dag, {"preset": "qwen3-1.7b", "teacher_rl_steps": 10}).validate()
    assert contract.budgets(values) == {"teacher_rl.steps": 10}
    said = contract.kept_presets(values)
    assert any(x.startswith("kl_warmup_steps=30 is the form's shown value (preset tiny's): preset qwen3-1.7b's own "
                            f"{qwen['kl_warmup']['steps']} is used") for x in said), said
    assert not any(x.startswith("teacher_rl_steps") for x in said)

    # a deployment whose form shows another preset
    dag = load_dag(monkeypatch, S2D_DEFAULT_PRESET="qwen3-1.7b")
    assert dag.params["preset"] == "qwen3-1.7b" and dag.params["teacher_rl_steps"] == qwen["teacher_rl"]["steps"]
    assert dag.params["bootstrap_teacher_steps"] is None  # it builds no models


# ---------------------------------------------------------------- the trigger form is a security boundary

BASE_REFUSALS = [  # (conf, what the one-line refusal must say)
    ({"artifact_root": "/"}, "artifact_root '/' is outside the artifact base"),
    ({"artifact_root": "../../etc"}, "artifact_root '../../etc' contains '..'"),
    ({"artifact_root": "{base}/../x"}, "contains '..'"),
    ({"artifact_root": "/tmp/elsewhere"}, "is outside the artifact base"),
    ({"artifact_root": "s3://someone-elses-bucket/runs"}, "bucket 'someone-elses-bucket' is not an allowed bucket"),
    ({"artifact_root": "gs://bucket/x"}, "neither a local path nor s3://"),
    ({"stages": None}, "stages: choose at least one stage"),
    ({"overrides": ["models.teacher.trust_remote_code=true"]}, "loads code"),
    ({"overrides": ["task.kind=os:system"]}, "loads code"),
    ({"overrides": ["task.files={eval: /etc/passwd}"]}, "loads code"),
    ({"overrides": ["models.student={source: x, trust_remote_code: true}"]}, "loads code"),
    ({"overrides": ["device=cuda:7"]}, "'device' is not an allowed key"),
    ({"overrides": ["no equals sign"]}, "is not key.path=value"),
    ({"overrides": ["models.teacher.source=someone/evil-model"]}, "not under an allowed model prefix"),
    ({"teacher": "someone/evil-model"}, "teacher 'someone/evil-model' is not under an allowed model prefix"),
    ({"student": "/etc/models/x"}, "student '/etc/models/x' is outside the artifact base"),
    ({"steps": {"teacher_rl": 5}}, "steps: not a parameter of this DAG"),
]


@pytest.mark.parametrize("conf, said", BASE_REFUSALS)
def test_trigger_refusals(monkeypatch, tmp_path, conf, said):
    """What the schema cannot say, refused in one line by the check every task runs first."""
    base = tmp_path / "runs"
    dag = load_dag(monkeypatch, S2D_ARTIFACT_BASE=str(base))
    import s2d_contract as contract
    import s2d_policy as policy
    import sparse_to_dense as m

    conf = {k: v.replace("{base}", str(base)) if isinstance(v, str) else v for k, v in conf.items()}
    params = _with_conf(dag, conf)
    values = {k: params[k] for k in params}  # unknown conf keys arrive as plain values, as in a DagRun
    problem = policy.refusal(values, m.FORM)
    assert problem and said in problem and "\n" not in problem
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="^error: "):  # fails without retries
        contract.task_args("plan", values, m.FORM, "sparse_to_dense", "manual__1", None)


def test_trigger_allowed_inside_the_base_and_deployment_allow_lists(monkeypatch, tmp_path):
    base = tmp_path / "runs"
    (tmp_path / "link").symlink_to("/etc")
    dag = load_dag(monkeypatch, S2D_ARTIFACT_BASE=str(base), S2D_WORKDIR=str(tmp_path))
    import s2d_contract as contract
    import s2d_policy as policy
    import sparse_to_dense as m

    r = policy  # the checks below read as before
    ok = _with_conf(dag, {"artifact_root": "runs/mine", "student": f"{base}/x/kl_warmup/model",
                          "overrides": ["teacher_rl.steps=3", "models.teacher.source=models:/s2d-teacher/2"]}).validate()
    assert r.refusal(ok, m.FORM) is None
    assert contract.task_args("plan", ok, m.FORM, "sparse_to_dense", "r1")[:5] == [
        "plan",
        "--config",
        "tiny",
        "--root",
        "runs/mine",
    ]
    # a symlink out of the base is followed before the check
    assert "outside the artifact base" in r.refusal({**ok, "artifact_root": "link/x"}, m.FORM)
    # the deployment widens the lists explicitly (a code-loading key only when named)
    monkeypatch.setenv("S2D_ALLOWED_OVERRIDES", "teacher_rl,task.kind")
    monkeypatch.setenv("S2D_ALLOWED_MODEL_PREFIXES", "bootstrap,my-org/")
    monkeypatch.setenv("S2D_ALLOWED_BUCKETS", "team-bucket")
    assert r.refusal({**ok, "overrides": ["task.kind=my_pkg.tasks:make"], "teacher": "my-org/t",
                      "artifact_root": "s3://team-bucket/runs/a", "student": None}, m.FORM) is None
    assert "not an allowed key" in r.refusal({**ok, "overrides": ["eval.samples=4"]}, m.FORM)
    assert "allowed model prefix" in r.refusal({**ok, "teacher": "Qwen/Qwen3-8B"}, m.FORM)


def test_refusals_through_a_real_dag_run(tmp_path):
    """Each refusal triggered as a DAG run (``dag.test``, the real task runner, SQLite database): the
    plan task fails with the one-line refusal, without retries, and no stage runs."""
    import os

    home = tmp_path / "airflow"
    base = tmp_path / "runs"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "S2D_ARTIFACT_BASE": str(base), "S2D_WORKDIR": str(tmp_path),
           "S2D_STAGE_PYTHON": "/nonexistent/python"}  # a stage command that ran would fail differently
    assert subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                          capture_output=True, timeout=300).returncode == 0
    cases = [(c, said) for c, said in BASE_REFUSALS if "steps" not in c]
    code = f"""
import json, sys
sys.path.insert(0, {str(DAGS)!r})
from airflow.dag_processing.dagbag import DagBag
for conf in json.loads(sys.argv[1]):
    # a fresh DAG per run, as the scheduler deserializes one: dag.test leaves a run's conf in dag.params
    dag = DagBag(dag_folder={str(DAGS)!r}).dags["sparse_to_dense"]
    conf = {{k: v.replace("{{base}}", {str(base)!r}) if isinstance(v, str) else v for k, v in conf.items()}}
    dr = dag.test(run_conf=conf)
    states = {{ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}
    print("RESULT " + json.dumps({{"state": str(dr.state), "tasks": states}}), flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps([c for c, _ in cases])], env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert len(results) == len(cases), out[-5000:]
    (tmp_path / "out.log").write_text(out)
    chunks = proc.stdout.split("RESULT ")  # each run's log precedes its RESULT line
    for (conf, said), res, log in zip(cases, results, chunks):
        assert res["state"].endswith("failed"), (conf, res)
        assert res["tasks"]["plan"].endswith("failed"), (conf, res)
        assert all(s.endswith("upstream_failed") for t, s in res["tasks"].items() if t not in ("plan", "close-runs")), (conf, res)
        assert res["tasks"]["close-runs"].endswith("skipped"), res  # the teardown: nothing was opened
        refusals = [x for x in log.splitlines() if "AirflowFailException: error: " in x]
        assert len(refusals) == 1 and said in refusals[0], (conf, refusals or log[-3000:])
    assert "/nonexistent/python" not in out  # no stage command was started


def _with_conf(dag, conf):
    """The DAG's params with a trigger's conf applied, the way a DagRun's params are built."""
    import copy

    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params


class _TI:
    """What a running task instance offers the runners: its identity and the plan task's XCom."""

    def __init__(self, plan_json=None, task_id="task", try_number=1):
        self.dag_id, self.run_id, self.task_id, self.try_number = _DR.dag_id, _DR.run_id, task_id, try_number
        self.plan_json = plan_json

    def xcom_pull(self, task_ids=None, **_):
        assert task_ids == "plan"
        return self.plan_json


class _DR:
    dag_id, run_id = "sparse_to_dense", "manual__2026-11-26T00:00:00+00:00"


def _context(params, plan_json=None, **ti):
    return {"params": params, "dag_run": _DR(), "ti": _TI(plan_json, **ti), "outlet_events": {}}


def _container_call(monkeypatch, op, params, plan_json):
    """What a container runner's task sends when it executes (the engine call captured where it starts):
    DockerOperator: command, environment, private environment, mounts; pod: the pod it would create."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.docker.operators.docker import DockerOperator

    seen = {}

    def docker(self, context):
        seen.update(command=self.command, env=dict(self.environment), private=dict(self._private_environment),
                    mounts=list(self.mounts), auto_remove=self.auto_remove, labels=dict(self.labels or {}))

    def pod(self, context):
        seen["pod"] = self.build_pod_request_obj(context=None, dry_run=True)

    monkeypatch.setattr(DockerOperator, "execute", docker)
    monkeypatch.setattr(KubernetesPodOperator, "execute", pod)
    op.execute(_context(params, plan_json))
    return seen


PARAMS = {
    "preset": "tiny",
    "teacher": None,
    "student": None,
    "stages": ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"],
    "baseline": True,
    "seed": 3,
    "teacher_rl_steps": 7,
    "kl_warmup_steps": None,
    "onpolicy_distill_steps": None,
    "student_rl_steps": None,
    "direct_grpo_steps": None,
    "artifact_root": None,
    "overrides": [],
}
PLAN = json.dumps({"root": "s3://b/runs/r", "parent_run_id": "abc123", "stages": []})


def test_docker_runner_spec(monkeypatch):
    pytest.importorskip("airflow.providers.docker")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dag = load_dag(monkeypatch, "docker", S2D_IMAGE="registry.example/s2d:1.2", AWS_SECRET_ACCESS_KEY="s3cr3t",
                   MLFLOW_TRACKING_URI="http://mlflow:5000")
    import s2d_contract as contract
    from airflow.providers.docker.operators.docker import DockerOperator

    op = dag.task_dict["teacher_rl"]
    assert isinstance(op, DockerOperator) and op.image == "registry.example/s2d:1.2"
    assert op.device_requests[0]["Capabilities"] == [["gpu"]] and op.device_requests[0]["Count"] == 1
    assert contract.NOT_PLANNED in op.skip_on_exit_code
    # the command is a constant: the arguments travel as data, computed (and checked) when the task runs
    assert op.command == ["--args-env"] and not set(op.template_fields) & {"command", "environment"}
    assert op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", **contract.stage_env("teacher_rl")}
    assert "s3cr3t" not in repr(vars(op))  # handed over at execute, as a mounted file (tests/test_containers.py)
    sent = _container_call(monkeypatch, op, PARAMS, PLAN)
    assert sent["command"] == ["--args-env"]
    assert json.loads(sent["env"]["S2D_ARGS_JSON"]) == contract.stage_args("teacher_rl", PARAMS, "s3://b/runs/r", "abc123")
    assert "s3cr3t" not in json.dumps(sent["env"]) and sent["env"]["AWS_SHARED_CREDENTIALS_FILE"]
    assert op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", **contract.stage_env("teacher_rl")}  # restored
    assert dag.task_dict["plan"].device_requests is None  # no GPU for bookkeeping tasks


def test_kubernetes_runner_spec(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    dag = load_dag(monkeypatch, "kubernetes", S2D_IMAGE="registry.example/s2d:1.2", AWS_SECRET_ACCESS_KEY="s3cr3t")
    import s2d_contract as contract
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    op = dag.task_dict["onpolicy_distill"]
    assert isinstance(op, KubernetesPodOperator)
    pod = op.build_pod_request_obj(context=None, dry_run=True)  # rendered offline, no cluster
    c = pod.spec.containers[0]
    assert c.image == "registry.example/s2d:1.2" and c.command == ["python", "-m", "stages"] and c.args == ["--args-env"]
    assert str(c.resources.limits["nvidia.com/gpu"]) == "1"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and pod.spec.node_selector
    assert c.env_from[0].secret_ref.name == "s2d-credentials"
    assert "s3cr3t" not in json.dumps(pod.to_dict(), default=str)  # credentials come from the Secret only

    # at execute time the pod gets the task's arguments (as data) and the task try's identity (MLflow tags;
    # the stage lock knows its own killed previous try)
    before = list(op.env_vars)
    ctx = _context(PARAMS, PLAN, task_id="onpolicy_distill", try_number=2)
    seen = []
    monkeypatch.setattr(KubernetesPodOperator, "execute",
                        lambda self, context: seen.append(self.build_pod_request_obj(context=None, dry_run=True)))
    op.execute(ctx)
    c = seen[0].spec.containers[0]
    env = {e.name: e.value for e in c.env}
    assert c.command + c.args == contract.stage_argv()
    assert json.loads(env["S2D_ARGS_JSON"]) == contract.stage_args("onpolicy_distill", PARAMS, "s3://b/runs/r", "abc123") + [
        "--xcom-file", "/airflow/xcom/return.json"]
    assert env["AIRFLOW_CTX_DAG_RUN_ID"] == _DR.run_id and env["AIRFLOW_CTX_TASK_ID"] == "onpolicy_distill"
    assert env["AIRFLOW_CTX_TRY_NUMBER"] == "2" and op.env_vars == before  # the DAG's operator is unchanged


def test_stage_command_contract_is_the_cli(monkeypatch):
    """What the DAG sends is accepted by the stage CLI's parser, every stage, read back from the data the
    runners pass (``--args-env``: S2D_ARGS_JSON)."""
    monkeypatch.syspath_prepend(str(DAGS))
    import s2d_contract as contract
    import s2d_table as table

    from stages.cli import args_from_data, parse_args

    for cmd in ("plan", *table.GPU_STAGES, "report", "close-runs"):
        sent = contract.stage_args(cmd, PARAMS, "runs/x", "pid")
        env = dict(contract.args_env(sent))
        argv = args_from_data(contract.stage_argv()[len(contract.ENTRYPOINT):], env)
        assert argv == sent and "S2D_ARGS_JSON" not in env  # taken out: no child process inherits it
        args = parse_args(argv)
        assert args.command == cmd and args.root == "runs/x" and args.parent_run_id == "pid"
        assert "teacher_rl.steps=7" in args.overrides and "seed=3" in args.overrides
        assert args.if_planned == (cmd in table.STAGES)


def test_arguments_as_data_are_checked(tmp_path):
    """--args-env / --args-file hold a JSON list of strings; anything else is one error line, exit 2."""
    from stages.cli import args_from_data, main

    (tmp_path / "args.json").write_text(json.dumps(["validate", "--config", "tiny"]))
    assert args_from_data(["--args-file", str(tmp_path / "args.json")]) == ["validate", "--config", "tiny"]
    assert args_from_data(["plan", "--args-env"]) == ["plan", "--args-env"]  # only the whole command line is the flag
    for bad in ('{"a": 1}', '["validate", 3]', "not json", '["--args-env"]'):
        with pytest.raises(SystemExit, match="JSON list of strings"):
            args_from_data(["--args-env"], {"S2D_ARGS_JSON": bad})
    with pytest.raises(SystemExit, match="is not set"):
        args_from_data(["--args-env"], {})
    assert main(["--args-file", str(tmp_path / "missing.json")]) == 2


# ---------------------------------------------------------------- one contract: entrypoint + args + env

STAGE_COMMANDS = ("plan", "bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo", "report")


def _image_entrypoint_and_cmd():
    """The stage image's ENTRYPOINT and CMD, read from docker/stages.Dockerfile (exec form)."""
    lines = (REPO / "docker" / "stages.Dockerfile").read_text().splitlines()
    entry = [x for x in lines if x.startswith("ENTRYPOINT ")][-1].removeprefix("ENTRYPOINT ")
    cmd = [x for x in lines if x.startswith("CMD ")][-1].removeprefix("CMD ")
    return json.loads(entry), json.loads(cmd)


def _local_task_call(monkeypatch, dag, command, plan_json):
    """What the local runner's task executes for this DAG run (its callable, in a real task context): the
    Popen argv and environment."""
    import s2d_runners as r
    from airflow.sdk.execution_time.context import set_current_context

    seen = {}

    class Proc:
        def __init__(self, argv, env=None, **_):
            seen.update(argv=argv, env=env)
            self.stdout = iter(['{"stage": "%s", "root": "x"}\n' % command])

        def wait(self):
            return 0

    task = dag.task_dict[command]
    monkeypatch.setattr(r.subprocess, "Popen", Proc)
    monkeypatch.setattr(r, "connection_env", lambda: {})
    with set_current_context(_context(PARAMS, plan_json)):
        task.python_callable(json.loads(plan_json) if plan_json else None)
    return seen["argv"], seen["env"]


@pytest.mark.parametrize("gpus", ["1", "4"])
def test_all_runners_send_the_same_command(monkeypatch, gpus):
    """For every stage: the local argv == image ENTRYPOINT + DockerOperator command == pod command + args, a
    constant; the arguments, the same data everywhere (S2D_ARGS_JSON); the same S2D_GPUS, with that many
    GPUs requested."""
    pytest.importorskip("airflow.providers.docker")
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    env = {"S2D_IMAGE": "registry.example/s2d:1.2", "S2D_GPUS_PER_TASK": gpus, "S2D_STAGE_PYTHON": "/opt/venv/bin/python"}
    docker_dag = load_dag(monkeypatch, "docker", **env)
    k8s_dag = load_dag(monkeypatch, "kubernetes", **env)
    local_dag = load_dag(monkeypatch, "local", **env)
    import s2d_contract as contract
    import s2d_table as table

    entrypoint, cmd = _image_entrypoint_and_cmd()
    assert entrypoint == list(contract.ENTRYPOINT) and cmd == ["--help"]  # the runners always override CMD
    want = contract.stage_argv()
    assert want == ["python", "-m", "stages", "--args-env"]
    for command in STAGE_COMMANDS:
        # plan computes the root itself; later tasks take root and parent run from plan's XCom
        plan = None if command == "plan" else PLAN
        root = contract.artifact_root(PARAMS, _DR.dag_id, _DR.run_id) if command == "plan" else "s3://b/runs/r"
        args = contract.stage_args(command, PARAMS, root, None if command == "plan" else "abc123")
        n = int(gpus) if command in table.GPU_STAGES else 0

        argv, local_env = _local_task_call(monkeypatch, local_dag, command, plan)
        assert argv == contract.stage_argv("/opt/venv/bin/python") and argv[1:] == want[1:]
        assert json.loads(local_env["S2D_ARGS_JSON"]) == args and local_env["S2D_GPUS"] == str(n)

        op = docker_dag.task_dict[command]
        sent = _container_call(monkeypatch, op, PARAMS, plan)
        assert entrypoint + sent["command"] == want and json.loads(sent["env"]["S2D_ARGS_JSON"]) == args
        assert sent["env"]["S2D_GPUS"] == str(n)
        assert (op.device_requests[0]["Count"] if op.device_requests else 0) == n

        c = _container_call(monkeypatch, k8s_dag.task_dict[command], PARAMS, plan)["pod"].spec.containers[0]
        assert all(isinstance(e.value, str) for e in c.env)  # the Kubernetes API takes strings only
        env_k8s = {e.name: e.value for e in c.env}
        assert c.command + c.args == want
        assert json.loads(env_k8s["S2D_ARGS_JSON"]) == args + ["--xcom-file", "/airflow/xcom/return.json"]
        assert env_k8s["S2D_GPUS"] == str(n)
        assert str((c.resources.limits or {}).get("nvidia.com/gpu", 0)) == str(n)


def test_kubernetes_stage_pod_security_and_shared_memory(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    dag = load_dag(monkeypatch, "kubernetes", S2D_K8S_IMAGE_PULL_SECRETS="regcred, other",
                   S2D_K8S_GPU_NODE_SELECTOR="node.kubernetes.io/instance-type=p5.48xlarge")
    pod = _container_call(monkeypatch, dag.task_dict["teacher_rl"], PARAMS, PLAN)["pod"]
    c = pod.spec.containers[0]
    assert c.security_context.run_as_non_root and c.security_context.allow_privilege_escalation is False
    assert [s.name for s in pod.spec.image_pull_secrets] == ["regcred", "other"]
    assert pod.spec.node_selector == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod.spec.service_account_name == "s2d-stage"
    assert any(m.mount_path == "/dev/shm" for m in c.volume_mounts)
    p = _container_call(monkeypatch, dag.task_dict["plan"], PARAMS, None)["pod"]
    assert not p.spec.node_selector and not p.spec.tolerations  # bookkeeping: no GPU node


def test_rendered_stage_pod_is_a_valid_kubernetes_pod(monkeypatch):
    """The pod a GPU stage task sends, built when it executes, validates against the Kubernetes API schema
    (strict): e.g. env values must be strings."""
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes.client import ApiClient

    dag = load_dag(monkeypatch, "kubernetes", S2D_GPUS_PER_TASK="2", MLFLOW_TRACKING_URI="http://mlflow:5000",
                   HF_HUB_OFFLINE="1")
    pod = _container_call(monkeypatch, dag.task_dict["teacher_rl"], PARAMS, PLAN)["pod"]
    pod = ApiClient().sanitize_for_serialization(pod)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["S2D_GPUS"] == "2" and env["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------- scheduled retraining


def test_schedules_folder(monkeypatch, tmp_path, caplog):
    """One DAG per schedule file, its conf the scheduled runs' values, its description the file's; a file
    that does not load has no DAG and is an import error of sparse_to_dense_schedules.py (what the UI's
    "Dag Import Errors" shows), naming the file and why, while every other DAG loads from its own file."""
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "weekly.yaml").write_text(
        'description: Weekly retrain\ncron: "0 3 * * 1"\n'
        'conf: {preset: tiny, teacher_rl_steps: 40, seed: 7, overrides: ["task.seed=99"]}\n')
    (tmp_path / "on-new-data.yaml").write_text("asset: s3://s2d-data/arithmetic/latest\nconf: {preset: tiny}\n")
    (tmp_path / "off.yaml.disabled").write_text('cron: "61 3 * * 1"\n')  # not read
    bad = {"bad-cron": ('cron: "61 3 * * 1"\nconf: {}\n', "cron '61 3 * * 1'"),
           "bad-value": ('cron: "0 3 * * 1"\nconf: {seed: -1}\n', "conf: seed:"),
           "bad-key": ('cron: "0 3 * * 1"\nconf: {steps: {teacher_rl: 3}}\n', "conf: steps not a parameter"),
           "bad-file-key": ('cron: "0 3 * * 1"\npaused: false\n', "paused: not a key of a schedule file"),
           "bad-description": ('cron: "0 3 * * 1"\ndescription: [a, b]\n', "description: a line of text"),
           "both": ('cron: "0 3 * * 1"\nasset: s3://x/y\n', "one of cron"),
           "refused": ('cron: "0 3 * * 1"\nconf: {overrides: ["models.teacher.trust_remote_code=true"]}\n', "loads code"),
           "not-yaml": ("cron: [unclosed\n", "not YAML")}
    for name, (text, _) in bad.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "short.yml").write_text('cron: "0 3 * * 1"\n')
    bad["short"] = (None, "end in .yaml")
    for k in ("S2D_ARTIFACT_ROOT", "S2D_ARTIFACT_BASE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("S2D_SCHEDULES", str(tmp_path))
    monkeypatch.syspath_prepend(str(DAGS))
    sys.modules.pop("sparse_to_dense", None)
    with caplog.at_level("ERROR"):
        bag = DagBag(dag_folder=str(DAGS))
    assert sorted(bag.dags) == ["sparse_to_dense", "sparse_to_dense__on-new-data", "sparse_to_dense__weekly"]
    assert list(bag.import_errors) == [str(DAGS / "sparse_to_dense_schedules.py")]  # no DAG lives in that file
    error = bag.import_errors[str(DAGS / "sparse_to_dense_schedules.py")]
    assert f"{len(bad)} schedule files not loaded" in error
    for name, (_, why) in bad.items():
        line = next(x for x in error.splitlines() if f"/{name}.y" in x)
        assert why in line, (name, line)
        assert f"{name}.y" in caplog.text  # and in the DAG processor's log
    dag, weekly = bag.dags["sparse_to_dense"], bag.dags["sparse_to_dense__weekly"]
    assert weekly.description == "Weekly retrain"
    assert type(weekly.timetable).__name__ == "CronTriggerTimetable" and weekly.timetable.expression == "0 3 * * 1"
    assert weekly.catchup is False and weekly.max_active_runs == 1
    values = weekly.params.validate()
    assert values["teacher_rl_steps"] == 40 and values["seed"] == 7 and values["overrides"] == ["task.seed=99"]
    assert values["stages"] == dag.params["stages"]  # everything else: the form's defaults
    assert weekly.params.get_param("seed").schema["title"] == "Seed"  # the same form, other defaults
    assert set(weekly.task_ids) == set(dag.task_ids)
    data = bag.dags["sparse_to_dense__on-new-data"]
    assert type(data.timetable).__name__ == "AssetTriggeredTimetable"
    assert "s3://s2d-data/arithmetic/latest" in str(data.timetable.asset_condition)
    assert data.description == "Scheduled retraining from on-new-data.yaml"


def test_the_shipped_example_schedule(monkeypatch, tmp_path):
    """dags/schedules/example.yaml.disabled is not read as shipped; copied to <name>.yaml it loads, every
    key honoured."""
    assert not list((DAGS / "schedules").glob("*.yaml"))  # nothing runs by default
    (tmp_path / "nightly.yaml").write_text((DAGS / "schedules" / "example.yaml.disabled").read_text())
    load_dag(monkeypatch, S2D_SCHEDULES=str(tmp_path))  # asserts no import error
    import sparse_to_dense as m

    nightly = m.scheduled_dags(tmp_path)["sparse_to_dense__nightly"]
    assert nightly.description == "Nightly tiny retrain (example)" and nightly.timetable.expression == "0 2 * * *"
    values = nightly.params.validate()
    assert values["preset"] == "tiny" and values["teacher_rl_steps"] == 20 and values["seed"] == 1


def test_no_surprise_run_for_the_last_missed_slot(monkeypatch, tmp_path):
    """With catchup off, Airflow's cron timetable still proposes the most recent past slot when a
    schedule is switched on: plan skips such a late run, and a skipped plan skips every task."""
    import datetime

    from airflow.sdk.exceptions import AirflowSkipException
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable
    from airflow.timetables.base import TimeRestriction

    (tmp_path / "weekly.yaml").write_text('cron: "0 3 * * 1"\nconf: {}\n')
    load_dag(monkeypatch, S2D_SCHEDULES=str(tmp_path))
    import s2d_schedules as r
    import sparse_to_dense as m

    dag = m.scheduled_dags(tmp_path)["sparse_to_dense__weekly"]
    now = datetime.datetime.now(datetime.timezone.utc)
    # what the scheduler does on enable: the core timetable (the DAG's, serialized) proposes a past slot
    core = decode_timetable(encode_timetable(dag.timetable))
    first = core.next_dagrun_info(last_automated_data_interval=None,
                                  restriction=TimeRestriction(earliest=dag.start_date, latest=None, catchup=False))
    assert first.run_after <= now  # the "surprise" run Airflow would start at once

    class Run:
        def __init__(self, run_type, run_after):
            self.run_type, self.run_after, self.logical_date = run_type, run_after, run_after

    with pytest.raises(AirflowSkipException, match="missed slot"):
        r.skip_missed_slot({"dag_run": Run("scheduled", now - datetime.timedelta(hours=2))})
    r.skip_missed_slot({"dag_run": Run("scheduled", now - datetime.timedelta(minutes=1))})  # on time: runs
    r.skip_missed_slot({"dag_run": Run("manual", now - datetime.timedelta(days=9))})  # a trigger is never late
    monkeypatch.setenv("S2D_MISSED_SLOT_GRACE_MINUTES", "600")
    r.skip_missed_slot({"dag_run": Run("scheduled", now - datetime.timedelta(hours=2))})
    t = dag.task_dict
    assert t["plan"]._pre_execute_hook is r.skip_missed_slot
    # a skipped plan skips the rest: every task waits for plan, directly or not, with rules that skip
    # when nothing upstream succeeded
    assert t["bootstrap"].trigger_rule == "all_success"
    for name in ("teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo", "report"):
        assert t[name].trigger_rule == "none_failed_min_one_success" and "plan" in t[name].upstream_task_ids


@pytest.mark.parametrize("runner", ["local", "docker", "kubernetes"])
def test_final_student_asset_event_for_every_runner(monkeypatch, runner):
    """The report task's asset event names the final student, whatever the runner (one hook)."""
    pytest.importorskip("airflow.providers.docker")
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    dag = load_dag(monkeypatch, runner)
    import s2d_contract as contract
    import s2d_runners as r

    report = dag.task_dict["report"]
    assert report._post_execute_hook is r.final_student_event
    assert [a.uri for a in report.outlets] == [contract.FINAL_STUDENT_URI]
    summary = {"final_student": "s3://b/r/student_rl/model", "teacher": "s3://b/r/teacher_rl/model", "headline": "x"}
    for result in (summary, "log line\n" + json.dumps(summary) + "\n"):  # a dict (local, pod) or printed text (docker)
        events = OutletEventAccessors()
        r.final_student_event({"outlet_events": events}, result)
        assert events[Asset(contract.FINAL_STUDENT_URI)].extra == {"uri": summary["final_student"], "teacher": summary["teacher"]}
