"""Scheduled retraining: one DAG ``sparse_to_dense__<name>`` per ``<name>.yaml`` in the schedules folder
(setting ``schedules``, default ``dags/schedules``), and the rule that a late scheduled run does not train
unannounced."""

from __future__ import annotations

from datetime import timedelta

import s2d_policy as policy
import s2d_settings as s


def read_schedule(path, form: dict):
    """A schedule file: ``cron: "<expr>"`` (UTC) or ``asset: <uri>`` (run when that asset gets an
    event, e.g. new data), and ``conf:``, the trigger values the scheduled runs use. Returns
    ``(name, schedule, conf)``; raises ValueError naming the problem (the caller logs and skips it).
    Its conf passes the same checks as a trigger's (:func:`s2d_policy.refusal`)."""
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
    problem = policy.refusal({**{k: p.value for k, p in form.items()}, **conf}, set(form))
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
    if late > timedelta(minutes=float(s.setting("missed_slot_grace_minutes", "60"))):
        import s2d_alerts
        from airflow.sdk.exceptions import AirflowSkipException

        why = f"missed slot {slot.isoformat()} ({late} late): not run late; the next slot runs"
        s2d_alerts.missed_slot(context, why)
        raise AirflowSkipException(why)
