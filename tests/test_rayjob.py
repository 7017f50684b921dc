"""Runner ``rayjob`` (dags/s2d_rayjob.py): the rendered RayJob against KubeRay's CRD schema (vendored,
checked strictly: an unknown key is an error, as with ``kubectl --validate=strict``), the job-state
handling on recorded status objects, and the create / sensor / trigger / delete tasks against a small
HTTP server speaking the Kubernetes API for ``rayjobs`` (a real cluster cannot run here). A few seconds.
"""

import asyncio
import copy
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("airflow", reason="the DAG tests need the 'airflow' extra")
REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
SCHEMA = REPO / "infra/k8s/schemas/ray.io_rayjob_v1.schema.json"
sys.path.insert(0, str(DAGS))

import s2d_contract as contract  # noqa: E402
import s2d_rayjob as rj  # noqa: E402
import s2d_settings  # noqa: E402
import s2d_table as table  # noqa: E402

SECRETS = {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-value", "MLFLOW_TRACKING_PASSWORD": "sekrit-mlflow-value",
           "HF_TOKEN": "hf_sekrit_value"}
ARGS = ["teacher_rl", "--config", "llama3.1-8b", "--root", "s3://bucket/runs/x", "--set", "seed=0",
        "--set", "workflow.stages=[teacher_rl,kl_warmup]", "--parent-run-id", "abc", "--if-planned"]

# Status objects as KubeRay v1.7 writes them (ray-operator/apis/ray/v1/rayjob_types.go: JobStatus,
# JobDeploymentStatus, JobFailedReason), one per state the sensor must handle.
BASE_STATUS = {"rayClusterName": "s2d-teacher-rl-1234567890-abcde", "jobId": "s2d-teacher-rl-1234567890-xyz",
               "dashboardURL": "s2d-teacher-rl-1234567890-head-svc.s2d.svc.cluster.local:8265",
               "startTime": "2026-11-27T08:00:00Z", "observedGeneration": 1}
STATUS = {
    "missing": None,
    "initializing": {**BASE_STATUS, "jobDeploymentStatus": "Initializing"},
    "pending": {**BASE_STATUS, "jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
    "running": {**BASE_STATUS, "jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    "retrying": {**BASE_STATUS, "jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1},
    "suspended": {**BASE_STATUS, "jobDeploymentStatus": "Suspended"},
    "succeeded": {
        **BASE_STATUS,
        "jobDeploymentStatus": "Complete",
        "jobStatus": "SUCCEEDED",
        "succeeded": 1,
        "endTime": "2026-11-27T09:00:00Z",
    },
    "failed": {
        **BASE_STATUS,
        "jobDeploymentStatus": "Failed",
        "jobStatus": "FAILED",
        "failed": 1,
        "reason": "AppFailed",
        "message": "Job entrypoint command failed with exit code 1, last available logs: error: teacher_rl failed on Ray Train",
        "endTime": "2026-11-27T09:00:00Z",
    },
    "deadline": {
        **BASE_STATUS,
        "jobDeploymentStatus": "Failed",
        "reason": "DeadlineExceeded",
        "message": "The RayJob has passed the activeDeadlineSeconds. StartTime: 2026-11-27T08:00:00Z. "
                   "ActiveDeadlineSeconds: 86400",
    },
    "invalid": {
        "jobDeploymentStatus": "ValidationFailed",
        "reason": "ValidationFailed",
        "message": "The RayJob spec is invalid: entrypoint is required",
    },
}


def strict(schema):
    """The CRD schema with every object closed (``additionalProperties: false``) unless it says it keeps
    unknown fields: what the API server's strict field validation does with a structural schema."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    import jsonschema

    return jsonschema.Draft7Validator(strict(json.loads(SCHEMA.read_text())))


@pytest.fixture
def settings(monkeypatch):
    for k, v in {**SECRETS, "S2D_RAYJOB_NODES": "2", "S2D_GPUS_PER_TASK": "8", "S2D_KUEUE_QUEUE": "team-a",
                 "S2D_IMAGE": "ghcr.io/sparse-to-dense/stages:0.1.0-ray", "S2D_STAGE_TIMEOUT_HOURS": "12",
                 "MLFLOW_TRACKING_URI": "http://mlflow.s2d:5000"}.items():
        monkeypatch.setenv(k, v)


def spec(name="s2d-teacher-rl-0123456789"):
    return rj.rayjob_spec("teacher_rl", ARGS, name)


def test_rendered_rayjob_matches_the_crd_schema(settings, validator):
    job = spec()
    validator.validate(job)
    s = job["spec"]
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] == 600
    assert s["activeDeadlineSeconds"] == 12 * 3600
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # the one contract: the entrypoint is the constant command line the other runners run; the arguments
    # are data in the pods' environment (KubeRay and Ray run the entrypoint through `sh -c`)
    assert s["entrypoint"] == " ".join(contract.stage_argv()) == "python -m stages --args-env"
    assert "runtimeEnvYAML" not in s and "metadata" not in s
    head = s["rayClusterSpec"]["headGroupSpec"]
    group, = s["rayClusterSpec"]["workerGroupSpecs"]
    assert head["rayStartParams"] == {"num-cpus": "0"}  # no rank on the head
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8" and worker["image"].endswith("-ray")
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["S2D_ENGINE"] == "ray" and env["S2D_RAY_WORKERS"] == "16" and env["S2D_RAY_GPUS_PER_WORKER"] == "1"
    assert "S2D_GPUS" not in env and env["MLFLOW_TRACKING_URI"] == "http://mlflow.s2d:5000"
    assert json.loads(env["S2D_ARGS_JSON"]) == ARGS
    head_env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(head_env["S2D_ARGS_JSON"]) == ARGS  # the job's driver runs on the head
    assert all(isinstance(e["value"], str) for e in worker["env"])
    # credentials: from the Secret through envFrom on every pod, never a value in the spec
    for pod in (head["template"], group["template"]):
        assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s2d-credentials"}}]
    text = json.dumps(job)
    assert not any(v in text for v in SECRETS.values()) and not any(k in text for k in SECRETS)


def test_without_a_queue_there_is_no_kueue_label(settings, monkeypatch, validator):
    monkeypatch.delenv("S2D_KUEUE_QUEUE")
    job = spec()
    validator.validate(job)
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


@pytest.mark.parametrize("mutate, where", [
    (lambda j: j["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),  # misspelt key
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2), "replica"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagee="x"), "imagee"),
    (lambda j: j["spec"].update(ttlSecondsAfterFinished="600"), "600"),  # wrong type
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),  # required
])
def test_schema_check_rejects_mistakes(settings, validator, mutate, where):
    import jsonschema

    job = spec()
    mutate(job)
    with pytest.raises(jsonschema.ValidationError) as e:
        validator.validate(job)
    assert where in str(e.value)


def test_recorded_status_objects_fit_the_crd(validator):
    for name, status in STATUS.items():
        obj = {**spec_stub(), **({"status": status} if status else {})}
        validator.validate(obj)


def spec_stub():
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "s2d-teacher-rl-0123456789", "namespace": "s2d"},
            "spec": {"entrypoint": "python -m stages teacher_rl"}}


@pytest.mark.parametrize("state", ["missing", "initializing", "pending", "running", "retrying", "suspended"])
def test_job_on_its_way_is_not_done(state):
    assert rj.rayjob_done({**spec_stub(), **({"status": STATUS[state]} if STATUS[state] else {})}) is False


def test_job_states_done_and_failed():
    assert rj.rayjob_done({**spec_stub(), "status": STATUS["succeeded"]}) is True
    with pytest.raises(
        rj.RayJobFailed, match=r"failed \(jobStatus FAILED, reason AppFailed\): Job entrypoint command failed with exit code 1"
    ):
        rj.rayjob_done({**spec_stub(), "status": STATUS["failed"]}, "x")
    with pytest.raises(rj.RayJobFailed, match="DeadlineExceeded.*activeDeadlineSeconds"):
        rj.rayjob_done({**spec_stub(), "status": STATUS["deadline"]})
    with pytest.raises(rj.RayJobFailed, match="validationfailed.*entrypoint is required"):
        rj.rayjob_done({**spec_stub(), "status": STATUS["invalid"]})
    # KubeRay before 1.2 marked a failed job "Complete" with jobStatus FAILED: still a failure
    with pytest.raises(rj.RayJobFailed):
        rj.rayjob_done({**spec_stub(), "status": {**STATUS["failed"], "jobDeploymentStatus": "Complete"}})


# ------------------------------------------------------------------ the tasks, against the API over HTTP
class FakeRayJobAPI:
    """Just enough of the Kubernetes API for ``rayjobs.ray.io/v1`` in one namespace: POST (create; an
    existing name is 409), GET (the object, its status advancing through ``statuses`` one read at a
    time), DELETE (404 when absent). Records the requests."""

    def __init__(self, statuses):
        self.statuses, self.objects, self.requests = list(statuses), {}, []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _parts(self):
                p = self.path.split("?")[0].strip("/").split("/")  # apis/ray.io/v1/namespaces/<ns>/rayjobs[/<name>]
                assert p[:3] == ["apis", "ray.io", "v1"] and p[3] == "namespaces" and p[5] == "rayjobs", self.path
                return p[4], (p[6] if len(p) > 6 else None)

            def do_POST(self):
                ns, _ = self._parts()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(("POST", ns, body))
                name = body["metadata"]["name"]
                if name in api.objects:
                    return self._send(
                        409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409}
                    )
                api.objects[name] = body
                self._send(201, body)

            def do_GET(self):
                ns, name = self._parts()
                api.requests.append(("GET", ns, name))
                if name not in api.objects:
                    return self._send(
                        404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
                    )
                obj = copy.deepcopy(api.objects[name])
                status = api.statuses.pop(0) if len(api.statuses) > 1 else api.statuses[0]
                if status:
                    obj["status"] = status
                self._send(200, obj)

            def do_DELETE(self):
                ns, name = self._parts()
                api.requests.append(("DELETE", ns, name))
                if api.objects.pop(name, None) is None:
                    return self._send(
                        404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
                    )
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, tmp_path) -> str:
        path = tmp_path / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{self.server.server_address[1]}"}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t", "namespace": "s2d"}}],
            "users": [{"name": "t", "user": {"token": "test"}}]}))
        return str(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_for(tmp_path, monkeypatch):
    """A fake API server per call, reached as a deployment would: the Airflow connection
    ``kubernetes_default`` naming a kubeconfig."""
    servers = []

    def make(statuses):
        servers.append(FakeRayJobAPI(statuses))
        path = servers[-1].kubeconfig(tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                           json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": path}}))
        return servers[-1], path

    yield make
    for s in servers:
        s.close()


class _Run:
    dag_id, run_id = "sparse_to_dense", "manual__2026-11-27T08:00:00+00:00"


PARAMS = {"preset": "llama3.1-8b", "teacher": None, "student": None, "stages": ["teacher_rl", "kl_warmup"], "baseline": False,
          "seed": 0, "teacher_rl_steps": None, "kl_warmup_steps": None, "onpolicy_distill_steps": None, "student_rl_steps": None,
          "direct_grpo_steps": None, "artifact_root": None, "overrides": []}
FORM = set(PARAMS)


class _TI:
    def __init__(self, plan):
        self.plan, self.dag_id, self.run_id, self.task_id, self.try_number = plan, _Run.dag_id, _Run.run_id, "create", 1

    def xcom_pull(self, task_ids=None, **_):
        return self.plan


def _ctx(plan, params=PARAMS):
    return {"dag_run": _Run(), "ti": _TI(plan), "params": params}


def test_create_wait_delete_against_the_api(settings, api_for, validator):
    Create, Sensor, Delete, _ = rj._operators()
    api, kubeconfig = api_for([None, STATUS["running"], STATUS["succeeded"]])
    create = Create(task_id="create", stage="teacher_rl", form=FORM, namespace="s2d")
    plan = {"root": "s3://bucket/runs/x", "parent_run_id": "abc", "stages": ["teacher_rl"]}
    name = create.execute(_ctx(plan))
    assert name == rj.rayjob_name(_Run.dag_id, _Run.run_id, "teacher_rl")
    (method, ns, body), = api.requests
    assert (method, ns) == ("POST", "s2d")
    validator.validate(body)  # what reached the API server is the schema-valid spec
    assert body["spec"]["entrypoint"] == "python -m stages --args-env"
    worker = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert json.loads(env["S2D_ARGS_JSON"]) == contract.stage_args("teacher_rl", PARAMS, "s3://bucket/runs/x", "abc")

    sensor = Sensor(task_id="wait", name=name, namespace="s2d", deferrable=False)
    assert sensor.poke({}) is False  # no status yet
    assert sensor.poke({}) is False  # RUNNING
    assert sensor.poke({}) is True  # SUCCEEDED

    delete = Delete(task_id="delete", name=name, namespace="s2d")
    delete.execute({})
    assert api.requests[-1] == ("DELETE", "s2d", name) and not api.objects
    delete.execute({})  # already gone (TTL): fine


def test_trigger_reports_success_and_failure_with_the_message(settings, api_for, tmp_path):
    _, _, _, Trigger = rj._operators()

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload

    for statuses, expect in (([None, STATUS["running"], STATUS["succeeded"]], "success"),
                             ([STATUS["running"], STATUS["failed"]], "error")):
        api, kubeconfig = api_for(statuses)
        api.objects["j"] = spec("j")
        trigger = Trigger("j", "s2d", "kubernetes_default", 0.01)
        classpath, kwargs = trigger.serialize()
        assert classpath == "s2d_rayjob.RayJobTrigger" and rj.RayJobTrigger(**kwargs).name == "j"
        event = asyncio.run(asyncio.wait_for(first_event(trigger), 30))
        assert event["status"] == expect
        if expect == "error":
            assert "AppFailed" in event["message"] and "exit code 1" in event["message"]
        assert len([q for q in api.requests if q[0] == "GET"]) == len(statuses)


def test_failed_job_fails_the_sensor_with_the_message(settings, api_for):
    from airflow.sdk.exceptions import AirflowFailException

    _, Sensor, _, _ = rj._operators()
    api, kubeconfig = api_for([STATUS["failed"]])
    api.objects["j"] = spec("j")
    sensor = Sensor(task_id="wait", name="j", namespace="s2d", deferrable=False)
    with pytest.raises(AirflowFailException, match="AppFailed.*exit code 1"):
        sensor.poke({})
    with pytest.raises(AirflowFailException, match="DeadlineExceeded"):
        sensor.execute_complete({}, {"status": "error", "name": "j", "message": "RayJob j failed (reason DeadlineExceeded)"})


def test_unplanned_stage_is_skipped_without_a_cluster(settings, api_for):
    from airflow.sdk.exceptions import AirflowSkipException

    Create, _, _, _ = rj._operators()
    api, kubeconfig = api_for([None])
    plan = json.dumps({"root": "s3://b/r", "parent_run_id": "p", "stages": ["bootstrap", "kl_warmup"]})
    create = Create(task_id="create", stage="teacher_rl", form=FORM, namespace="s2d")
    with pytest.raises(AirflowSkipException):
        create.execute(_ctx(plan))
    assert api.requests == []


def test_refused_trigger_creates_no_rayjob(settings, api_for):
    from airflow.sdk.exceptions import AirflowFailException

    Create, _, _, _ = rj._operators()
    api, kubeconfig = api_for([None])
    create = Create(task_id="create", stage="teacher_rl", form=FORM, namespace="s2d")
    hostile = {**PARAMS, "teacher": "Qwen/a;touch${IFS}/tmp/x;#"}
    with pytest.raises(AirflowFailException, match="^error: teacher"):
        create.execute(_ctx({"root": "s3://b/r", "stages": ["teacher_rl"]}, hostile))
    assert api.requests == []


# ------------------------------------------------------------------ the DAG with runner rayjob
def test_dag_parses_with_rayjob_runner_and_has_create_wait_delete_per_stage(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("S2D_RUNNER", "rayjob")
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    sys.modules.pop("sparse_to_dense", None)
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    t = bag.dags["sparse_to_dense"].task_dict
    for stage in (n for n in table.GPU_STAGES if n in table.TASKS):  # a RayJob per training stage; the gate runs as a pod
        create, wait, delete = t[f"{stage}.create"], t[f"{stage}.wait"], t[f"{stage}.delete"]
        assert type(create).__mro__[1].__name__ == "KubernetesCreateResourceOperator"
        assert wait.downstream_task_ids >= {f"{stage}.delete"} and f"{stage}.wait" in create.downstream_task_ids
        assert delete.is_teardown and create.is_setup and "plan" in create.upstream_task_ids
        assert wait.deferrable and wait.retries == 0
    assert t["teacher_data.create"].upstream_task_ids == {"plan", "teacher_rl.wait"}
    assert t["kl_warmup.create"].upstream_task_ids == {"plan", "teacher_data.wait"}
    assert t["report"].upstream_task_ids == {"plan", "student_rl.wait", "direct_grpo.wait"}
    assert "KubernetesPodOperator" in [c.__name__ for c in type(t["plan"]).__mro__]


def test_rbac_lets_the_airflow_workers_manage_rayjobs_and_nothing_else():
    import kubernetes_validate
    import yaml

    docs = list(yaml.safe_load_all((REPO / "infra/k8s/manifests/15-rayjob-rbac.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    by = {d["kind"]: d for d in docs}
    verbs = {res: set(rule["verbs"]) for rule in by["Role"]["rules"] for res in rule["resources"]}
    assert verbs["rayjobs"] >= {"create", "get", "delete"} and "secrets" not in verbs and "pods" not in verbs
    assert all(rule["apiGroups"] == ["ray.io"] for rule in by["Role"]["rules"])
    stage_rbac = {d["kind"]: d for d in yaml.safe_load_all((REPO / "infra/k8s/manifests/10-stage-rbac.yaml").read_text()) if d}
    assert by["RoleBinding"]["subjects"] == stage_rbac["RoleBinding"]["subjects"]  # the same Airflow workers
    assert by["Role"]["metadata"]["namespace"] == s2d_settings.setting("k8s_namespace", "s2d")


def test_deferred_sensor_hands_the_wait_to_the_trigger(settings, api_for):
    from airflow.sdk.exceptions import TaskDeferred

    _, Sensor, _, Trigger = rj._operators()
    api, _ = api_for([STATUS["running"]])
    api.objects["j"] = spec("j")
    sensor = Sensor(task_id="wait", name="j", namespace="s2d", poke_interval=5)
    with pytest.raises(TaskDeferred) as e:
        sensor.execute({})
    assert isinstance(e.value.trigger, Trigger) and e.value.trigger.serialize()[1]["name"] == "j"
    assert e.value.method_name == "execute_complete"
