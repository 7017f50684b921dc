"""Runner ``rayjob``: each training stage is a KubeRay ``RayJob`` (a Ray cluster for the stage, the stage
command as its entrypoint, torn down when the job ends).

Per stage three tasks: ``create`` (the cncf-kubernetes provider's ``KubernetesCreateResourceOperator``,
with the RayJob rendered from the stage's arguments at run time) -> ``wait`` (a deferrable sensor on
``status.jobStatus`` / ``status.jobDeploymentStatus``: the worker slot is free while the job runs, and a
failed job fails the task with KubeRay's reason and message) -> ``delete`` (a teardown task: runs whatever
happened, ignores a job already removed by its TTL). No Airflow 3 Ray provider is maintained
(astro-provider-ray is deprecated), hence this small operator/sensor pair.

The RayJob: a head (CPU only, ``num-cpus: 0`` so no rank lands there) and one GPU worker group of
``rayjob_nodes`` pods x ``gpus_per_task`` GPUs; the image is the stage image with Ray installed
(``ray_image``, default ``image``); the entrypoint is the one stage command line, a constant
(:func:`s2d_contract.stage_argv`: KubeRay's submitter and Ray's job supervisor run it through ``sh -c``),
and the stage's arguments are data: ``S2D_ARGS_JSON`` in the pods' environment, which the job's driver
inherits. ``S2D_ENGINE=ray`` and ``S2D_RAY_WORKERS`` = nodes x GPUs make the stage run as a Ray Train job
(stages/ray_train.py). Nothing of the trigger's goes into ``entrypoint``, ``runtimeEnvYAML`` or ``metadata``
(KubeRay quotes those into a shell line). Credentials come from the Secret (``envFrom``), never in the
spec. Settings (env ``S2D_*`` / Variables ``s2d_*``): ``rayjob_nodes`` (2), ``rayjob_ttl_seconds`` (600),
``rayjob_backoff_limit`` (0: Ray Train already restarts lost workers), ``kueue_queue`` (optional
``kueue.x-k8s.io/queue-name`` label), ``stage_timeout_hours`` (the job's ``activeDeadlineSeconds``), and the
``k8s_*`` settings of the kubernetes runner.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from typing import Any

import s2d_contract as c
import s2d_runners as r
import s2d_settings as s

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
RAY_VERSION = "2.60.0"  # pyproject.toml extra "ray"; the image's Ray must match the cluster's
TERMINAL = ("Complete", "Failed", "ValidationFailed")


def rayjob_name(dag_id: str, run_id: str, stage: str) -> str:
    """Stable per DAG run and stage, DNS-1123, short enough for the names KubeRay derives from it."""
    digest = hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:10]
    return f"s2d-{stage.replace('_', '-')}-{digest}"


def _container(name: str, image: str, env: dict[str, str], resources: dict) -> dict:
    return {
        "name": name,
        "image": image,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        # credentials: from the Secret, resolved by the kubelet; never rendered into this spec
        "envFrom": [{"secretRef": {"name": s.setting("k8s_secret", "s2d-credentials")}}],
        "resources": resources,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    }


def _pod(container: dict, gpu: bool) -> dict:
    spec: dict[str, Any] = {
        "serviceAccountName": s.setting("k8s_service_account", "s2d-stage"),
        "containers": [container],
        # Ray's object store and NCCL use shared memory; a container's default is 64 MiB
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.setting("k8s_shm", "16Gi")}}],
    }
    pull = [{"name": s.strip()} for s in (s.setting("k8s_image_pull_secrets") or "").split(",") if s.strip()]
    if pull:
        spec["imagePullSecrets"] = pull
    if gpu:
        spec["nodeSelector"] = r.gpu_node_selector()
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/part-of": "sparse-to-dense"}}, "spec": spec}


def rayjob_spec(stage: str, args: list[str], name: str) -> dict:
    """The RayJob custom resource running ``python -m stages <args>`` as a Ray Train job (``args`` as data)."""
    nodes = int(s.setting("rayjob_nodes", "2"))
    gpus = c.gpu_count(stage)
    image = s.setting("ray_image") or s.setting("image", r.DEFAULT_IMAGE)
    env = {**r.plain_env(), **r.container_stage_env(stage), "S2D_ENGINE": "ray", "S2D_RAY_WORKERS": str(nodes * max(gpus, 1)),
           "S2D_RAY_GPUS_PER_WORKER": "1" if gpus else "0", "RAY_USAGE_STATS_ENABLED": "0", **c.args_env(args)}
    env.pop("S2D_GPUS", None)  # Ray Train places the ranks; no accelerate relaunch inside a worker
    memory = s.setting("k8s_memory", "64Gi")
    gpu_limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    worker = _container("ray-worker", image, env, {"requests": {"cpu": s.setting("k8s_cpu", "8"), "memory": memory, **gpu_limits},
                                                    "limits": {"memory": memory, **gpu_limits}})
    head = _container("ray-head", image, env, {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}})
    labels = {"app.kubernetes.io/part-of": "sparse-to-dense", "s2d/stage": stage}
    if s.setting("kueue_queue"):
        labels["kueue.x-k8s.io/queue-name"] = s.setting("kueue_queue")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": s.setting("k8s_namespace", "s2d"), "labels": labels},
        "spec": {
            "entrypoint": " ".join(c.stage_argv()),  # a constant: never a value of the trigger
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": int(s.setting("rayjob_ttl_seconds", "600")),
            "activeDeadlineSeconds": int(float(s.setting("stage_timeout_hours", "24")) * 3600),
            "backoffLimit": int(s.setting("rayjob_backoff_limit", "0")),
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": _pod(head, gpu=False)},
                "workerGroupSpecs": [{"groupName": "gpu", "replicas": nodes, "minReplicas": nodes, "maxReplicas": nodes,
                                      "rayStartParams": {}, "template": _pod(worker, gpu=bool(gpus))}],
            },
        },
    }


# ---------------------------------------------------------------- the job's state


class RayJobFailed(Exception):
    pass


def rayjob_done(obj: dict | None, name: str = "RayJob") -> bool:
    """True once the job succeeded, False while it is on its way (no status yet, pending, running,
    retrying, suspended by a queue); raises :class:`RayJobFailed` with KubeRay's reason and message."""
    status = (obj or {}).get("status") or {}
    deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    if deployment not in TERMINAL:
        return False
    if deployment == "Complete" and job == "SUCCEEDED":
        return True
    raise RayJobFailed(f"RayJob {name} {deployment.lower()} (jobStatus {job or 'unknown'}, reason "
                       f"{status.get('reason') or 'unknown'}): {status.get('message') or 'no message'}")


@functools.cache
def _operators():
    """The Airflow classes, imported when the runner is used (the DAG module stays light)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.operators.resource import (
        KubernetesCreateResourceOperator,
        KubernetesDeleteResourceOperator,
    )
    from airflow.sdk import BaseSensorOperator
    from airflow.triggers.base import BaseTrigger, TriggerEvent

    class CreateRayJobOperator(KubernetesCreateResourceOperator):
        """Renders the stage's RayJob from the task's arguments (checked by the trigger policy when it
        executes) and creates it; returns its name. A stage the run's plan switches off is skipped without
        starting a cluster."""

        def __init__(self, *, stage: str, form: set[str], **kw):
            super().__init__(custom_resource_definition=True, yaml_conf="-", **kw)
            self.stage, self.form = stage, frozenset(form)

        def execute(self, context) -> str:
            import yaml

            args = r.context_args(context, self.stage, self.form, "rayjob")
            plan = context["ti"].xcom_pull(task_ids="plan")
            plan = c.last_json(plan) if isinstance(plan, str) else (plan or {})
            if plan.get("stages") is not None and self.stage not in plan["stages"]:
                from airflow.sdk.exceptions import AirflowSkipException

                raise AirflowSkipException("switched off by this run's parameters")
            r.credentials_in_uri_warning(self.log, s.setting("k8s_secret", "s2d-credentials"))
            dag_run = context["dag_run"]
            name = rayjob_name(dag_run.dag_id, dag_run.run_id, self.stage)
            self.yaml_conf = yaml.safe_dump(rayjob_spec(self.stage, args, name), sort_keys=False)
            super().execute(context)
            return name

    class DeleteRayJobOperator(KubernetesDeleteResourceOperator):
        """Deletes the RayJob (its Ray cluster goes with it); one already gone (TTL) is fine."""

        template_fields = (*KubernetesDeleteResourceOperator.template_fields, "name")

        def __init__(self, *, name: str, **kw):
            super().__init__(custom_resource_definition=True, yaml_conf="-", **kw)
            self.name = name

        def execute(self, context) -> None:
            from kubernetes.client.exceptions import ApiException

            try:
                self.hook.delete_custom_object(GROUP, VERSION, PLURAL, self.name, self.get_namespace())
            except ApiException as e:
                if e.status != 404:
                    raise
                self.log.info("RayJob %s is already gone", self.name)

    class RayJobTrigger(BaseTrigger):
        """Polls the RayJob from the triggerer (no worker slot held) until it succeeds or fails."""

        def __init__(self, name: str, namespace: str, kubernetes_conn_id: str | None, poll_interval: float):
            super().__init__()
            self.name, self.namespace, self.conn_id, self.poll_interval = name, namespace, kubernetes_conn_id, poll_interval

        def serialize(self):
            return ("s2d_rayjob.RayJobTrigger", {"name": self.name, "namespace": self.namespace,
                                                 "kubernetes_conn_id": self.conn_id, "poll_interval": self.poll_interval})

        async def run(self):
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
            from kubernetes_asyncio.client import CustomObjectsApi

            hook = AsyncKubernetesHook(conn_id=self.conn_id)
            while True:
                async with hook.get_conn() as api:
                    obj = await CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                                                 PLURAL, self.name)
                try:
                    if rayjob_done(obj, self.name):
                        yield TriggerEvent({"status": "success", "name": self.name})
                        return
                except RayJobFailed as e:
                    yield TriggerEvent({"status": "error", "name": self.name, "message": str(e)})
                    return
                await asyncio.sleep(self.poll_interval)

    class RayJobSensor(BaseSensorOperator):
        """Waits for the RayJob to finish: deferred to the triggerer by default, or poking."""

        template_fields = ("name", "namespace")

        def __init__(self, *, name: str, namespace: str, kubernetes_conn_id: str | None = KubernetesHook.default_conn_name,
                     deferrable: bool = True, **kw):
            kw.setdefault("poke_interval", 30)
            super().__init__(**kw)
            self.name, self.namespace, self.kubernetes_conn_id = name, namespace, kubernetes_conn_id
            self.deferrable = deferrable

        def poke(self, context) -> bool:
            hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
            try:
                return rayjob_done(hook.get_custom_object(GROUP, VERSION, PLURAL, self.name, self.namespace), self.name)
            except RayJobFailed as e:
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(str(e)) from None  # a failed job does not get better by poking again

        def execute(self, context):
            if not self.deferrable or self.poke(context):
                return super().execute(context) if not self.deferrable else None
            self.defer(trigger=RayJobTrigger(self.name, self.namespace, self.kubernetes_conn_id, float(self.poke_interval)),
                       method_name="execute_complete", timeout=self.execution_timeout)

        def execute_complete(self, context, event: dict) -> None:
            if event["status"] != "success":
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(event["message"])
            self.log.info("RayJob %s succeeded", event["name"])

    return CreateRayJobOperator, RayJobSensor, DeleteRayJobOperator, RayJobTrigger


def __getattr__(name: str):  # the triggerer imports s2d_rayjob.RayJobTrigger by its path
    classes = dict(zip(("CreateRayJobOperator", "RayJobSensor", "DeleteRayJobOperator", "RayJobTrigger"), _operators()))
    if name in classes:
        return classes[name]
    raise AttributeError(name)


def stage_group(group_id: str, stage: str, form: set[str], **opts):
    """``create -> wait -> delete`` (teardown) for one stage, in a task group ``group_id``; the same call
    shape as the container runners' operators (``s2d_runners.docker_operator``)."""
    from airflow.sdk import TaskGroup

    create_cls, sensor_cls, delete_cls, _ = _operators()
    namespace = s.setting("k8s_namespace", "s2d")
    conn = s.setting("k8s_conn_id", "kubernetes_default")
    # no Airflow retries (a re-created job would clash with its name; the RayJob's backoffLimit and Ray Train's
    # FailureConfig retry instead) and no Airflow GPU pool (Kubernetes / Kueue schedule the GPUs)
    opts = {
        k: v
        for k, v in opts.items()
        if k not in ("retries", "retry_delay", "retry_exponential_backoff", "max_retry_delay", "pool")
    }
    outlets = opts.pop("outlets", None)
    trigger_rule = opts.pop("trigger_rule", None)
    timeout = opts.pop("execution_timeout", None)
    with TaskGroup(group_id) as group:
        name = "{{ ti.xcom_pull(task_ids='%s.create') }}" % group_id
        create = create_cls(task_id="create", stage=stage, form=form, namespace=namespace,
                            kubernetes_conn_id=conn, **({"trigger_rule": trigger_rule} if trigger_rule else {}), **opts)
        wait = sensor_cls(task_id="wait", name=name, namespace=namespace, kubernetes_conn_id=conn, outlets=outlets or [],
                          execution_timeout=timeout, **opts)
        delete = delete_cls(task_id="delete", name=name, namespace=namespace, kubernetes_conn_id=conn)
        create >> wait >> delete.as_teardown(setups=create)
    return group
