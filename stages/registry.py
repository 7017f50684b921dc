"""What a stage is: the one table every other place derives from.

The CLI's commands, the workflow's plan order and input wiring, the final models, the summary table's
labels, the labeled splits each stage consumes and the student-step budget all come from :data:`STAGES`;
so do the Airflow DAG's tasks, their order and dependencies, its trigger form and its runners' choices
(``dags/s2d_table.py``). Adding a stage means one row here and its module, nothing else
(``tests/test_dag.py`` adds a throwaway one). This module imports nothing heavy: the Airflow image
carries it next to the DAG.

Roles name the checkpoints flowing through the workflow: ``teacher`` and ``student`` are the current
ones (each stage with an ``output`` role replaces that role for the stages after it), ``base_student``
is the student before any stage (the baseline's start), ``final_student`` the last student,
``baseline_student`` the baseline's output, ``champion`` the registered version deployments resolve (found in
the model registry when the gate runs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

Kind = Literal["setup", "data", "workflow", "baseline", "gate", "tool"]


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # ``stages.recipes.<module>.main(run, *input_uris)`` runs it
    kind: Kind  # setup: makes base models; data: made when ``when`` holds; workflow: switchable
    #             (workflow.stages); baseline; gate: after the report, on the final models (``promote.enabled``);
    #             tool: on demand
    inputs: dict[str, str]  # input name (the manifest's key) -> the role it reads
    output: str | None = None  # role its published ``model`` becomes for the stages after it
    published: str = "model"  # the folder under <root>/<stage>/ that ``output`` names
    optional: tuple[str, ...] = ()  # inputs read only when a planned stage provides their role
    when: tuple[str, str, str] | None = None  # data: (stage, key, value): planned when that stage is and its key is value
    trains: Literal["teacher", "student"] | None = None  # whose update steps it spends
    splits: tuple[str, ...] = ()  # task splits it trains on
    labeled: bool = False  # whether those splits carry answers (labeled data is the scarce resource)
    label: str | None = None  # row label in the summary table
    paper: str = ""  # the paper's name for it
    title: str | None = None  # the trigger form's name for its switch and step budget (default: the name)
    gpu: bool = True  # its task holds GPUs (the DAG's gpu pool, device requests, nvidia.com/gpu limits)
    uses_teacher: bool = False  # reads the teacher through teacher.engine (a served teacher: S2D_TEACHER_URL)
    scores: bool = True  # scores its output on the eval split (import only converts)

    def groups(self) -> list[tuple[str, ...]]:
        """The split groups that must not be empty: what it trains on (together) and eval when it scores."""
        return [g for g in (self.splits, ("eval",) if self.scores else ()) if g]

    def fn(self):
        return importlib.import_module(f"stages.recipes.{self.module}").main


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("bootstrap", "bootstrap", "setup", {}, splits=("bootstrap",),
          paper="stand-in for pretraining (embedded default only)"),
    Stage("import", "import_model", "setup", {}, scores=False, gpu=False,
          paper="a checkpoint we did not make (GGUF file, package, folder, hub id) converted once and published"),
    Stage("prune", "prune", "setup", {"teacher": "teacher"},
          paper="a student derived from the teacher: layer pruning, then healing on non-task text"),
    Stage("teacher_rl", "grpo", "workflow", {"policy": "teacher"}, output="teacher", trains="teacher",
          splits=("teacher_rl",), labeled=True, label="RL teacher (1)", paper="1: GRPO on the teacher, sparse reward",
          title="1 · Teacher GRPO (sparse verifier reward)"),
    Stage("teacher_data", "teacher_data", "data", {"teacher": "teacher", "student": "student"},
          output="teacher_data", published="data", splits=("prompts",), when=("kl_warmup", "form", "topk"),
          paper="2a's data: teacher rollouts with top-k log-probs, generated once (Parquet)", uses_teacher=True),
    Stage("kl_warmup", "kl_warmup", "workflow", {"teacher": "teacher", "student": "student",
                                                 "teacher_data": "teacher_data"}, optional=("teacher_data",),
          output="student", trains="student", splits=("prompts",), label="warmed student (2a)",
          paper="2a: forward KL on teacher rollouts", title="2a · Forward-KL warmup of the student", uses_teacher=True),
    Stage("onpolicy_distill", "onpolicy_distill", "workflow", {"teacher": "teacher", "student": "student"},
          output="student", trains="student", splits=("prompts",), label="distilled student (2b)",
          paper="2b: reverse KL on student rollouts, dense teacher reward", title="2b · On-policy distillation (dense reward)",
          uses_teacher=True),
    Stage("student_rl", "grpo", "workflow", {"policy": "student"}, output="student", trains="student",
          splits=("student_rl",), labeled=True, label="final student (3)", paper="3: GRPO on the student (optional)",
          title="3 · Student GRPO"),
    Stage("direct_grpo", "grpo", "baseline", {"policy": "base_student"}, trains="student",
          splits=("teacher_rl", "student_rl"), labeled=True, label="direct GRPO baseline",
          paper="baseline: GRPO on the base student, same labeled data and student steps",
          title="Baseline · direct GRPO on the student"),
    Stage("promote", "promote", "gate", {"model": "final_student", "baseline": "baseline_student",
                                         "champion": "champion"}, optional=("baseline", "champion"), splits=("eval",),
          paper="deployment: the final student against the baseline and the champion version, paired; aliases moved",
          title="Promotion gate (after the report)"),
    Stage("evaluate", "evaluate", "tool", {"model": "final_student"}, splits=("eval",)),
]}

NOT_PLANNED = 99  # exit code of `python -m stages <stage> --if-planned` when the config switches the stage off

WORKFLOW = tuple(n for n, s in STAGES.items() if s.kind == "workflow")  # the switchable stages, in order
RUNNABLE = tuple(n for n, s in STAGES.items() if s.kind not in ("tool", "gate"))  # what a workflow run may plan, in order
GATES = tuple(n for n, s in STAGES.items() if s.kind == "gate")  # run after the report, in order


def get(name: str) -> Stage:
    """The stage of a command or of a stage folder name (``evaluate/<label>`` is ``evaluate``)."""
    return STAGES[name.split("/")[0]]
