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


def title(name: str) -> str:
    """The form's name for a stage (its switch and its step budget)."""
    return STAGES[name].title or name


def upstream(name: str) -> set[str]:
    """The stage tasks ``name`` waits for: every earlier stage that makes a role it reads (a stage switched
    off passes its input through, so an earlier maker of the same role may be the one it reads), the setup
    stages for the base checkpoints, reduced to the direct ones (nothing implied by another)."""
    order = list(TASKS)
    st = STAGES[name]
    if st.kind == "setup":
        return set()
    setup = {n for n in order if STAGES[n].kind == "setup"}
    earlier = order[:order.index(name)]
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
