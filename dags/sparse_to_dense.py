"""Sparse-to-dense post-training: one Airflow task per stage.

    plan -> bootstrap -> teacher_rl -> kl_warmup -> onpolicy_distill -> student_rl -> report
                    \\-> direct_grpo (baseline) --------------------------------------/

Trigger it from the UI (the form is built from ``params`` below) or from the command line:

    airflow dags test sparse_to_dense -c '{"preset": "tiny", "artifact_root": "runs/dag-demo"}'

Every task runs the same stage command (``python -m stages <stage> ...``, see ``s2d_runners``);
tasks pass only the artifact root and the MLflow parent run id. Stages switched off in the form are
skipped (the paper's ablations). Re-running a DAG run, or triggering with the same artifact root,
skips the stages already published. Deployment settings (env ``S2D_*`` or Airflow Variables
``s2d_*``): ``runner`` (local | docker | kubernetes | rayjob: s2d_rayjob), ``schedule`` (cron; default none),
``artifact_root``, ``stage_python``, ``image``, ``gpu_pool``, ``stage_timeout_hours``.
"""

from __future__ import annotations

import functools
from datetime import timedelta

import pendulum
import s2d_runners as r
from airflow.sdk import DAG, Asset, Param, get_current_context, task

DAG_ID = "sparse_to_dense"
RUNNER = r.setting("runner", "local")
POOL = r.setting("gpu_pool", "gpu")
TIMEOUT = timedelta(hours=float(r.setting("stage_timeout_hours", "24")))
STAGES = ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"]
STEP_STAGES = ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo"]
ASSETS = {s: Asset(f"s2d://{DAG_ID}/{s}") for s in ["bootstrap", "teacher_data", *STEP_STAGES]}
FINAL_STUDENT = Asset(f"s2d://{DAG_ID}/final_student")

params = {
    "preset": Param("tiny", enum=["tiny", "qwen3-1.7b", "llama3.1-8b"], description="config preset (stages/configs/)"),
    "teacher": Param(None, type=["null", "string"], description="teacher checkpoint: hub id or artifact URI (default: the preset's)"),
    "student": Param(None, type=["null", "string"], description="student checkpoint: hub id or artifact URI (default: the preset's)"),
    "stages": Param(STAGES, type="array", items={"type": "string", "enum": STAGES}, uniqueItems=True,
                    description="stages to run; leave one out for the paper's ablations"),
    "baseline": Param(True, type="boolean", description="also run direct GRPO on the base student (same labeled data, same student steps)"),
    "seed": Param(0, type="integer", minimum=0),
    "steps": Param({}, type="object", description="step budgets per stage, e.g. {\"teacher_rl\": 100}",
                   properties={s: {"type": ["null", "integer"], "minimum": 0} for s in STEP_STAGES}, additionalProperties=False),
    "artifact_root": Param(None, type=["null", "string"], pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,62}/.*|file://.*|[^:]*)$",
                           description="default: <S2D_ARTIFACT_ROOT>/<dag_id>/<run_id>; reuse a root to resume or skip finished stages"),
    "overrides": Param([], type="array", items={"type": "string", "pattern": r"^[a-z_][a-z0-9_.]*=.*$"},
                       description="advanced: extra key.path=value config overrides"),
}


def s2d_args(command: str, params: dict, dag_id: str, run_id: str, plan=None) -> list[str]:
    """Template macro: the stage command's arguments for this DAG run (container runners)."""
    if isinstance(plan, str):
        plan = r.last_json(plan)
    parent = (plan or {}).get("parent_run_id")
    root = (plan or {}).get("root") or r.artifact_root(params, dag_id, run_id)
    args = r.stage_args(command, params, root, parent)
    pod = RUNNER == "kubernetes" or RUNNER == "rayjob" and command not in r.GPU_STAGES
    return args + (["--xcom-file", "/airflow/xcom/return.json"] if pod else [])


def stage_task(command: str, **kw):
    """One task running ``python -m stages <command>`` with the configured runner."""
    gpu = command in r.GPU_STAGES
    opts = {**r.RETRY, "execution_timeout": TIMEOUT if gpu else timedelta(minutes=30),
            "pool": POOL if gpu else "default_pool", **kw}
    if RUNNER == "local":

        @task(task_id=command, **opts)
        def run(plan: dict | None = None) -> dict:
            ctx = get_current_context()
            dag_run = ctx["dag_run"]
            root = (plan or {}).get("root") or r.artifact_root(ctx["params"], dag_run.dag_id, dag_run.run_id)
            args = r.stage_args(command, ctx["params"], root, (plan or {}).get("parent_run_id"))
            airflow_env = {"AIRFLOW_CTX_DAG_ID": dag_run.dag_id, "AIRFLOW_CTX_DAG_RUN_ID": dag_run.run_id,
                           "AIRFLOW_CTX_TRY_NUMBER": str(ctx["ti"].try_number)}
            out = r.run_local(args, airflow_env)
            if command == "plan":
                return {"root": root, "parent_run_id": out.get("parent_run_id"), "stages": out.get("stages")}
            if command == "report":
                ctx["outlet_events"][FINAL_STUDENT].extra = {"uri": out["final_student"], "teacher": out["teacher"]}
            # small values only: URIs and ids, never checkpoints or metrics tables
            return {k: out[k] for k in ("stage", "skipped", "uri", "outputs", "mlflow_run_id", "final_student") if k in out}

        return run

    template = "{{ s2d_args('%s', params, dag_run.dag_id, dag_run.run_id, %s) }}" % (
        command, "None" if command == "plan" else "ti.xcom_pull(task_ids='plan')")
    make = r.docker_operator if RUNNER == "docker" else r.kubernetes_operator
    if RUNNER == "rayjob" and gpu:  # a KubeRay RayJob per training stage: create -> wait -> delete (s2d_rayjob)
        import s2d_rayjob

        make = functools.partial(s2d_rayjob.stage_group, plan_template="{{ ti.xcom_pull(task_ids='plan') }}")

    def build(plan=None):
        op = make(command, command, template, **opts)
        if plan is not None:
            plan >> op
        return op

    return build


with DAG(
    dag_id=DAG_ID,
    description="Sparse-to-dense post-training: teacher GRPO -> forward-KL warmup -> on-policy distillation -> student GRPO",
    schedule=r.setting("schedule") or None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=params,
    user_defined_macros={"s2d_args": s2d_args},
    render_template_as_native_obj=True,
    doc_md=__doc__,
    tags=["post-training", "distillation", "grpo"],
) as dag:
    plan = stage_task("plan")()
    boot = stage_task("bootstrap", outlets=[ASSETS["bootstrap"]])(plan)
    prev = boot
    # teacher_data (stored teacher top-k for kl_warmup.form topk) runs before 2a; skipped when not planned
    for stage in ["teacher_rl", "teacher_data", *STAGES[1:]]:
        nxt = stage_task(stage, trigger_rule="none_failed", outlets=[ASSETS[stage]])(plan)
        prev >> nxt
        prev = nxt
    baseline = stage_task("direct_grpo", trigger_rule="none_failed", outlets=[ASSETS["direct_grpo"]])(plan)
    boot >> baseline
    report = stage_task("report", trigger_rule="none_failed", outlets=[FINAL_STUDENT])(plan)
    [prev, baseline] >> report
    # teardown: a failed or killed run leaves none of its MLflow runs RUNNING (nothing to do after success)
    report >> stage_task("close-runs")(plan).as_teardown()
