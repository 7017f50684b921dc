"""The Airflow DAG: integrity, the trigger form, and the container runners' specs rendered offline."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

airflow = pytest.importorskip("airflow", reason="the DAG tests need the 'airflow' extra (pip install -e '.[airflow]')")

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


def load_dag(monkeypatch, runner="local", **env):
    from airflow.dag_processing.dagbag import DagBag

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
    code = f"import sys; sys.path.insert(0, {str(DAGS)!r}); import sparse_to_dense; " \
           "bad = [m for m in ('torch', 'transformers', 'mlflow', 'stages') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dag_shape(monkeypatch):
    dag = load_dag(monkeypatch)
    assert set(dag.task_ids) == {"plan", "bootstrap", "import", "prune", "teacher_rl", "teacher_data", "kl_warmup", "onpolicy_distill",
                                 "student_rl", "direct_grpo", "report", "close-runs"}
    t = dag.task_dict
    assert t["close-runs"].is_teardown and t["close-runs"].upstream_task_ids == {"plan", "report"}
    assert t["teacher_data"].upstream_task_ids == {"plan", "teacher_rl"}  # skipped unless kl_warmup.form is topk
    assert t["kl_warmup"].upstream_task_ids == {"plan", "teacher_data"}
    assert t["prune"].upstream_task_ids == {"plan", "import"}  # setup: bootstrap -> import -> prune
    assert t["direct_grpo"].upstream_task_ids == {"plan", "prune"}
    assert t["report"].upstream_task_ids == {"plan", "student_rl", "direct_grpo"}
    for name in ("bootstrap", "teacher_rl", "student_rl", "direct_grpo"):
        assert t[name].pool == "gpu" and t[name].retries == 2 and t[name].execution_timeout is not None
        assert t[name].retry_exponential_backoff
    assert t["plan"].pool == "default_pool"
    assert [a.uri for a in t["report"].outlets] == ["s2d://sparse_to_dense/final_student"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # no schedule unless deployment config sets one


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
    import s2d_runners as r

    schema = {k: p.schema for k, p in dag.params.items()}
    for stage in r.STEP_STAGES:
        assert schema[f"{stage}_steps"]["type"] == ["null", "integer"] and schema[f"{stage}_steps"]["minimum"] == 0
    stages = schema["stages"]
    assert "array" in stages["type"] and stages["examples"] == stages["items"]["enum"]  # renders as a multi-select
    assert set(stages["values_display"]) == set(stages["examples"])
    for name in ("teacher", "student", "artifact_root", "overrides", *(f"{s}_steps" for s in r.STEP_STAGES)):
        assert "null" in schema[name]["type"], name
    for name, s in schema.items():
        assert s.get("title") and s.get("section"), name
    assert "steps" not in schema  # no JSON editor


def test_valid_params_pass(monkeypatch):
    dag = load_dag(monkeypatch, S2D_ARTIFACT_ROOT="s3://my-bucket/runs")
    import s2d_runners as r
    import sparse_to_dense as m

    conf = {"preset": "qwen3-1.7b", "stages": ["teacher_rl", "onpolicy_distill"], "teacher_rl_steps": 10,
            "artifact_root": "s3://my-bucket/runs/x", "teacher": "Qwen/Qwen3-8B", "overrides": ["teacher_rl.group_size=4"]}
    params = _with_conf(dag, conf).validate()
    assert r.refusal(params, m.FORM) is None
    assert "teacher_rl.steps=10" in r.overrides(params) and not any(o.startswith("kl_warmup.steps") for o in r.overrides(params))


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
    dag = load_dag(monkeypatch, S2D_ARTIFACT_ROOT=str(base))
    import s2d_runners as r
    import sparse_to_dense as m

    conf = {k: v.replace("{base}", str(base)) if isinstance(v, str) else v for k, v in conf.items()}
    params = _with_conf(dag, conf)
    values = {k: params[k] for k in params}  # unknown conf keys arrive as plain values, as in a DagRun
    problem = r.refusal(values, m.FORM)
    assert problem and said in problem and "\n" not in problem
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="^error: "):  # fails without retries
        r.task_args("plan", values, m.FORM, "sparse_to_dense", "manual__1", None)


def test_trigger_allowed_inside_the_base_and_deployment_allow_lists(monkeypatch, tmp_path):
    base = tmp_path / "runs"
    (tmp_path / "link").symlink_to("/etc")
    dag = load_dag(monkeypatch, S2D_ARTIFACT_ROOT=str(base), S2D_WORKDIR=str(tmp_path))
    import s2d_runners as r
    import sparse_to_dense as m

    ok = _with_conf(dag, {"artifact_root": "runs/mine", "student": f"{base}/x/kl_warmup/model",
                          "overrides": ["teacher_rl.steps=3", "models.teacher.source=models:/s2d-teacher/2"]}).validate()
    assert r.refusal(ok, m.FORM) is None
    assert r.task_args("plan", ok, m.FORM, "sparse_to_dense", "r1")[:5] == ["plan", "--config", "tiny", "--root", "runs/mine"]
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
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "S2D_ARTIFACT_ROOT": str(base), "S2D_WORKDIR": str(tmp_path),
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
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([c for c, _ in cases])], env=env, capture_output=True, text=True, timeout=600)
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


def _render(op, dag, params, plan_json):
    """Render an operator's templated fields offline, as the worker would (native objects)."""
    class TI:
        def xcom_pull(self, task_ids=None, **_):
            return plan_json

    class DR:
        dag_id, run_id = "sparse_to_dense", "manual__2026-11-26T00:00:00+00:00"

    ctx = {"params": params, "dag_run": DR(), "ti": TI(), "dag": dag}
    env = dag.get_template_env(force_sandboxed=False)
    return {f: op.render_template(getattr(op, f), ctx, env) for f in op.template_fields if getattr(op, f, None) is not None}


PARAMS = {"preset": "tiny", "teacher": None, "student": None, "stages": ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"],
          "baseline": True, "seed": 3, "teacher_rl_steps": 7, "kl_warmup_steps": None, "onpolicy_distill_steps": None,
          "student_rl_steps": None, "direct_grpo_steps": None, "artifact_root": None, "overrides": []}
PLAN = json.dumps({"root": "s3://b/runs/r", "parent_run_id": "abc123", "stages": []})


def test_docker_runner_spec(monkeypatch):
    pytest.importorskip("airflow.providers.docker")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dag = load_dag(monkeypatch, "docker", S2D_IMAGE="registry.example/s2d:1.2", AWS_SECRET_ACCESS_KEY="s3cr3t",
                   MLFLOW_TRACKING_URI="http://mlflow:5000")
    import s2d_runners as r

    op = dag.task_dict["teacher_rl"]
    from airflow.providers.docker.operators.docker import DockerOperator

    assert isinstance(op, DockerOperator) and op.image == "registry.example/s2d:1.2"
    assert op.device_requests[0]["Capabilities"] == [["gpu"]] and op.device_requests[0]["Count"] == 1
    assert op.skip_on_exit_code == [r.NOT_PLANNED] or op.skip_on_exit_code == r.NOT_PLANNED or r.NOT_PLANNED in op.skip_on_exit_code
    rendered = _render(op, dag, PARAMS, PLAN)
    # the same contract as the local runner: identical arguments
    assert rendered["command"] == r.stage_args("teacher_rl", PARAMS, "s3://b/runs/r", "abc123")
    assert "environment" not in rendered  # not a template: native rendering would turn "1" into 1
    assert op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", **r.stage_env("teacher_rl")}
    assert "s3cr3t" not in json.dumps(rendered, default=str)  # secrets never rendered
    assert "s3cr3t" not in repr(vars(op))  # handed over at execute, as a mounted file (tests/test_containers.py)
    assert "private_environment" not in op.template_fields
    assert dag.task_dict["plan"].device_requests is None  # no GPU for bookkeeping tasks


def test_kubernetes_runner_spec(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    dag = load_dag(monkeypatch, "kubernetes", S2D_IMAGE="registry.example/s2d:1.2", AWS_SECRET_ACCESS_KEY="s3cr3t")
    import s2d_runners as r
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    op = dag.task_dict["onpolicy_distill"]
    assert isinstance(op, KubernetesPodOperator)
    op.arguments = _render(op, dag, PARAMS, PLAN)["arguments"]
    pod = op.build_pod_request_obj(context=None, dry_run=True)  # rendered offline, no cluster
    c = pod.spec.containers[0]
    assert c.image == "registry.example/s2d:1.2" and c.command == ["python", "-m", "stages"]
    assert c.args == r.stage_args("onpolicy_distill", PARAMS, "s3://b/runs/r", "abc123") + ["--xcom-file", "/airflow/xcom/return.json"]
    assert str(c.resources.limits["nvidia.com/gpu"]) == "1"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and pod.spec.node_selector
    assert c.env_from[0].secret_ref.name == "s2d-credentials"
    assert "s3cr3t" not in json.dumps(pod.to_dict(), default=str)  # credentials come from the Secret only

    # at execute time the pod also gets the task try's identity (MLflow tags; the stage lock knows its
    # own killed previous try): the pod the operator would create, captured where the cluster call starts
    seen = []
    monkeypatch.setattr(KubernetesPodOperator, "execute",
                        lambda self, context: seen.append(self.build_pod_request_obj(context=None, dry_run=True)))
    before = list(op.env_vars)
    ti = types.SimpleNamespace(dag_id="sparse_to_dense", run_id="manual__7", task_id="onpolicy_distill", try_number=2)
    op.execute({"ti": ti})
    env = {e.name: e.value for e in seen[0].spec.containers[0].env}
    assert env["AIRFLOW_CTX_DAG_RUN_ID"] == "manual__7" and env["AIRFLOW_CTX_TASK_ID"] == "onpolicy_distill"
    assert env["AIRFLOW_CTX_TRY_NUMBER"] == "2" and op.env_vars == before  # the DAG's operator is unchanged


def test_stage_command_contract_is_the_cli(monkeypatch):
    """What the DAG sends is accepted by the stage CLI's parser, every stage."""
    monkeypatch.syspath_prepend(str(DAGS))
    import s2d_runners as r

    from stages.cli import parse_args

    for cmd in ("plan", *r.GPU_STAGES, "report", "close-runs"):
        args = parse_args(r.stage_args(cmd, PARAMS, "runs/x", "pid"))
        assert args.command == cmd and args.root == "runs/x" and args.parent_run_id == "pid"
        assert "teacher_rl.steps=7" in args.overrides and "seed=3" in args.overrides


# ---------------------------------------------------------------- one contract: entrypoint + args + env

STAGE_COMMANDS = ("plan", "bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo", "report")


def _image_entrypoint():
    """The stage image's ENTRYPOINT, read from docker/stages.Dockerfile (exec form)."""
    lines = [x for x in (REPO / "docker" / "stages.Dockerfile").read_text().splitlines() if x.startswith("ENTRYPOINT ")]
    return json.loads(lines[-1].removeprefix("ENTRYPOINT "))


def _local_argv_env(monkeypatch, command, args):
    """What the local runner executes: its Popen argv and environment, captured without running it."""
    import s2d_runners as r

    seen = {}

    class Proc:
        def __init__(self, argv, env=None, **_):
            seen.update(argv=argv, env=env)
            self.stdout = iter(['{"stage": "%s"}\n' % command])

        def wait(self):
            return 0

    monkeypatch.setattr(r.subprocess, "Popen", Proc)
    monkeypatch.setattr(r, "connection_env", lambda: {})
    r.run_local(args, {})
    return seen["argv"], seen["env"]


def _local_task_argv(monkeypatch, dag, command, plan_json):
    """What the local runner's task itself executes for this DAG run (its callable, the Popen argv)."""
    import s2d_runners as r

    seen = {}

    class Proc:
        def __init__(self, argv, **_):
            seen["argv"] = argv
            self.stdout = iter(['{"stage": "%s", "root": "x"}\n' % command])

        def wait(self):
            return 0

    class DR:
        dag_id, run_id = "sparse_to_dense", "manual__2026-11-26T00:00:00+00:00"

    class TI:
        dag_id, run_id, task_id, try_number = DR.dag_id, DR.run_id, "task", 1

    task = dag.task_dict[command]
    ctx = {"params": PARAMS, "dag_run": DR(), "ti": TI(), "outlet_events": {}}
    monkeypatch.setitem(task.python_callable.__globals__, "get_current_context", lambda: ctx)
    monkeypatch.setattr(r.subprocess, "Popen", Proc)
    monkeypatch.setattr(r, "connection_env", lambda: {})
    task.python_callable(json.loads(plan_json) if plan_json else None)
    return seen["argv"]


@pytest.mark.parametrize("gpus", ["1", "4"])
def test_all_runners_send_the_same_command(monkeypatch, gpus):
    """For every stage: local argv == image ENTRYPOINT + DockerOperator command == pod command + args,
    and the same S2D_GPUS, with that many GPUs requested."""
    pytest.importorskip("airflow.providers.docker")
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    env = {"S2D_IMAGE": "registry.example/s2d:1.2", "S2D_GPUS_PER_TASK": gpus, "S2D_STAGE_PYTHON": "/opt/venv/bin/python"}
    docker_dag = load_dag(monkeypatch, "docker", **env)
    k8s_dag = load_dag(monkeypatch, "kubernetes", **env)
    local_dag = load_dag(monkeypatch, "local", **env)
    import s2d_runners as r

    entrypoint = _image_entrypoint()
    assert entrypoint == list(r.ENTRYPOINT)
    for command in STAGE_COMMANDS:
        # plan computes the root itself; later tasks take root and parent run from plan's XCom
        root = r.artifact_root(PARAMS, "sparse_to_dense", "manual__2026-11-26T00:00:00+00:00") if command == "plan" else "s3://b/runs/r"
        args = r.stage_args(command, PARAMS, root, None if command == "plan" else "abc123")
        want = r.stage_argv(args)
        n = int(gpus) if command in r.GPU_STAGES else 0

        argv, local_env = _local_argv_env(monkeypatch, command, args)
        assert argv == r.stage_argv(args, "/opt/venv/bin/python") and argv[1:] == want[1:]
        assert local_env["S2D_GPUS"] == str(n)
        # the local task computes its arguments like the container runners' template (one function)
        assert _local_task_argv(monkeypatch, local_dag, command, None if command == "plan" else PLAN)[1:] == want[1:]

        op = docker_dag.task_dict[command]
        rendered = _render(op, docker_dag, PARAMS, None if command == "plan" else PLAN)
        assert entrypoint + rendered["command"] == want
        assert op.environment["S2D_GPUS"] == str(n)
        assert (op.device_requests[0]["Count"] if op.device_requests else 0) == n

        op = k8s_dag.task_dict[command]
        for field, value in _render(op, k8s_dag, PARAMS, None if command == "plan" else PLAN).items():
            setattr(op, field, value)  # every template field rendered, as the worker does
        c = op.build_pod_request_obj(context=None, dry_run=True).spec.containers[0]
        assert all(isinstance(e.value, str) for e in c.env)  # the Kubernetes API takes strings only
        assert c.command + c.args == want + ["--xcom-file", "/airflow/xcom/return.json"]
        assert {e.name: e.value for e in c.env}["S2D_GPUS"] == str(n)
        assert str((c.resources.limits or {}).get("nvidia.com/gpu", 0)) == str(n)


def test_kubernetes_stage_pod_security_and_shared_memory(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    dag = load_dag(monkeypatch, "kubernetes", S2D_K8S_IMAGE_PULL_SECRETS="regcred, other",
                   S2D_K8S_GPU_NODE_SELECTOR="node.kubernetes.io/instance-type=p5.48xlarge")
    op = dag.task_dict["teacher_rl"]
    op.arguments = _render(op, dag, PARAMS, PLAN)["arguments"]
    pod = op.build_pod_request_obj(context=None, dry_run=True)
    c = pod.spec.containers[0]
    assert c.security_context.run_as_non_root and c.security_context.allow_privilege_escalation is False
    assert [s.name for s in pod.spec.image_pull_secrets] == ["regcred", "other"]
    assert pod.spec.node_selector == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod.spec.service_account_name == "s2d-stage"
    assert any(m.mount_path == "/dev/shm" for m in c.volume_mounts)
    plan_pod = dag.task_dict["plan"]
    plan_pod.arguments = _render(plan_pod, dag, PARAMS, None)["arguments"]
    p = plan_pod.build_pod_request_obj(context=None, dry_run=True)
    assert not p.spec.node_selector and not p.spec.tolerations  # bookkeeping: no GPU node


def test_rendered_stage_pod_is_a_valid_kubernetes_pod(monkeypatch):
    """The pod a GPU stage task sends, every template field rendered as the worker does, validates
    against the Kubernetes API schema (strict): e.g. env values must be strings."""
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes.client import ApiClient

    dag = load_dag(monkeypatch, "kubernetes", S2D_GPUS_PER_TASK="2", MLFLOW_TRACKING_URI="http://mlflow:5000",
                   HF_HUB_OFFLINE="1")
    op = dag.task_dict["teacher_rl"]
    for field, value in _render(op, dag, PARAMS, PLAN).items():
        setattr(op, field, value)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context=None, dry_run=True))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["S2D_GPUS"] == "2" and env["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------- scheduled retraining


def test_schedules_folder(monkeypatch, tmp_path, caplog):
    """One DAG per schedule file, its conf the scheduled runs' values; a bad file is logged and
    ignored while every other DAG still loads."""
    (tmp_path / "weekly.yaml").write_text(
        'cron: "0 3 * * 1"\nconf: {preset: tiny, teacher_rl_steps: 40, seed: 7, overrides: ["task.seed=99"]}\n')
    (tmp_path / "on-new-data.yaml").write_text("asset: s3://s2d-data/arithmetic/latest\nconf: {preset: tiny}\n")
    (tmp_path / "bad-cron.yaml").write_text('cron: "61 3 * * 1"\nconf: {}\n')
    (tmp_path / "bad-value.yaml").write_text('cron: "0 3 * * 1"\nconf: {seed: -1}\n')
    (tmp_path / "bad-key.yaml").write_text('cron: "0 3 * * 1"\nconf: {steps: {teacher_rl: 3}}\n')
    (tmp_path / "refused.yaml").write_text('cron: "0 3 * * 1"\nconf: {overrides: ["models.teacher.trust_remote_code=true"]}\n')
    (tmp_path / "not-yaml.yaml").write_text("cron: [unclosed\n")
    with caplog.at_level("ERROR"):
        dag = load_dag(monkeypatch, S2D_SCHEDULES=str(tmp_path))  # asserts import_errors == {}
    import sparse_to_dense as m

    dags = m.scheduled_dags(tmp_path)
    assert sorted(dags) == ["sparse_to_dense__on-new-data", "sparse_to_dense__weekly"]
    weekly = dags["sparse_to_dense__weekly"]
    assert type(weekly.timetable).__name__ == "CronTriggerTimetable" and weekly.timetable.expression == "0 3 * * 1"
    assert weekly.catchup is False and weekly.max_active_runs == 1
    values = weekly.params.validate()
    assert values["teacher_rl_steps"] == 40 and values["seed"] == 7 and values["overrides"] == ["task.seed=99"]
    assert values["stages"] == dag.params["stages"]  # everything else: the form's defaults
    assert weekly.params.get_param("seed").schema["title"] == "Seed"  # the same form, other defaults
    assert set(weekly.task_ids) == set(dag.task_ids)
    data = dags["sparse_to_dense__on-new-data"]
    assert type(data.timetable).__name__ == "AssetTriggeredTimetable"
    assert "s3://s2d-data/arithmetic/latest" in str(data.timetable.asset_condition)
    logged = caplog.text
    for name, why in [("bad-cron", "61 3 * * 1"), ("bad-value", "-1"), ("bad-key", "steps"), ("refused", "loads code"),
                      ("not-yaml", "")]:
        assert f"{name}.yaml ignored" in logged and why in logged, name


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
    import s2d_runners as r
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
    import s2d_runners as r

    report = dag.task_dict["report"]
    assert report._post_execute_hook is r.final_student_event
    assert [a.uri for a in report.outlets] == [r.FINAL_STUDENT_URI]
    summary = {"final_student": "s3://b/r/student_rl/model", "teacher": "s3://b/r/teacher_rl/model", "headline": "x"}
    for result in (summary, "log line\n" + json.dumps(summary) + "\n"):  # a dict (local, pod) or printed text (docker)
        events = OutletEventAccessors()
        r.final_student_event({"outlet_events": events}, result)
        assert events[Asset(r.FINAL_STUDENT_URI)].extra == {"uri": summary["final_student"], "teacher": summary["teacher"]}
