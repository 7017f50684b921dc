"""Sparse-to-dense post-training: one Airflow task per stage of the stage table (``stages/registry.py``).

    plan -> bootstrap -> teacher_rl -> teacher_data -> kl_warmup -> onpolicy_distill -> student_rl -> report
                    \\-> direct_grpo (baseline) -----------------------------------------------------/
    report -> promote -> approval -> promote_approved | promote_rejected

After the report, the promotion gate (``promote``, the table's ``gate`` rows) evaluates the final student
against the baseline and the registered ``@champion`` and moves the aliases (docs/promotion.md); with the
form's ``approval`` on, a passing version waits for a person (``s2d_approval``). Alerts (``s2d_alerts``): a
failed run, a refused trigger, a kept champion, a pending approval and a missed schedule slot go to the
e-mail addresses and/or the webhook the deployment configures.

Trigger it from the UI (the form is built from ``params`` below) or from the command line:

    airflow dags test sparse_to_dense -c '{"preset": "tiny", "teacher_rl_steps": 20}'

Every task runs the same stage command (``python -m stages``, its arguments as data: ``s2d_contract``);
tasks pass only the artifact root and the MLflow parent run id. Stages switched off in the form are
skipped (the paper's ablations). Re-running a DAG run, or triggering with the same artifact root,
skips the stages already published. The trigger's values are checked before anything runs (types and
ranges by the form, the deployment's allow-lists and caps by every task: ``s2d_policy``).

The tasks, their order and dependencies, the form's stage switches and step budgets all come from the
stage table (``s2d_table``): a stage reading a role waits for the earlier stages that make it.

Scheduled retraining: one DAG ``sparse_to_dense__<name>`` per ``<name>.yaml`` in the schedules folder
(setting ``schedules``, default ``dags/schedules``): ``cron:`` (or ``asset:`` for data-aware runs) and
``conf:``, the run configuration it uses. A file that does not parse is logged and ignored.

Deployment settings (env ``S2D_*``; while a task runs also Airflow Variables ``s2d_*``): ``runner``
(local | docker | kubernetes | rayjob: four runners), ``artifact_base`` (the BASE folder of every run's
root; formerly ``artifact_root``), ``allowed_overrides``, ``allowed_model_prefixes``, ``allowed_buckets``,
the caps ``max_*`` (``s2d_policy.CAPS``), ``schedules``, ``missed_slot_grace_minutes``, ``stage_python``,
``stage_env_passthrough``, ``image``, ``gpu_pool``, ``stage_timeout_hours``; the gate's ``approval`` (the form's
default), ``approval_timeout_hours``, ``approvers``, ``usd_per_accelerator_hour``; alerts ``alert_emails``,
``alert_smtp_conn_id``, ``alert_webhook``, ``alert_events``, ``alert_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

# Airflow's own commands (`airflow dags list --local`) do not put the DAG folder on sys.path: the helpers
# next to this file are found from here
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pendulum  # noqa: E402
import s2d_alerts as alerts  # noqa: E402
import s2d_approval  # noqa: E402
import s2d_contract as contract  # noqa: E402
import s2d_form as form  # noqa: E402
import s2d_runners as r  # noqa: E402
import s2d_schedules  # noqa: E402
import s2d_settings as s  # noqa: E402
import s2d_table as table  # noqa: E402
from airflow.sdk import DAG, Asset, Param  # noqa: E402

log = logging.getLogger(__name__)
DAG_ID = "sparse_to_dense"
form_params = form.form_params
params = form_params()
FORM = set(params)


def stage_task(command: str, runner: str, **kw):
    """One task (``rayjob``: a create -> wait -> delete group) running ``python -m stages`` for ``command``;
    returns a builder taking the ``plan`` task (or nothing, for ``plan`` itself)."""
    gpu = command in table.GPU_STAGES
    opts = {**r.retry(), "execution_timeout": timeout() if gpu else timedelta(minutes=30),
            "pool": s.setting("gpu_pool", "gpu") if gpu else "default_pool", **kw}
    if command == "plan":
        opts["pre_execute"] = s2d_schedules.skip_missed_slot
    if command == "report":
        opts["post_execute"] = r.final_student_event  # every runner: the asset event names the final student
    if command == "promote":
        opts["post_execute"] = alerts.gate_outcome  # a kept champion or a pending approval reaches a person
    if runner == "local":
        return r.local_task(command, FORM, **opts)
    make = r.docker_operator if runner == "docker" else r.kubernetes_operator
    if runner == "rayjob" and gpu and command in table.TASKS:  # a KubeRay RayJob per training stage (s2d_rayjob)
        import s2d_rayjob

        make = s2d_rayjob.stage_group

    def build(plan=None):
        op = make(command, command, FORM, **opts)
        if plan is not None:
            plan >> op
        return op

    return build


def timeout() -> timedelta:
    return timedelta(hours=float(s.setting("stage_timeout_hours", "24")))


def sparse_to_dense(dag_id: str = DAG_ID, schedule=None, form: dict | None = None, description: str = "") -> DAG:
    """The DAG: the manual one (no schedule), or a scheduled one whose form defaults are its conf."""
    runner = s.setting("runner", "local")
    with DAG(
        dag_id=dag_id,
        description=description or "Sparse-to-dense post-training: teacher GRPO -> forward-KL warmup -> "
                                   "on-policy distillation -> student GRPO",
        schedule=schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,  # never back-fill; the last missed slot is skipped by plan (s2d_schedules.skip_missed_slot)
        max_active_runs=1,
        params=form or params,
        render_template_as_native_obj=True,
        doc_md=__doc__,
        tags=["post-training", "distillation", "grpo"] + (["scheduled"] if schedule else []),
        on_failure_callback=alerts.run_failed,  # a failed run or a refused trigger reaches a person
    ) as dag:
        # none_failed_min_one_success: a stage switched off (skipped) does not stop the stages after it (its
        # input passes through); every stage also waits for plan, so a skipped plan (a missed schedule
        # slot) skips everything
        after = "none_failed_min_one_success"
        plan = stage_task("plan", runner)()
        tasks = {}
        for name in table.TASKS:
            rule = {"trigger_rule": after} if table.upstream(name) else {}
            tasks[name] = stage_task(name, runner, outlets=[Asset(f"s2d://{DAG_ID}/{name}")], **rule)(plan)
            for before in sorted(table.upstream(name), key=table.TASKS.index):
                tasks[before] >> tasks[name]
        report = stage_task("report", runner, trigger_rule=after, outlets=[Asset(contract.FINAL_STUDENT_URI)])(plan)
        [tasks[n] for n in table.last_stages()] >> report
        # the gates after the report (promote), then the optional approval and its two verdicts
        last = report
        for name in table.GATES:
            gate = stage_task(name, runner)(plan)
            last >> gate
            last = gate
        approval = s2d_approval.approval_task()
        last >> approval >> [stage_task(t, runner)(plan) for t in s2d_approval.BRANCHES.values()]
        # teardown: a failed or killed run leaves none of its MLflow runs RUNNING (nothing to do after success)
        [report, last] >> stage_task("close-runs", runner)(plan).as_teardown()
    return dag


def scheduled_dags(where: Path) -> dict[str, DAG]:
    """One DAG per schedule file, its description the file's (``description:``). A file that does not load
    has no DAG and is logged; ``sparse_to_dense_schedules.py`` makes it an import error in the UI. The
    other DAGs always load."""
    dags = {}
    good, broken = s2d_schedules.load(where, params)
    for path, why in broken:
        log.error("schedule %s ignored: %s", path, why)
    for sched in good:
        defaults = {k: Param(sched.conf[k], **p.schema, description=p.description) if k in sched.conf else p
                    for k, p in params.items()}
        dag_id = f"{DAG_ID}__{sched.name}"
        dags[dag_id] = sparse_to_dense(dag_id, sched.schedule, defaults,
                                       sched.description or f"Scheduled retraining from {sched.name}.yaml")
    return dags


dag = sparse_to_dense()
globals().update(scheduled_dags(s2d_schedules.folder()))
