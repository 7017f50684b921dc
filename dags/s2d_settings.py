"""Deployment settings of the DAG: env ``S2D_<NAME>``, else the Airflow Variable ``s2d_<name>``, else a default.

Variables are read only while a task runs (a task context exists): when Airflow parses the DAG file (the
DAG processor, every few seconds, and each worker before its task) only the environment counts
(``S2D_<NAME>`` or Airflow's own ``AIRFLOW_VAR_S2D_<NAME>``), so parsing never queries the metadata
database or the API. The settings that shape the DAG itself (``runner``, ``gpu_pool``,
``stage_timeout_hours``, ``image``, ``k8s_*``, ``schedules`` ...) therefore come from the environment;
those read when a task runs (the allow-lists and caps, ``artifact_base``, ``workdir``, ``stage_python``
...) may also be Variables.
"""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger(__name__)
_warned: set[str] = set()


def in_task() -> bool:
    """True while a task instance runs (rendering or executing), False while a DAG file is parsed."""
    try:
        from airflow.sdk import get_current_context

        get_current_context()
        return True
    except Exception:  # noqa: BLE001 - no context: parse time (or a plain Python caller)
        return False


def setting(name: str, default: str | None = None) -> str | None:
    """A deployment setting (see the module docstring); an empty value counts as unset."""
    value = os.environ.get(f"S2D_{name.upper()}") or os.environ.get(f"AIRFLOW_VAR_S2D_{name.upper()}")
    if value:
        return value
    if not in_task():
        return default
    try:
        from airflow.sdk import Variable

        return Variable.get(f"s2d_{name.lower()}", default=default) or default
    except Exception:  # noqa: BLE001 - no metadata database or API (tests, first boot)
        return default


def listed(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated setting as a tuple (``default`` when unset)."""
    value = setting(name)
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value is not None else default


def number(name: str, default: float) -> float:
    """A numeric setting; a value that is not a number fails naming the setting."""
    raw = setting(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"setting s2d_{name} (env S2D_{name.upper()}) must be a number, got {raw[:40]!r}") from None


def artifact_base() -> str:
    """``S2D_ARTIFACT_BASE`` (Variable ``s2d_artifact_base``, default ``runs``): the BASE folder under which
    every run's artifact root lives, for the DAG (``<base>/<dag_id>/<run_id>``) and the CLI
    (``<base>/default``) alike. A relative base is relative to the stage command's working directory
    (``S2D_WORKDIR``). The old name ``S2D_ARTIFACT_ROOT`` (``s2d_artifact_root``) still works, with a
    deprecation warning."""
    base = setting("artifact_base")
    if not base:
        base = setting("artifact_root")
        if base:
            msg = "S2D_ARTIFACT_ROOT (Variable s2d_artifact_root) is deprecated: it names the base folder, set S2D_ARTIFACT_BASE"
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            if msg not in _warned:  # once per process: the base is read for every task
                _warned.add(msg)
                log.warning(msg)
    base = (base or "runs").rstrip("/") or "/"
    if "://" in base:
        return base
    return os.path.normpath(os.path.join(setting("workdir") or os.getcwd(), base))
