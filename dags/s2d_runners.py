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
GPU_STAGES = ("bootstrap", "teacher_rl", "teacher_data", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo")
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


def overrides(params: dict) -> list[str]:
    """The trigger form's values as ``--set`` overrides of the preset."""
    out = [f"seed={int(params['seed'])}", f"workflow.stages=[{','.join(params['stages'])}]",
           f"workflow.baseline={str(bool(params['baseline'])).lower()}"]
    for role in ("teacher", "student"):
        if params.get(role):
            out.append(f"models.{role}.source={params[role]}")
    for stage, steps in (params.get("steps") or {}).items():
        if steps is not None:
            out.append(f"{stage}.steps={int(steps)}")
    out += list(params.get("overrides") or [])
    return out


def artifact_root(params: dict, dag_id: str, run_id: str) -> str:
    """The run's artifact root: the form's value, else ``<S2D_ARTIFACT_ROOT>/<dag_id>/<run_id>``."""
    if params.get("artifact_root"):
        return params["artifact_root"].rstrip("/")
    base = setting("artifact_root", "runs").rstrip("/")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return f"{base}/{dag_id}/{safe}"


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
        from airflow.exceptions import AirflowSkipException

        raise AirflowSkipException("switched off by this run's parameters")
    if rc != 0:
        raise RuntimeError(f"stage command failed with exit code {rc}")
    return last_json("".join(lines[-50:]))


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
    """DockerOperator running the stage image; GPUs through device requests, secrets through
    ``private_environment`` (never rendered or logged)."""
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest

    n = gpu_count(stage)
    return untemplated(DockerOperator, "environment")(
        task_id=task_id,
        image=setting("image", DEFAULT_IMAGE),
        # the image's ENTRYPOINT is ENTRYPOINT (docker/*.Dockerfile, tested); this is <args>, rendered
        # to a list (the DAG renders templates as native objects)
        command=arguments,
        environment={**plain_env(), **stage_env(stage)},
        private_environment={k: os.environ[k] for k in CREDENTIAL_VARS if k in os.environ},
        device_requests=[DeviceRequest(count=n, capabilities=[["gpu"]])] if n else None,
        docker_url=setting("docker_url", "unix://var/run/docker.sock"),
        network_mode=setting("docker_network", "bridge"),
        shm_size=16 << 30,
        auto_remove="success",
        mount_tmp_dir=False,
        do_xcom_push=True,
        skip_on_exit_code=NOT_PLANNED,
        **kw,
    )


def kubernetes_operator(task_id: str, stage: str, arguments: str, **kw):
    """KubernetesPodOperator: GPU limits, tolerations and node selector for GPU nodes, credentials
    from the Kubernetes Secret ``s2d-credentials`` (envFrom), XCom through the sidecar."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
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
    return untemplated(KubernetesPodOperator, "env_vars")(
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


RETRY = {"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
         "max_retry_delay": timedelta(minutes=30)}
