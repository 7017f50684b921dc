"""The stage table (``stages/registry.py``) as the DAG reads it: every stage list, the task order and the
dependencies come from there, so adding a stage is a row and its module, nothing in ``dags/``.

``stages.registry`` imports nothing heavy (no torch, no pydantic). Where only ``dags/`` is deployed (the
Helm chart's gitSync of ``dags``), the Airflow image carries ``stages/__init__.py`` and
``stages/registry.py`` on its ``PYTHONPATH`` (docker/airflow.Dockerfile). In a checkout, the table next to
this folder is the one the DAG was written with: its root is appended to ``sys.path`` (an explicit
``PYTHONPATH`` still comes first; an installed ``stages`` package comes after).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(ROOT, "stages", "registry.py")) and ROOT not in sys.path:
    sys.path.append(ROOT)  # a checkout, e.g. `airflow dags list --local` without PYTHONPATH

from stages import registry  # noqa: E402

STAGES = registry.STAGES
NOT_PLANNED = registry.NOT_PLANNED  # the stage command's exit code for "this config switches the stage off"
TASKS = registry.RUNNABLE  # one DAG task per stage a run may plan, in the table's order
WORKFLOW = registry.WORKFLOW  # the stages the form switches on and off (the paper's ablations)
GATES = registry.GATES  # after the report, in order (the promotion gate: it evaluates models)
GPU_STAGES = tuple(n for n in TASKS + GATES if STAGES[n].gpu)
TEACHER_STAGES = tuple(n for n in TASKS if STAGES[n].uses_teacher)  # get S2D_TEACHER_URL (setting teacher_url)
STEP_STAGES = tuple(n for n in TASKS if STAGES[n].trains)  # one step-budget field each in the form
BASE_ROLES = ("teacher", "student", "base_student")  # the checkpoints the setup stages make


PRESETS = ("tiny", "qwen3-1.7b", "llama3.1-8b")  # stages/configs/<preset>.yaml
# the form's step-budget fields besides <stage>_steps: bootstrap trains both base models (setup presets only)
BOOTSTRAP_FIELDS = {"bootstrap_teacher_steps": "bootstrap.teacher_steps", "bootstrap_student_steps": "bootstrap.student_steps"}


def default_preset() -> str:
    """The form's preset, whose step budgets the form shows: ``S2D_DEFAULT_PRESET`` (environment only: the
    form is built when the DAG is parsed, and the tasks must read the same value), default ``tiny``."""
    preset = os.environ.get("S2D_DEFAULT_PRESET") or os.environ.get("AIRFLOW_VAR_S2D_DEFAULT_PRESET") or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"S2D_DEFAULT_PRESET={preset!r}: one of {', '.join(PRESETS)}")
    return preset


def budget_fields() -> dict[str, str]:
    """Every step-budget field of the form -> the config key it sets (``teacher_rl_steps`` -> ``teacher_rl.steps``)."""
    return {**BOOTSTRAP_FIELDS, **{f"{n}_steps": f"{n}.steps" for n in STEP_STAGES}}


def preset_budgets(preset: str) -> dict[str, int | None]:
    """A preset's step budgets, by form field (``stages/configs/<preset>.yaml``, read as YAML: no stage code);
    a key the preset leaves out is None, and so is every key when its file is not here."""
    import yaml

    path = os.path.join(os.path.dirname(os.path.abspath(registry.__file__)), "configs", f"{preset}.yaml")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError:
        cfg = {}
    out = {}
    for field, key in budget_fields().items():
        section, _, name = key.partition(".")
        value = (cfg.get(section) or {}).get(name)
        out[field] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return out


def title(name: str) -> str:
    """The form's name for a stage (its switch and its step budget)."""
    return STAGES[name].title or name


def upstream(name: str) -> set[str]:
    """The stage tasks ``name`` waits for: every earlier stage that makes a role it reads (a stage switched
    off passes its input through, so an earlier maker of the same role may be the one it reads), the setup
    stages for the base checkpoints, reduced to the direct ones (nothing implied by another)."""
    order = list(TASKS)
    st = STAGES[name]
    setup = {n for n in order if STAGES[n].kind == "setup"}
    earlier = order[:order.index(name)]
    if st.kind == "setup":  # one that reads a base checkpoint (prune: the teacher) waits for the setup stages before it
        needs = {n for n in earlier if n in setup} if st.inputs else set()
        return needs - (set().union(*(_ancestors(n) for n in needs)) if needs else set())
    needs = set()
    for role in st.inputs.values():
        makers = {n for n in earlier if STAGES[n].output == role}
        needs |= makers | (setup if role in BASE_ROLES or not makers else set())
    implied = set().union(*(_ancestors(n) for n in needs)) if needs else set()
    return needs - implied


def _ancestors(name: str) -> set[str]:
    out = set()
    for n in upstream(name):
        out |= {n} | _ancestors(n)
    return out


def last_stages() -> list[str]:
    """The stage tasks no other stage waits for: what the report waits for."""
    waited = set().union(*(upstream(n) for n in TASKS))
    return [n for n in TASKS if n not in waited]
