"""The Airflow DAG: integrity, the trigger form, and the container runners' specs rendered offline."""

import json
import subprocess
import sys
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
    assert set(dag.task_ids) == {"plan", "bootstrap", "teacher_rl", "teacher_data", "kl_warmup", "onpolicy_distill",
                                 "student_rl", "direct_grpo", "report", "close-runs"}
    t = dag.task_dict
    assert t["close-runs"].is_teardown and t["close-runs"].upstream_task_ids == {"plan", "report"}
    assert t["teacher_data"].upstream_task_ids == {"plan", "teacher_rl"}  # skipped unless kl_warmup.form is topk
    assert t["kl_warmup"].upstream_task_ids == {"plan", "teacher_data"}
    assert t["direct_grpo"].upstream_task_ids == {"plan", "bootstrap"}
    assert t["report"].upstream_task_ids == {"plan", "student_rl", "direct_grpo"}
    for name in ("bootstrap", "teacher_rl", "student_rl", "direct_grpo"):
        assert t[name].pool == "gpu" and t[name].retries == 2 and t[name].execution_timeout is not None
        assert t[name].retry_exponential_backoff
    assert t["plan"].pool == "default_pool"
    assert [a.uri for a in t["report"].outlets] == ["s2d://sparse_to_dense/final_student"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # no schedule unless deployment config sets one


def test_schedule_is_deployment_configuration(monkeypatch):
    dag = load_dag(monkeypatch, S2D_SCHEDULE="0 3 * * 1")
    assert dag.timetable.expression == "0 3 * * 1"


@pytest.mark.parametrize("conf, bad", [
    ({"preset": "gpt-9"}, "preset"),
    ({"stages": ["teacher_rl", "teacher_rl"]}, "stages"),
    ({"stages": ["sft"]}, "stages"),
    ({"seed": -1}, "seed"),
    ({"steps": {"teacher_rl": -5}}, "steps"),
    ({"steps": {"pretrain": 5}}, "steps"),
    ({"artifact_root": "gs://bucket/x"}, "artifact_root"),
    ({"overrides": ["no equals sign"]}, "overrides"),
])
def test_invalid_params_are_refused_by_the_form(monkeypatch, conf, bad):
    dag = load_dag(monkeypatch)
    with pytest.raises(Exception) as e:
        _with_conf(dag, conf).validate()
    assert bad in str(e.value)


def test_valid_params_pass(monkeypatch):
    dag = load_dag(monkeypatch)
    conf = {"preset": "qwen3-1.7b", "stages": ["teacher_rl", "onpolicy_distill"], "steps": {"teacher_rl": 10},
            "artifact_root": "s3://my-bucket/runs/x", "teacher": "Qwen/Qwen3-8B"}
    assert _with_conf(dag, conf).validate()["steps"] == {"teacher_rl": 10}


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
          "baseline": True, "seed": 3, "steps": {"teacher_rl": 7}, "artifact_root": None, "overrides": []}
PLAN = json.dumps({"root": "s3://b/runs/r", "parent_run_id": "abc123", "stages": []})


def test_docker_runner_spec(monkeypatch):
    pytest.importorskip("airflow.providers.docker")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dag = load_dag(monkeypatch, "docker", S2D_IMAGE="registry.example/s2d:1.2", AWS_SECRET_ACCESS_KEY="s3cr3t",
                   MLFLOW_TRACKING_URI="http://mlflow:5000")
    import s2d_runners as r

    op = dag.task_dict["teacher_rl"]
    assert type(op).__name__ == "DockerOperator" and op.image == "registry.example/s2d:1.2"
    assert op.device_requests[0]["Capabilities"] == [["gpu"]] and op.device_requests[0]["Count"] == 1
    assert op.skip_on_exit_code == [r.NOT_PLANNED] or op.skip_on_exit_code == r.NOT_PLANNED or r.NOT_PLANNED in op.skip_on_exit_code
    rendered = _render(op, dag, PARAMS, PLAN)
    # the same contract as the local runner: identical arguments
    assert rendered["command"] == r.stage_args("teacher_rl", PARAMS, "s3://b/runs/r", "abc123")
    assert "environment" not in rendered  # not a template: native rendering would turn "1" into 1
    assert op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", **r.stage_env("teacher_rl")}
    assert "s3cr3t" not in json.dumps(rendered, default=str)  # secrets never rendered
    assert op._private_environment == {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}  # passed to the container only
    assert "private_environment" not in op.template_fields
    assert dag.task_dict["plan"].device_requests is None  # no GPU for bookkeeping tasks


def test_kubernetes_runner_spec(monkeypatch):
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    dag = load_dag(monkeypatch, "kubernetes", S2D_IMAGE="registry.example/s2d:1.2", AWS_SECRET_ACCESS_KEY="s3cr3t")
    import s2d_runners as r

    op = dag.task_dict["onpolicy_distill"]
    assert type(op).__name__ == "KubernetesPodOperator"
    op.arguments = _render(op, dag, PARAMS, PLAN)["arguments"]
    pod = op.build_pod_request_obj(context=None, dry_run=True)  # rendered offline, no cluster
    c = pod.spec.containers[0]
    assert c.image == "registry.example/s2d:1.2" and c.command == ["python", "-m", "stages"]
    assert c.args == r.stage_args("onpolicy_distill", PARAMS, "s3://b/runs/r", "abc123") + ["--xcom-file", "/airflow/xcom/return.json"]
    assert str(c.resources.limits["nvidia.com/gpu"]) == "1"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and pod.spec.node_selector
    assert c.env_from[0].secret_ref.name == "s2d-credentials"
    assert "s3cr3t" not in json.dumps(pod.to_dict(), default=str)  # credentials come from the Secret only


def test_stage_command_contract_is_the_cli(monkeypatch):
    """What the DAG sends is accepted by the stage CLI's parser, every stage."""
    monkeypatch.syspath_prepend(str(DAGS))
    import s2d_runners as r

    from stages.__main__ import parse_args

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


@pytest.mark.parametrize("gpus", ["1", "4"])
def test_all_runners_send_the_same_command(monkeypatch, gpus):
    """For every stage: local argv == image ENTRYPOINT + DockerOperator command == pod command + args,
    and the same S2D_GPUS, with that many GPUs requested."""
    pytest.importorskip("airflow.providers.docker")
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    env = {"S2D_IMAGE": "registry.example/s2d:1.2", "S2D_GPUS_PER_TASK": gpus, "S2D_STAGE_PYTHON": "/opt/venv/bin/python"}
    docker_dag = load_dag(monkeypatch, "docker", **env)
    k8s_dag = load_dag(monkeypatch, "kubernetes", **env)
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
