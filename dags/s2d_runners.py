"""How the DAG's tasks run the stage command: one contract, three runners.

The contract (the only thing a runner may not change) is :data:`ENTRYPOINT` + ``<args>`` from
:func:`stage_args`, with the environment from :func:`stage_env` (how many GPUs the stage has:
``S2D_GPUS``; above one, the stage command relaunches itself under ``accelerate launch``).
``local`` runs it as a subprocess of the Airflow worker (the stage environment may be a separate venv:
``S2D_STAGE_PYTHON``), ``docker`` in the stage image (whose ``ENTRYPOINT`` is the same, tested) with
the GPUs, ``kubernetes`` in a pod with ``nvidia.com/gpu`` limits. This module imports no torch and no
stage code: the DAG parses in milliseconds in a plain Airflow environment.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from datetime import timedelta

ENTRYPOINT = ("python", "-m", "stages")  # docker/*.Dockerfile ENTRYPOINT and the pod's command (tested)
DEFAULT_IMAGE = "ghcr.io/sparse-to-dense/stages:0.1.0"
NOT_PLANNED = 99  # the stage command's exit code for "this config switches the stage off"
USER_ERROR = 2  # the stage command's exit code for bad input (one `error: ...` line on stderr)
FINAL_STUDENT_URI = "s2d://sparse_to_dense/final_student"
GPU_STAGES = ("bootstrap", "import", "prune", "teacher_rl", "teacher_data", "kl_warmup", "onpolicy_distill", "student_rl",
              "direct_grpo")
# stages that talk to the teacher: with a long-lived teacher server (setting ``teacher_url``; infra/k8s
# teacher-server.yaml, compose service ``teacher``) they get S2D_TEACHER_URL (used by teacher.engine: server)
TEACHER_STAGES = ("teacher_data", "kl_warmup", "onpolicy_distill")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
PLAIN_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_USERNAME")


def setting(name: str, default: str | None = None) -> str | None:
    """Deployment setting: env ``S2D_<NAME>``, else Airflow Variable ``s2d_<name>``, else default."""
    value = os.environ.get(f"S2D_{name.upper()}")
    if value:
        return value
    try:
        from airflow.sdk import Variable

        return Variable.get(f"s2d_{name.lower()}", default=default)
    except Exception:  # no metadata database or API at parse time (tests, first boot)
        return default


STEP_STAGES = ("teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo")


def overrides(params: dict) -> list[str]:
    """The trigger form's values as ``--set`` overrides of the preset (one ``<stage>_steps`` field
    per step budget)."""
    out = [f"seed={int(params['seed'])}", f"workflow.stages=[{','.join(params['stages'])}]",
           f"workflow.baseline={str(bool(params['baseline'])).lower()}"]
    for role in ("teacher", "student"):
        if params.get(role):
            out.append(f"models.{role}.source={params[role]}")
    for stage in STEP_STAGES:
        if params.get(f"{stage}_steps") is not None:
            out.append(f"{stage}.steps={int(params[f'{stage}_steps'])}")
    out += list(params.get("overrides") or [])
    return out


def artifact_base() -> str:
    """``S2D_ARTIFACT_ROOT`` (Variable ``s2d_artifact_root``): the BASE under which runs' artifact
    roots live, for the DAG (``<base>/<dag_id>/<run_id>``) and the CLI (``<base>/default``) alike.
    A relative base is relative to the stage command's working directory (``S2D_WORKDIR``)."""
    base = (setting("artifact_root", "runs") or "runs").rstrip("/") or "/"
    if "://" in base:
        return base
    return os.path.normpath(os.path.join(setting("workdir") or os.getcwd(), base))


def artifact_root(params: dict, dag_id: str, run_id: str) -> str:
    """The run's artifact root: the form's value (confined to the base, see :func:`refusal`), else
    ``<base>/<dag_id>/<run_id>``."""
    if params.get("artifact_root"):
        return params["artifact_root"].rstrip("/")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return f"{artifact_base()}/{dag_id}/{safe}"


def stage_args(command: str, params: dict, root: str, parent_run_id: str | None = None) -> list[str]:
    """Arguments after ``python -m stages``: identical for every runner (tested)."""
    args = [command, "--config", params["preset"], "--root", root]
    for o in overrides(params):
        args += ["--set", o]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    if command in GPU_STAGES:
        args.append("--if-planned")
    return args


def task_args(command: str, params: dict, form: set[str], dag_id: str, run_id: str, plan=None,
              runner: str = "local") -> list[str]:
    """What every runner sends for one task of one DAG run (the local runner calls this directly, the
    container runners through a template macro): the trigger's values checked (:func:`refusal`), the
    root and MLflow parent run from ``plan``'s XCom (``plan`` itself computes the root)."""
    problem = refusal(params, form)
    if problem and command == "close-runs":  # the teardown: a refused run opened nothing to close
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"nothing to close: error: {problem}")
    if problem:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"error: {problem}")  # a refusal is not retried
    if isinstance(plan, str):
        plan = last_json(plan)
    root = (plan or {}).get("root") or artifact_root(params, dag_id, run_id)
    args = stage_args(command, params, root, (plan or {}).get("parent_run_id"))
    pod = runner == "kubernetes" or runner == "rayjob" and command not in GPU_STAGES  # XCom through the sidecar
    return args + (["--xcom-file", "/airflow/xcom/return.json"] if pod else [])


# ---------------------------------------------------------------- the trigger form is a security boundary

# Override keys a trigger may set unless the deployment says otherwise (setting ``allowed_overrides``:
# comma-separated key prefixes). Not in it: anything that loads code (``*.trust_remote_code``,
# ``task.kind`` plugins), reads files of the worker (``task.files``), or picks the device.
DEFAULT_ALLOWED_OVERRIDES = (
    "seed", "dtype", "torch_threads", "logprob_chunk", "train", "checkpoint_every",
    "task.seed", "task.min_digits", "task.max_digits", "task.ops", "task.sizes", "task.prompt_template",
    "models.teacher.source", "models.student.source", "models.teacher.arch", "models.student.arch",
    "sampling", "bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo",
    "eval", "workflow", "tracking.enabled", "tracking.experiment")
# keys that load code: allowed only where an allow-list entry names them explicitly
CODE_KEYS = ("trust_remote_code", "task.kind", "task.files")
# model sources a trigger may name (setting ``allowed_model_prefixes``), besides artifact URIs
# under the artifact base: the built-in tiny models, registered models, the presets' hub owners
DEFAULT_MODEL_PREFIXES = ("bootstrap", "models:/", "Qwen/", "meta-llama/")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _code_key(key: str) -> bool:
    return any(_under(key, k) or k in key.split(".") for k in CODE_KEYS)


def _listed(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = setting(name)
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value is not None else default


def confine(uri: str, what: str) -> str | None:
    """Why ``uri`` is not a place this deployment lets a trigger write to or read from, or None.
    Local paths must resolve (symlinks and ``..`` followed) strictly under the artifact base; ``s3://``
    URIs must be in an allowed bucket (setting ``allowed_buckets``; default: the base's bucket)."""
    base = artifact_base()
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        default = (base[5:].partition("/")[0],) if base.startswith("s3://") else ()
        if bucket not in _listed("allowed_buckets", default):
            return f"{what} '{uri}': bucket '{bucket}' is not an allowed bucket (setting s2d_allowed_buckets)"
        if ".." in key.split("/") or not key.strip("/"):
            return f"{what} '{uri}' must name a folder inside the bucket, without '..'"
        return None
    if "://" in uri:
        return f"{what} '{uri}' is neither a local path nor s3://"
    if base.startswith("s3://"):
        return f"{what} '{uri}' is a local path, but the artifact base is {base} (S2D_ARTIFACT_ROOT)"
    if ".." in uri.split("/"):
        return f"{what} '{uri}' contains '..'"
    path = os.path.realpath(os.path.join(setting("workdir") or os.getcwd(), uri))
    real_base = os.path.realpath(base)
    if not path.startswith(real_base.rstrip("/") + "/"):
        return f"{what} '{uri}' is outside the artifact base {real_base} (S2D_ARTIFACT_ROOT)"
    return None


def model_refusal(source: str, what: str) -> str | None:
    """Why a model source may not be loaded by a trigger, or None."""
    if any(source == p or (p.endswith(("/", ":")) and source.startswith(p))
           for p in _listed("allowed_model_prefixes", DEFAULT_MODEL_PREFIXES)):
        return None
    if "://" in source or source.startswith(("/", ".")) or source.count("/") > 1:  # a path, not a hub id
        problem = confine(source, what)
        return problem and f"{problem}; allowed model sources: artifacts under the base or setting s2d_allowed_model_prefixes"
    return f"{what} '{source}' is not under an allowed model prefix (setting s2d_allowed_model_prefixes)"


def refusal(params: dict, form: set[str]) -> str | None:
    """Why a trigger's values are refused, in one line, or None. Types and ranges are the form's
    schema (checked when the run is created); this is what the schema cannot say: the deployment's
    allow-lists and where artifacts may go."""
    unknown = sorted(set(params) - form)
    if unknown:
        return f"{', '.join(unknown)}: not a parameter of this DAG (the form's fields: {', '.join(sorted(form))})"
    if not params.get("stages"):
        return "stages: choose at least one stage (leave stages out only for an ablation, never all of them)"
    if params.get("artifact_root"):
        problem = confine(params["artifact_root"].rstrip("/") or "/", "artifact_root")
        if problem:
            return problem
    for role in ("teacher", "student"):
        if params.get(role):
            problem = model_refusal(params[role], role)
            if problem:
                return problem
    allowed = _listed("allowed_overrides", DEFAULT_ALLOWED_OVERRIDES)
    for item in params.get("overrides") or []:
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            return f"overrides: '{item}' is not key.path=value"
        ok = [p for p in allowed if _under(key, p)]
        if (_code_key(key) or "trust_remote_code" in value) and not any(_code_key(p) for p in ok):
            return f"overrides: '{item}' loads code; only the deployment may allow it (setting s2d_allowed_overrides)"
        if not ok:
            return f"overrides: '{key}' is not an allowed key (setting s2d_allowed_overrides: {', '.join(allowed)})"
        if key.endswith(".source"):
            problem = model_refusal(value.strip(), f"overrides: {key}")
            if problem:
                return problem
    return None


def stage_argv(args: list[str], python: str | None = None) -> list[str]:
    """The full command line: :data:`ENTRYPOINT` + ``args``. ``python`` replaces the interpreter for
    the local runner (its venv's python); containers use the image's ``python`` on ``PATH``."""
    return [python or ENTRYPOINT[0], *ENTRYPOINT[1:], *args]


def stage_env(stage: str) -> dict[str, str]:
    """Environment every runner gives the stage command, besides credentials and tracking settings:
    ``S2D_GPUS`` (GPUs this task holds; the stage relaunches under ``accelerate launch`` above one)."""
    env = {"S2D_GPUS": str(gpu_count(stage)), "PYTHONUNBUFFERED": "1"}
    if stage in TEACHER_STAGES and setting("teacher_url", ""):
        env["S2D_TEACHER_URL"] = setting("teacher_url", "")
    return env


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the stage command printed no JSON summary")


def run_local(args: list[str], airflow_env: dict[str, str]) -> dict:
    """Local runner: the stage command as a subprocess; its output streams into the task log.
    The GPUs are the host's: ``S2D_GPUS`` tells the stage how many of them to use."""
    env = {**os.environ, **airflow_env, **stage_env(args[0])}
    env.update(connection_env())
    proc = subprocess.Popen(stage_argv(args, setting("stage_python") or sys.executable), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=setting("workdir") or os.getcwd())
    lines = []
    for line in proc.stdout:
        print(line, end="")
        lines.append(line)
    rc = proc.wait()
    if rc == NOT_PLANNED:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("switched off by this run's parameters")
    if rc == USER_ERROR:  # bad input (config, data, models): the same on every retry
        from airflow.sdk.exceptions import AirflowFailException

        said = [x.strip() for x in lines if x.startswith("error:")]
        raise AirflowFailException(said[-1] if said else f"error: the stage command refused its input (exit {rc})")
    if rc != 0:
        raise RuntimeError(f"stage command failed with exit code {rc}")
    return last_json("".join(lines[-50:]))


def final_student_event(context, result) -> None:
    """``report``'s post-execute hook, every runner: the final-student asset event carries the
    final student's URI and the teacher's (``result``: the stage command's JSON summary, as a dict or
    the text the container printed)."""
    from airflow.sdk import Asset

    out = last_json(result) if isinstance(result, str) else (result or {})
    context["outlet_events"][Asset(FINAL_STUDENT_URI)].extra = {"uri": out.get("final_student"), "teacher": out.get("teacher")}


def connection_env() -> dict[str, str]:
    """S3 credentials from the Airflow connection ``s2d_s3`` (type aws), when one is defined.
    Returned for the child process only: never templated, never in XCom or params."""
    conn_id = setting("s3_conn_id", "s2d_s3")
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:
        return {}
    env = {}
    if conn.login:
        env["AWS_ACCESS_KEY_ID"] = conn.login
    if conn.password:
        env["AWS_SECRET_ACCESS_KEY"] = conn.password
    extra = conn.extra_dejson or {}
    if extra.get("endpoint_url"):
        env["AWS_ENDPOINT_URL"] = extra["endpoint_url"]
    if extra.get("region_name"):
        env["AWS_DEFAULT_REGION"] = extra["region_name"]
    return env


# ---------------------------------------------------------------- container runners


def gpu_count(stage: str) -> int:
    """GPUs a stage task holds (setting ``gpus_per_task``, default 1); bookkeeping commands get none."""
    return int(setting("gpus_per_task", "1")) if stage in GPU_STAGES else 0


def gpu_node_selector() -> dict[str, str]:
    """Labels of GPU nodes (setting ``k8s_gpu_node_selector``, ``key=value,...``; default: the label
    NVIDIA's GPU operator / feature discovery puts on GPU nodes)."""
    spec = setting("k8s_gpu_node_selector", "nvidia.com/gpu.present=true")
    return dict(item.strip().split("=", 1) for item in spec.split(",") if item.strip())


def airflow_ctx_env(ti) -> dict[str, str]:
    """Which Airflow task try the stage command runs as, for every runner: MLflow tags
    (``airflow.*``) and the stage lock (a retry waits out the lease of its own killed previous try)."""
    return {"AIRFLOW_CTX_DAG_ID": ti.dag_id, "AIRFLOW_CTX_DAG_RUN_ID": ti.run_id, "AIRFLOW_CTX_TASK_ID": ti.task_id,
            "AIRFLOW_CTX_TRY_NUMBER": str(ti.try_number)}


def plain_env() -> dict[str, str]:
    """Non-secret settings forwarded from the Airflow worker to a stage container (may be rendered)."""
    return {k: os.environ[k] for k in PLAIN_VARS if k in os.environ}


@functools.cache
def untemplated(cls: type, *fields: str) -> type:
    """``cls`` with ``fields`` taken out of its template fields. The DAG renders templates as native
    objects, which would turn an environment value such as ``"1"`` into the int 1 (the Kubernetes
    API refuses a non-string env value); the environment holds no templates, so it is not rendered."""
    return type(cls.__name__, (cls,), {"template_fields": tuple(f for f in cls.template_fields if f not in fields),
                                       "__module__": __name__, "__doc__": cls.__doc__})


def docker_operator(task_id: str, stage: str, arguments: str, **kw):
    """DockerOperator running the stage image through the Docker API (Docker Engine, or podman's
    Docker-compatible service: ``docker_url``). GPUs through device requests; credentials as
    read-only files (see :func:`secret_files`), so they appear in no container spec, log or XCom."""
    from docker.types import DeviceRequest

    n = gpu_count(stage)
    return stage_container_operator()(
        task_id=task_id,
        image=setting("image", DEFAULT_IMAGE),
        # the image's ENTRYPOINT is ENTRYPOINT (docker/*.Dockerfile, tested); this is <args>, rendered
        # to a list (the DAG renders templates as native objects)
        command=arguments,
        environment={**plain_env(), **stage_env(stage)},
        device_requests=[DeviceRequest(count=n, capabilities=[["gpu"]])] if n else None,
        docker_url=setting("docker_url", "unix://var/run/docker.sock"),
        # "host" when S3 / MLflow listen on the worker's localhost (tests, a single machine)
        network_mode=setting("docker_network", "bridge"),
        shm_size=16 << 30,
        # "never" keeps finished containers for `docker ps -a` / inspect (labels s2d.*)
        auto_remove=setting("docker_auto_remove", "success"),
        labels={"s2d.stage": stage},
        mount_tmp_dir=False,
        do_xcom_push=True,
        skip_on_exit_code=NOT_PLANNED,
        **kw,
    )


SECRETS_DIR = "/run/secrets/s2d"


def secret_files(secrets: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Credentials as files the stage's libraries read themselves: ``{container path: content}`` and
    the environment that points at them (paths only). A container's environment is part of its spec
    (``docker inspect`` shows it, whatever the operator calls it); a mounted file's content is not.
    ``MLFLOW_TRACKING_TOKEN`` has no file form in MLflow: it stays in the environment."""
    files, env = {}, {}
    aws = [("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
           ("aws_session_token", "AWS_SESSION_TOKEN")]
    if any(v in secrets for _, v in aws):
        files[f"{SECRETS_DIR}/aws-credentials"] = "[default]\n" + "".join(f"{k} = {secrets[v]}\n" for k, v in aws if v in secrets)
        env["AWS_SHARED_CREDENTIALS_FILE"] = f"{SECRETS_DIR}/aws-credentials"
    if "MLFLOW_TRACKING_PASSWORD" in secrets:  # MLflow reads ~/.mlflow/credentials (the image's HOME)
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        files["/home/s2d/.mlflow/credentials"] = (f"[mlflow]\nmlflow_tracking_username = {user}\n"
                                                  f"mlflow_tracking_password = {secrets['MLFLOW_TRACKING_PASSWORD']}\n")
    if "HF_TOKEN" in secrets:
        files[f"{SECRETS_DIR}/hf-token"] = secrets["HF_TOKEN"]
        env["HF_TOKEN_PATH"] = f"{SECRETS_DIR}/hf-token"
    return files, env


@functools.cache
def stage_container_operator() -> type:
    """DockerOperator that hands the worker's credentials (environment :data:`CREDENTIAL_VARS`, else
    the ``s2d_s3`` connection) to the container: as read-only bind-mounted files written for the
    task's duration (setting ``docker_secrets=file``, the default), or as its private environment
    (``env``: remote engines). The files go to a fresh 0700 folder under ``docker_secrets_dir`` (default:
    the worker's temp folder); the engine resolves bind mounts on ITS host, so when the worker itself
    runs in a container (compose) that folder must be mounted at the same path on both sides."""
    import tempfile
    from pathlib import Path

    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import Mount

    class StageContainerOperator(untemplated(DockerOperator, "environment")):
        def execute(self, context):
            secrets = {k: os.environ[k] for k in CREDENTIAL_VARS if k in os.environ} or {
                k: v for k, v in connection_env().items() if k in CREDENTIAL_VARS}
            ti = context["ti"]
            self.labels = {**(self.labels or {}), "s2d.dag_id": ti.dag_id, "s2d.run_id": ti.run_id,
                           "s2d.try_number": str(ti.try_number)}
            # new objects, never in place: a task instance runs a shallow copy of the DAG's operator, whose
            # lists it shares (an appended mount would come back in the retry: "duplicate mount")
            base_env, base_mounts = dict(self.environment), list(self.mounts)
            try:
                self.environment = {**base_env, **airflow_ctx_env(ti)}
                if setting("docker_secrets", "file") == "env":
                    self._private_environment = secrets
                    return super().execute(context)
                files, env = secret_files(secrets)
                self._private_environment = {k: secrets[k] for k in ("MLFLOW_TRACKING_TOKEN",) if k in secrets}
                # 0700: other users of the host cannot read
                with tempfile.TemporaryDirectory(prefix="s2d-secrets-", dir=setting("docker_secrets_dir") or None) as d:
                    mounts = []
                    for i, (target, content) in enumerate(files.items()):
                        src = Path(d) / str(i)
                        src.write_text(content)
                        src.chmod(0o644)  # the container's user (uid 10001) reads it through the bind mount
                        mounts.append(Mount(target=target, source=str(src), type="bind", read_only=True))
                    self.mounts, self.environment = [*base_mounts, *mounts], {**self.environment, **env}
                    return super().execute(context)
            finally:
                self.environment, self.mounts = base_env, base_mounts

    return StageContainerOperator


def kubernetes_operator(task_id: str, stage: str, arguments: str, **kw):
    """KubernetesPodOperator: GPU limits, tolerations and node selector for GPU nodes, credentials
    from the Kubernetes Secret ``s2d-credentials`` (envFrom), XCom through the sidecar."""
    from kubernetes.client import models as k8s

    n = gpu_count(stage)
    limits = {"nvidia.com/gpu": str(n)} if n else {}
    # multi-GPU collectives (NCCL) need more shared memory than a container's 64 MiB default
    shm = [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
        medium="Memory", size_limit=setting("k8s_shm", "16Gi")))] if n else []
    pull_secrets = [k8s.V1LocalObjectReference(name=s.strip())
                    for s in (setting("k8s_image_pull_secrets") or "").split(",") if s.strip()]
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": setting("k8s_cpu", "8"), "memory": setting("k8s_memory", "64Gi"), **limits},
        limits={"memory": setting("k8s_memory", "64Gi"), **limits},
    )
    return stage_pod_operator()(
        task_id=task_id,
        name=f"s2d-{stage.replace('_', '-')}",
        namespace=setting("k8s_namespace", "s2d"),
        image=setting("image", DEFAULT_IMAGE),
        image_pull_secrets=pull_secrets or None,
        cmds=list(ENTRYPOINT),
        arguments=arguments,
        env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in {**plain_env(), **stage_env(stage)}.items()],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=setting("k8s_secret", "s2d-credentials")))],
        container_resources=resources,
        node_selector=gpu_node_selector() if n else None,
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] if n else None,
        volumes=shm or None,
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")] if shm else None,
        service_account_name=setting("k8s_service_account", "s2d-stage"),
        # the image's user (10001); no privilege escalation, no capabilities (Pod Security "restricted")
        container_security_context=k8s.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        on_finish_action="delete_succeeded_pod",
        get_logs=True,
        do_xcom_push=True,
        skip_on_exit_code=NOT_PLANNED,
        startup_timeout_seconds=1800,
        **kw,
    )


@functools.cache
def stage_pod_operator() -> type:
    """KubernetesPodOperator whose pod also gets the task try's ``AIRFLOW_CTX_*`` (:func:`airflow_ctx_env`)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class StagePodOperator(untemplated(KubernetesPodOperator, "env_vars")):
        def execute(self, context):
            base = list(self.env_vars or [])  # a new list, never in place (the DAG's operator shares it)
            self.env_vars = [*base, *(k8s.V1EnvVar(name=k, value=v) for k, v in airflow_ctx_env(context["ti"]).items())]
            try:
                return super().execute(context)
            finally:
                self.env_vars = base

    return StagePodOperator


# retry_delay_s: a setting so that tests (and impatient operators) need not wait a minute per retry
RETRY = {"retries": 2, "retry_delay": timedelta(seconds=float(setting("retry_delay_s", "60"))), "retry_exponential_backoff": True,
         "max_retry_delay": timedelta(minutes=30)}


# ---------------------------------------------------------------- scheduled retraining


def read_schedule(path, form: dict):
    """A schedule file: ``cron: "<expr>"`` (UTC) or ``asset: <uri>`` (run when that asset gets an
    event, e.g. new data), and ``conf:``, the trigger values the scheduled runs use. Returns
    ``(name, schedule, conf)``; raises ValueError naming the problem (the caller logs and skips it)."""
    import yaml
    from airflow.sdk import Asset, CronTriggerTimetable

    name = path.stem
    if not name.replace("-", "_").isidentifier():
        raise ValueError(f"file name '{path.name}': use letters, digits, '-' and '_' (it becomes the DAG id)")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or set(spec) - {"cron", "asset", "conf", "description"} or ("cron" in spec) == ("asset" in spec):
        raise ValueError("expected keys: cron (or asset), conf, description (optional)")
    conf = spec.get("conf") or {}
    unknown = set(conf) - set(form)
    if unknown:
        raise ValueError(f"conf: {', '.join(sorted(unknown))} not a parameter of the DAG")
    for key, value in conf.items():
        form[key].__copy__().resolve(value)  # the form's own schema: types and ranges
    problem = refusal({**{k: p.value for k, p in form.items()}, **conf}, set(form))
    if problem:
        raise ValueError(problem)
    if "asset" in spec:
        return name, [Asset(str(spec["asset"]))], conf
    timetable = CronTriggerTimetable(str(spec["cron"]), timezone="UTC")
    timetable.validate()  # a bad cron fails here, not when the DAG is serialized
    return name, timetable, conf


def skip_missed_slot(context) -> None:
    """``plan``'s pre-execute hook: a scheduled run that starts more than ``missed_slot_grace_minutes``
    (default 60) after its slot is skipped, and with it the whole run. Airflow, with catchup off,
    still creates a run for the most recent past slot when a schedule is switched on (or after an
    outage); this keeps that from training unannounced. Manual and asset-triggered runs are never late."""
    import datetime

    dag_run = context["dag_run"]
    if str(getattr(dag_run.run_type, "value", dag_run.run_type)) != "scheduled":
        return
    slot = dag_run.run_after or dag_run.logical_date
    late = datetime.datetime.now(datetime.timezone.utc) - slot
    if late > timedelta(minutes=float(setting("missed_slot_grace_minutes", "60"))):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"missed slot {slot.isoformat()} ({late} late): not run late; the next slot runs")
