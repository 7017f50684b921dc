"""Scheduled retraining: one DAG ``sparse_to_dense__<name>`` per ``<name>.yaml`` in the schedules folder
(setting ``schedules``, default ``dags/schedules``), the check that makes a broken file visible, and the
rule that a late scheduled run does not train unannounced.

A schedule file holds four keys, each honoured or the file refused: ``cron`` (UTC) or ``asset`` (one
of them), ``conf`` (the scheduled runs' values, checked like a trigger's) and ``description`` (the DAG's
description). A file that does not load gets no DAG; ``sparse_to_dense_schedules.py`` turns it into an
import error in Airflow's UI, naming the file and why. ``<name>.yaml.disabled`` is not read (the
shipped ``example.yaml.disabled``); ``<name>.yml`` is refused (the suffix is ``.yaml``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import s2d_policy as policy
import s2d_settings as s

KEYS = ("cron", "asset", "conf", "description")


class Schedule(NamedTuple):
    name: str  # the file's stem: the DAG is sparse_to_dense__<name>
    schedule: object  # a cron timetable or a list of assets
    conf: dict  # the form's defaults for its runs
    description: str  # the DAG's description ("" when the file has none)


class ScheduleFileError(ValueError):
    """Schedule files that do not load (they have no DAG): each file and why, one per line."""

    def __init__(self, broken: list[tuple[Path, str]]):
        self.broken = broken
        n = len(broken)
        lines = [f"{path}: {why}" for path, why in broken]
        super().__init__(f"{n} schedule file{'s' if n > 1 else ''} not loaded (no DAG; every other DAG loads):\n"
                         + "\n".join(lines))


def folder() -> Path:
    """The schedules folder: setting ``schedules``, else ``schedules/`` next to the DAG file."""
    return Path(s.setting("schedules") or Path(os.path.dirname(os.path.abspath(__file__))) / "schedules")


def read_schedule(path: Path, form: dict) -> Schedule:
    """One schedule file, checked; raises ValueError naming the key and the problem. Its conf passes the
    same checks as a trigger's: the form's schema (types, ranges) and :func:`s2d_policy.refusal`."""
    import yaml
    from airflow.sdk import Asset, CronTriggerTimetable

    name = path.stem
    if path.suffix != ".yaml":
        raise ValueError(f"schedule files end in .yaml (rename it {name}.yaml)")
    if not name.replace("-", "_").isidentifier():
        raise ValueError(f"file name '{path.name}': use letters, digits, '-' and '_' (it becomes the DAG id)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"not YAML: {str(e).splitlines()[0]}") from None
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"a mapping of {', '.join(KEYS)} expected, got {type(spec).__name__}")
    unknown = sorted(map(str, set(spec) - set(KEYS)))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a key of a schedule file (keys: cron or asset, conf, description)")
    if ("cron" in spec) == ("asset" in spec):
        raise ValueError("one of cron (a cron expression, UTC) or asset (an asset URI) is needed, not both")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise ValueError("description: a line of text expected")
    conf = spec.get("conf") or {}
    if not isinstance(conf, dict):
        raise ValueError(f"conf: a mapping of the form's fields expected, got {type(conf).__name__}")
    unknown = sorted(map(str, set(conf) - set(form)))
    if unknown:
        raise ValueError(f"conf: {', '.join(unknown)} not a parameter of the DAG (the form's fields: {', '.join(form)})")
    for key, value in conf.items():
        try:
            form[key].__copy__().resolve(value)  # the form's own schema: types and ranges
        except Exception as e:  # noqa: BLE001 - ParamValidationError and friends: say which key
            raise ValueError(f"conf: {key}: {str(e).splitlines()[0]}") from None
    problem = policy.refusal({**{k: p.value for k, p in form.items()}, **conf}, set(form))
    if problem:
        raise ValueError(f"conf: {problem}")
    if "asset" in spec:
        if not isinstance(spec["asset"], str) or not spec["asset"].strip():
            raise ValueError("asset: an asset URI expected (e.g. s3://bucket/data/latest)")
        return Schedule(name, [Asset(spec["asset"].strip())], conf, description)
    timetable = CronTriggerTimetable(str(spec["cron"]), timezone="UTC")
    try:
        timetable.validate()  # a bad cron fails here, not when the DAG is serialized
    except Exception as e:  # noqa: BLE001 - AirflowTimetableInvalid: name the key
        raise ValueError(f"cron {str(spec['cron'])!r}: {e}") from None
    return Schedule(name, timetable, conf, description)


def load(where: Path, form: dict) -> tuple[list[Schedule], list[tuple[Path, str]]]:
    """The schedules of a folder that load, and the files that do not, each with why."""
    good, broken = [], []
    if not where.is_dir():
        return good, broken
    for path in sorted([*where.glob("*.yaml"), *where.glob("*.yml")]):
        try:
            good.append(read_schedule(path, form))
        except Exception as e:  # noqa: BLE001 - one bad file must not take the other schedules offline
            broken.append((path, str(e) or type(e).__name__))
    return good, broken


def check(where: Path, form: dict) -> None:
    """Raise :class:`ScheduleFileError` when any schedule file of the folder does not load."""
    broken = load(where, form)[1]
    if broken:
        raise ScheduleFileError(broken)


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
