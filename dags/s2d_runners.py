"""The runners: where a task runs the stage command (``s2d_contract``: the same command line, arguments and
environment everywhere). ``local`` runs it as a subprocess of the Airflow worker (the stage environment may be
a separate venv: ``S2D_STAGE_PYTHON``) with an allow-listed environment; ``docker`` in the stage image (whose
``ENTRYPOINT`` is the same, tested) with the GPUs and credentials as read-only files; ``kubernetes`` in a pod
with ``nvidia.com/gpu`` limits and credentials from a Secret (``rayjob``: ``s2d_rayjob``). Each computes the
task's arguments when it executes (checked by ``s2d_policy`` first). This module imports no torch and no
stage code: the DAG parses in milliseconds in a plain Airflow environment.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from datetime import timedelta
from urllib.parse import unquote, urlsplit, urlunsplit

import s2d_contract as c
import s2d_settings as s

DEFAULT_IMAGE = "ghcr.io/sparse-to-dense/stages:0.1.0"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
PLAIN_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_USERNAME")
URL_VARS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "S2D_TEACHER_URL")
# what the local runner passes from the worker's environment to a stage process (setting
# ``stage_env_passthrough`` adds names, or prefixes ending in '*'): the stage's own settings, its storage,
# tracking and hub credentials, the system's basics. Never Airflow's own (AIRFLOW__*: the database, the
# fernet and API keys; AIRFLOW_CONN_* / AIRFLOW_VAR_*: connections and variables).
LOCAL_ENV_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "PYTHONPATH",
                   "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
                   "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM", "PYTHONUNBUFFERED",
                   "PYTHONDONTWRITEBYTECODE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
LOCAL_ENV_PREFIXES = ("S2D_", "MLFLOW_", "AWS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_",
                      "CUDA_", "NCCL_", "LC_", "XDG_", "RAY_", "DS_")
SECRETS_DIR = "/run/secrets/s2d"
SECRETS_PREFIX = "s2d-secrets-"


# ---------------------------------------------------------------- environment and credentials


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``scheme://user:password@host/...`` -> (the URI without them, user, password)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri, None, None
    if not parts.scheme or (parts.username is None and parts.password is None):
        return uri, None, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return urlunsplit(parts._replace(netloc=netloc)), user, password


def plain_env() -> dict[str, str]:
    """Non-secret settings forwarded from the Airflow worker to a stage container: they appear in its spec
    (``docker inspect``, the pod), so URLs lose any ``user:password@`` (the MLflow user and password go the
    credential way: :func:`worker_secrets`)."""
    env = {}
    for k in PLAIN_VARS:
        if k in os.environ:
            env[k] = split_credentials(os.environ[k])[0] if k in URL_VARS else os.environ[k]
    user = split_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))[1]
    if user and "MLFLOW_TRACKING_USERNAME" not in env:
        env["MLFLOW_TRACKING_USERNAME"] = user
    return env


def container_stage_env(stage: str) -> dict[str, str]:
    """:func:`s2d_contract.stage_env` for a container spec: URLs without credentials."""
    return {k: split_credentials(v)[0] if k in URL_VARS else v for k, v in c.stage_env(stage).items()}


def worker_secrets() -> dict[str, str]:
    """The credentials the worker hands to a stage container: environment :data:`CREDENTIAL_VARS`, else the
    ``s2d_s3`` connection's; a password inside ``MLFLOW_TRACKING_URI`` becomes ``MLFLOW_TRACKING_PASSWORD``."""
    secrets = {k: os.environ[k] for k in CREDENTIAL_VARS if k in os.environ} or {
        k: v for k, v in connection_env().items() if k in CREDENTIAL_VARS}
    password = split_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))[2]
    if password and "MLFLOW_TRACKING_PASSWORD" not in secrets:
        secrets["MLFLOW_TRACKING_PASSWORD"] = password
    return secrets


def local_env(environ=None) -> dict[str, str]:
    """What a local stage process gets from the worker's environment: the allow-list above, plus the names
    or ``PREFIX*`` patterns of the setting ``stage_env_passthrough``."""
    environ = os.environ if environ is None else environ
    extra = s.listed("stage_env_passthrough", ())
    names = set(LOCAL_ENV_NAMES) | {x for x in extra if not x.endswith("*")}
    prefixes = LOCAL_ENV_PREFIXES + tuple(x[:-1] for x in extra if x.endswith("*") and len(x) > 1)
    return {k: v for k, v in environ.items()
            if (k in names or k.startswith(prefixes)) and not k.startswith("AIRFLOW")}


def connection_env() -> dict[str, str]:
    """S3 credentials from the Airflow connection ``s2d_s3`` (type aws), when one is defined.
    Returned for the child process only: never templated, never in XCom or params."""
    conn_id = s.setting("s3_conn_id", "s2d_s3")
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection
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


def airflow_ctx_env(ti) -> dict[str, str]:
    """Which Airflow task try the stage command runs as, for every runner: MLflow tags
    (``airflow.*``) and the stage lock (a retry waits out the lease of its own killed previous try)."""
    return {"AIRFLOW_CTX_DAG_ID": ti.dag_id, "AIRFLOW_CTX_DAG_RUN_ID": ti.run_id, "AIRFLOW_CTX_TASK_ID": ti.task_id,
            "AIRFLOW_CTX_TRY_NUMBER": str(ti.try_number)}


def context_args(context, command: str, form: set[str], runner: str) -> list[str]:
    """The task's arguments, computed when it executes (:func:`s2d_contract.task_args`)."""
    dag_run = context["dag_run"]
    plan = None if command == "plan" else context["ti"].xcom_pull(task_ids="plan")
    return c.task_args(command, context["params"], form, dag_run.dag_id, dag_run.run_id, plan, runner,
                       c.verdict_by(command, context["ti"]))


def retry() -> dict:
    """Retries of a stage task (``retry_delay_s``: a setting so that tests need not wait a minute per retry)."""
    return {"retries": 2, "retry_delay": timedelta(seconds=float(s.setting("retry_delay_s", "60"))),
            "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=30)}


def final_student_event(context, result) -> None:
    """``report``'s post-execute hook, every runner: the final-student asset event carries the
    final student's URI and the teacher's (``result``: the stage command's JSON summary, as a dict or
    the text the container printed)."""
    from airflow.sdk import Asset

    out = c.last_json(result) if isinstance(result, str) else (result or {})
    context["outlet_events"][Asset(c.FINAL_STUDENT_URI)].extra = {"uri": out.get("final_student"), "teacher": out.get("teacher")}


# ---------------------------------------------------------------- local: a subprocess of the worker


def run_local(args: list[str], airflow_env: dict[str, str]) -> dict:
    """Local runner: the stage command as a subprocess (its arguments as data, an allow-listed environment);
    its output streams into the task log. The GPUs are the host's: ``S2D_GPUS`` tells the stage how many."""
    env = {**local_env(), **airflow_env, **c.stage_env(args[0]), **connection_env(), **c.args_env(args)}
    proc = subprocess.Popen(c.stage_argv(s.setting("stage_python") or sys.executable), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=c.workdir())
    lines = []
    for line in proc.stdout:
        print(line, end="")
        lines.append(line)
    rc = proc.wait()
    if rc == c.NOT_PLANNED:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("switched off by this run's parameters")
    if rc == c.USER_ERROR:  # bad input (config, data, models): the same on every retry
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(c.user_error(lines, rc))
    if rc != 0:
        raise RuntimeError(f"stage command failed with exit code {rc}")
    return c.last_json("".join(lines[-50:]))


def local_task(command: str, form: set[str], **opts):
    """One ``@task`` running the stage command as a subprocess; small values only go to XCom."""
    from airflow.sdk import get_current_context, task

    @task(task_id=command, **opts)
    def run(plan: dict | None = None) -> dict:
        ctx = get_current_context()
        dag_run = ctx["dag_run"]
        args = c.task_args(command, ctx["params"], form, dag_run.dag_id, dag_run.run_id, plan,
                           by=c.verdict_by(command, ctx["ti"]))
        out = run_local(args, airflow_ctx_env(ctx["ti"]))
        if command == "plan":
            return {"root": out.get("root"), "parent_run_id": out.get("parent_run_id"), "stages": out.get("stages")}
        # URIs and ids, never checkpoints or metrics tables (the gate: its decision and the comparison's text)
        keep = ("stage", "skipped", "uri", "outputs", "mlflow_run_id", "final_student", "teacher",
                "status", "passed", "version", "champion", "comparison")
        return {k: out[k] for k in keep if k in out}

    return run


# ---------------------------------------------------------------- containers


def gpu_node_selector() -> dict[str, str]:
    """Labels of GPU nodes (setting ``k8s_gpu_node_selector``, ``key=value,...``; default: the label
    NVIDIA's GPU operator / feature discovery puts on GPU nodes)."""
    spec = s.setting("k8s_gpu_node_selector", "nvidia.com/gpu.present=true")
    return dict(item.strip().split("=", 1) for item in spec.split(",") if item.strip())


@functools.cache
def untemplated(cls: type, *fields: str) -> type:
    """``cls`` with ``fields`` taken out of its template fields. The DAG renders templates as native
    objects, which would turn an environment value such as ``"1"`` into the int 1 (the Kubernetes
    API refuses a non-string env value); the environment holds no templates, so it is not rendered."""
    return type(cls.__name__, (cls,), {"template_fields": tuple(f for f in cls.template_fields if f not in fields),
                                       "__module__": __name__, "__doc__": cls.__doc__})


def docker_operator(task_id: str, stage: str, form: set[str], **kw):
    """DockerOperator running the stage image through the Docker API (Docker Engine, or podman's
    Docker-compatible service: ``docker_url``). GPUs through device requests; credentials as read-only
    files (see :func:`secret_files`), so they appear in no container spec, log or XCom."""
    from docker.types import DeviceRequest

    n = c.gpu_count(stage)
    return stage_container_operator()(
        task_id=task_id,
        stage=stage,
        form=form,
        image=s.setting("image", DEFAULT_IMAGE),
        # the image's ENTRYPOINT is ENTRYPOINT (docker/*.Dockerfile, tested); the arguments come as data
        command=c.stage_argv()[len(c.ENTRYPOINT):],
        environment={**plain_env(), **container_stage_env(stage)},
        device_requests=[DeviceRequest(count=n, capabilities=[["gpu"]])] if n else None,
        docker_url=s.setting("docker_url", "unix://var/run/docker.sock"),
        # "host" when S3 / MLflow listen on the worker's localhost (tests, a single machine)
        network_mode=s.setting("docker_network", "bridge"),
        shm_size=16 << 30,
        # "never" keeps finished containers for `docker ps -a` / inspect (labels s2d.*); a container that
        # held MLFLOW_TRACKING_TOKEN is never kept (see stage_container_operator)
        auto_remove=s.setting("docker_auto_remove", "success"),
        labels={"s2d.stage": stage},
        mount_tmp_dir=False,
        do_xcom_push=True,
        skip_on_exit_code=c.NOT_PLANNED,
        **kw,
    )


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
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or split_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))[1] or ""
        files["/home/s2d/.mlflow/credentials"] = (f"[mlflow]\nmlflow_tracking_username = {user}\n"
                                                  f"mlflow_tracking_password = {secrets['MLFLOW_TRACKING_PASSWORD']}\n")
    if "HF_TOKEN" in secrets:
        files[f"{SECRETS_DIR}/hf-token"] = secrets["HF_TOKEN"]
        env["HF_TOKEN_PATH"] = f"{SECRETS_DIR}/hf-token"
    return files, env


def secrets_parent() -> str:
    """Where the docker runner writes a task's credential folder (setting ``docker_secrets_dir``)."""
    import tempfile

    return s.setting("docker_secrets_dir") or tempfile.gettempdir()


def sweep_secret_dirs(parent: str, older_than_s: float) -> list[str]:
    """Remove the credential folders that killed docker tasks left behind (a SIGKILL skips the cleanup): this
    user's ``s2d-secrets-*`` folders in ``parent`` older than a task may live. Returns what it removed."""
    import shutil

    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if (e.name.startswith(SECRETS_PREFIX) and e.is_dir(follow_symlinks=False) and st.st_uid == os.getuid()
                and now - st.st_mtime > older_than_s):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.path)
    return removed


@functools.cache
def stage_container_operator() -> type:
    """DockerOperator that computes the task's arguments when it executes (as data: ``S2D_ARGS_JSON``) and
    hands the worker's credentials (:func:`worker_secrets`) to the container: as read-only bind-mounted files
    written for the task's duration (setting ``docker_secrets=file``, the default), or as its private
    environment (``env``: remote engines). The files go to a fresh 0700 folder under ``docker_secrets_dir``
    (default: the worker's temp folder); folders of killed tasks are swept when the next task starts. The
    engine resolves bind mounts on ITS host, so when the worker itself runs in a container (compose) that
    folder must be mounted at the same path on both sides."""
    import tempfile
    from pathlib import Path

    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import Mount

    class StageContainerOperator(untemplated(DockerOperator, "environment", "command")):
        def __init__(self, *, stage: str, form: set[str], **kw):
            super().__init__(**kw)
            self.stage, self.form = stage, frozenset(form)

        def execute(self, context):
            args = context_args(context, self.stage, self.form, "docker")
            secrets = worker_secrets()
            ti = context["ti"]
            parent = secrets_parent()
            timeout_s = float(s.setting("stage_timeout_hours", "24")) * 3600
            for path in sweep_secret_dirs(parent, timeout_s + 600):
                self.log.warning("removed the credential folder %s of a killed task", path)
            # new objects, never in place: a task instance runs a shallow copy of the DAG's operator, whose
            # lists it shares (an appended mount would come back in the retry: "duplicate mount")
            base_env, base_mounts, base_labels, base_remove = (
                dict(self.environment),
                list(self.mounts),
                self.labels,
                self.auto_remove,
            )
            try:
                self.labels = {**(self.labels or {}), "s2d.dag_id": ti.dag_id, "s2d.run_id": ti.run_id,
                               "s2d.try_number": str(ti.try_number)}
                self.environment = {**base_env, **airflow_ctx_env(ti), **c.args_env(args)}
                if setting_secrets_as_env():
                    self._private_environment = secrets
                    self._no_token_left(secrets)
                    return super().execute(context)
                files, env = secret_files(secrets)
                self._private_environment = {k: secrets[k] for k in ("MLFLOW_TRACKING_TOKEN",) if k in secrets}
                self._no_token_left(self._private_environment)
                # 0700: other users of the host cannot read
                with tempfile.TemporaryDirectory(prefix=SECRETS_PREFIX, dir=parent) as d:
                    mounts = []
                    for i, (target, content) in enumerate(files.items()):
                        src = Path(d) / str(i)
                        src.write_text(content)
                        src.chmod(0o644)  # the container's user (uid 10001) reads it through the bind mount
                        mounts.append(Mount(target=target, source=str(src), type="bind", read_only=True))
                    self.mounts, self.environment = [*base_mounts, *mounts], {**self.environment, **env}
                    return super().execute(context)
            finally:
                self.environment, self.mounts, self.labels, self.auto_remove = base_env, base_mounts, base_labels, base_remove
                self._private_environment = {}

        def _no_token_left(self, private: dict) -> None:
            """A container whose environment holds a token (MLflow has no file form for it) is removed
            even when it fails: a kept container's environment is readable by anyone with `docker inspect`."""
            if any(k in private for k in ("MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                                          "HF_TOKEN", "AWS_SESSION_TOKEN")) and self.auto_remove != "force":
                self.log.info("the container holds credentials in its environment: removed when it ends, even on failure")
                self.auto_remove = "force"

    return StageContainerOperator


def setting_secrets_as_env() -> bool:
    """Setting ``docker_secrets``: ``file`` (default) or ``env`` (remote engines cannot bind-mount our files)."""
    return s.setting("docker_secrets", "file") == "env"


def kubernetes_operator(task_id: str, stage: str, form: set[str], **kw):
    """KubernetesPodOperator: GPU limits, tolerations and node selector for GPU nodes, credentials
    from the Kubernetes Secret ``s2d-credentials`` (envFrom), XCom through the sidecar."""
    from kubernetes.client import models as k8s

    n = c.gpu_count(stage)
    limits = {"nvidia.com/gpu": str(n)} if n else {}
    # multi-GPU collectives (NCCL) need more shared memory than a container's 64 MiB default
    shm = [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
        medium="Memory", size_limit=s.setting("k8s_shm", "16Gi")))] if n else []
    pull_secrets = [k8s.V1LocalObjectReference(name=x.strip())
                    for x in (s.setting("k8s_image_pull_secrets") or "").split(",") if x.strip()]
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": s.setting("k8s_cpu", "8"), "memory": s.setting("k8s_memory", "64Gi"), **limits},
        limits={"memory": s.setting("k8s_memory", "64Gi"), **limits},
    )
    return stage_pod_operator()(
        task_id=task_id,
        stage=stage,
        form=form,
        name=f"s2d-{stage.replace('_', '-')}",
        namespace=s.setting("k8s_namespace", "s2d"),
        image=s.setting("image", DEFAULT_IMAGE),
        image_pull_secrets=pull_secrets or None,
        cmds=list(c.ENTRYPOINT),
        arguments=c.stage_argv()[len(c.ENTRYPOINT):],
        env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in {**plain_env(), **container_stage_env(stage)}.items()],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.setting("k8s_secret", "s2d-credentials")))],
        container_resources=resources,
        node_selector=gpu_node_selector() if n else None,
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] if n else None,
        volumes=shm or None,
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")] if shm else None,
        service_account_name=s.setting("k8s_service_account", "s2d-stage"),
        # the image's user (10001); no privilege escalation, no capabilities (Pod Security "restricted")
        container_security_context=k8s.V1SecurityContext(
            run_as_non_root=True, allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        on_finish_action="delete_succeeded_pod",
        get_logs=True,
        do_xcom_push=True,
        skip_on_exit_code=c.NOT_PLANNED,
        startup_timeout_seconds=1800,
        **kw,
    )


def credentials_in_uri_warning(log, secret: str) -> None:
    """A pod cannot get a password we strip from ``MLFLOW_TRACKING_URI``: it must come from the Secret."""
    if split_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))[2]:
        log.warning("MLFLOW_TRACKING_URI carries a password: it is not copied into the pod spec; put "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the Secret %s", secret)


@functools.cache
def stage_pod_operator() -> type:
    """KubernetesPodOperator whose pod also gets the task's arguments (as data: ``S2D_ARGS_JSON``) and the task
    try's ``AIRFLOW_CTX_*`` (:func:`airflow_ctx_env`), computed when it executes."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class StagePodOperator(untemplated(KubernetesPodOperator, "env_vars", "arguments")):
        def __init__(self, *, stage: str, form: set[str], **kw):
            super().__init__(**kw)
            self.stage, self.form = stage, frozenset(form)

        def execute(self, context):
            args = context_args(context, self.stage, self.form, "kubernetes")
            credentials_in_uri_warning(self.log, s.setting("k8s_secret", "s2d-credentials"))
            base = list(self.env_vars or [])  # a new list, never in place (the DAG's operator shares it)
            extra = {**airflow_ctx_env(context["ti"]), **c.args_env(args)}
            self.env_vars = [*base, *(k8s.V1EnvVar(name=k, value=v) for k, v in extra.items())]
            try:
                return super().execute(context)
            finally:
                self.env_vars = base

    return StagePodOperator
