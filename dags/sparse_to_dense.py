"""Sparse-to-dense post-training: one Airflow task per stage.

    plan -> bootstrap -> import -> prune -> teacher_rl -> kl_warmup -> onpolicy_distill -> student_rl -> report
                                   \\-> direct_grpo (baseline) --------------------------------------/

Trigger it from the UI (the form is built from ``params`` below) or from the command line:

    airflow dags test sparse_to_dense -c '{"preset": "tiny", "teacher_rl_steps": 20}'

Every task runs the same stage command (``python -m stages <stage> ...``, see ``s2d_runners``);
tasks pass only the artifact root and the MLflow parent run id. Stages switched off in the form are
skipped (the paper's ablations). Re-running a DAG run, or triggering with the same artifact root,
skips the stages already published. The trigger's values are checked before anything runs (types and
ranges by the form, the deployment's allow-lists by ``plan``: see ``s2d_runners.refusal``).

Scheduled retraining: one DAG ``sparse_to_dense__<name>`` per ``<name>.yaml`` in the schedules folder
(setting ``schedules``, default ``dags/schedules``): ``cron:`` (or ``asset:`` for data-aware runs) and
``conf:``, the run configuration it uses. A file that does not parse is logged and ignored.

Deployment settings (env ``S2D_*`` or Airflow Variables ``s2d_*``): ``runner`` (local | docker |
kubernetes | rayjob: s2d_rayjob), ``artifact_root`` (the BASE of every run's root), ``allowed_overrides``,
``allowed_model_prefixes``, ``allowed_buckets``, ``schedules``, ``missed_slot_grace_minutes``,
``stage_python``, ``image``, ``gpu_pool``, ``stage_timeout_hours``.
"""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from pathlib import Path

import pendulum
import s2d_runners as r
from airflow.sdk import DAG, Asset, Param, get_current_context, task

log = logging.getLogger(__name__)
DAG_ID = "sparse_to_dense"
RUNNER = r.setting("runner", "local")
POOL = r.setting("gpu_pool", "gpu")
TIMEOUT = timedelta(hours=float(r.setting("stage_timeout_hours", "24")))
STAGES = ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"]
STEP_STAGES = list(r.STEP_STAGES)
SETUP = ["bootstrap", "import", "prune"]  # the base models: built, imported, derived (each skipped unless a source names it)
ASSETS = {s: Asset(f"s2d://{DAG_ID}/{s}") for s in [*SETUP, "teacher_data", *STEP_STAGES]}
FINAL_STUDENT = Asset(r.FINAL_STUDENT_URI)
LABELS = {"teacher_rl": "1 · Teacher GRPO (sparse verifier reward)", "kl_warmup": "2a · Forward-KL warmup of the student",
          "onpolicy_distill": "2b · On-policy distillation (dense reward)", "student_rl": "3 · Student GRPO",
          "direct_grpo": "Baseline · direct GRPO on the student"}
RUN, BUDGETS, MODELS, WHERE, ADVANCED = ("What to run", "Step budgets (empty: the preset's)", "Models",
                                         "Where the artifacts go", "Config overrides (advanced)")

params = {
    "preset": Param("tiny", type="string", enum=["tiny", "qwen3-1.7b", "llama3.1-8b"], title="Preset", section=RUN,
                    values_display={"tiny": "tiny: built-in models, runs on a CPU in minutes",
                                    "qwen3-1.7b": "qwen3-1.7b: Qwen3-8B teacher, Qwen3-1.7B student (GPUs)",
                                    "llama3.1-8b": "llama3.1-8b: Llama-3.3-70B teacher, Llama-3.1-8B student (GPUs)"},
                    description="the configuration the run starts from (stages/configs/<preset>.yaml)"),
    "stages": Param(STAGES, type=["array", "null"], items={"type": "string", "enum": STAGES}, uniqueItems=True,
                    minItems=1, examples=STAGES, values_display={s: LABELS[s] for s in STAGES}, title="Stages",
                    section=RUN, description="the workflow's stages; leave one out for the paper's ablations"),
    "baseline": Param(True, type="boolean", title="Also run the direct-GRPO baseline", section=RUN,
                      description="GRPO on the base student with the same labeled data and student step budget"),
    "seed": Param(0, type="integer", minimum=0, title="Seed", section=RUN,
                  description="random seed of every stage (a whole number, 0 or more)"),
    **{f"{s}_steps": Param(None, type=["null", "integer"], minimum=0, title=LABELS[s], section=BUDGETS,
                           description="optimizer steps (a whole number, 0 or more; empty: the preset's)")
       for s in STEP_STAGES},
    "teacher": Param(None, type=["null", "string"], maxLength=500, title="Teacher model", section=MODELS,
                     description_md="empty: the preset's. A hub id under an allowed prefix, `models:/<name>/<version>`, "
                                    "or a published checkpoint under the artifact base"),
    "student": Param(None, type=["null", "string"], maxLength=500, title="Student model", section=MODELS,
                     description_md="empty: the preset's. Same rules as the teacher"),
    "artifact_root": Param(None, type=["null", "string"], maxLength=500, title="Artifact root", section=WHERE,
                           description_md="empty: `<S2D_ARTIFACT_ROOT>/<dag_id>/<run_id>`. A folder under the artifact "
                                          "base (or `s3://<allowed bucket>/...`); reuse a root to resume or skip "
                                          "finished stages"),
    "overrides": Param([], type=["array", "null"], items={"type": "string", "maxLength": 2000}, title="Config overrides",
                       section=ADVANCED, description_md="one `key.path=value` per line, checked against the config "
                                                        "schema by `plan` (keys: the deployment's allow-list)"),
}
FORM = set(params)


def s2d_args(command: str, params: dict, dag_id: str, run_id: str, plan=None) -> list[str]:
    """Template macro of the container runners: :func:`s2d_runners.task_args`, as the local runner."""
    return r.task_args(command, params, FORM, dag_id, run_id, plan, RUNNER)


def stage_task(command: str, **kw):
    """One task running ``python -m stages <command>`` with the configured runner."""
    gpu = command in r.GPU_STAGES
    opts = {**r.RETRY, "execution_timeout": TIMEOUT if gpu else timedelta(minutes=30),
            "pool": POOL if gpu else "default_pool", **kw}
    if command == "plan":
        opts["pre_execute"] = r.skip_missed_slot
    if command == "report":
        opts["post_execute"] = r.final_student_event  # every runner: the asset event names the final student
    if RUNNER == "local":

        @task(task_id=command, **opts)
        def run(plan: dict | None = None) -> dict:
            ctx = get_current_context()
            dag_run = ctx["dag_run"]
            args = r.task_args(command, ctx["params"], FORM, dag_run.dag_id, dag_run.run_id, plan)
            out = r.run_local(args, r.airflow_ctx_env(ctx["ti"]))
            if command == "plan":
                return {"root": out.get("root"), "parent_run_id": out.get("parent_run_id"), "stages": out.get("stages")}
            # small values only: URIs and ids, never checkpoints or metrics tables
            keep = ("stage", "skipped", "uri", "outputs", "mlflow_run_id", "final_student", "teacher")
            return {k: out[k] for k in keep if k in out}

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


def sparse_to_dense(dag_id: str = DAG_ID, schedule=None, form: dict | None = None, description: str = "") -> DAG:
    """The DAG: the manual one (no schedule), or a scheduled one whose form defaults are its conf."""
    with DAG(
        dag_id=dag_id,
        description=description or "Sparse-to-dense post-training: teacher GRPO -> forward-KL warmup -> "
                                   "on-policy distillation -> student GRPO",
        schedule=schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,  # never back-fill; the last missed slot is skipped by plan (r.skip_missed_slot)
        max_active_runs=1,
        params=form or params,
        user_defined_macros={"s2d_args": s2d_args},
        render_template_as_native_obj=True,
        doc_md=__doc__,
        tags=["post-training", "distillation", "grpo"] + (["scheduled"] if schedule else []),
    ) as dag:
        # none_failed_min_one_success: a stage switched off (skipped) does not stop the next one, a
        # skipped plan (a missed schedule slot) skips everything
        after = "none_failed_min_one_success"
        plan = stage_task("plan")()
        boot = stage_task("bootstrap", outlets=[ASSETS["bootstrap"]])(plan)
        for stage in SETUP[1:]:  # import -> prune (a student cut from the imported teacher)
            nxt = stage_task(stage, trigger_rule=after, outlets=[ASSETS[stage]])(plan)
            boot >> nxt
            boot = nxt
        prev = boot
        # teacher_data (stored teacher top-k for kl_warmup.form topk) runs before 2a; skipped when not planned
        for stage in ["teacher_rl", "teacher_data", *STAGES[1:]]:
            nxt = stage_task(stage, trigger_rule=after, outlets=[ASSETS[stage]])(plan)
            prev >> nxt
            prev = nxt
        baseline = stage_task("direct_grpo", trigger_rule=after, outlets=[ASSETS["direct_grpo"]])(plan)
        boot >> baseline
        report = stage_task("report", trigger_rule=after, outlets=[FINAL_STUDENT])(plan)
        [prev, baseline] >> report
        # teardown: a failed or killed run leaves none of its MLflow runs RUNNING (nothing to do after success)
        report >> stage_task("close-runs")(plan).as_teardown()
    return dag


dag = sparse_to_dense()


def scheduled_dags(folder: Path) -> dict[str, DAG]:
    """One DAG per schedule file; a file that does not parse, or whose cron or conf is invalid, is
    logged and skipped: the other DAGs still load."""
    dags = {}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            name, schedule, conf = r.read_schedule(path, params)
            form = {k: Param(conf[k], **p.schema, description=p.description) if k in conf else p for k, p in params.items()}
            dag_id = f"{DAG_ID}__{name}"
            dags[dag_id] = sparse_to_dense(dag_id, schedule, form, f"Scheduled retraining from {path.name}")
        except Exception as e:  # noqa: BLE001 - one bad file must not take the other DAGs offline
            log.error("schedule %s ignored: %s", path, e)
    return dags


globals().update(scheduled_dags(Path(r.setting("schedules") or Path(__file__).parent / "schedules")))
