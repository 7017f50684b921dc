"""The task contract: what every task (built-in, dataset or plugin) provides, and the types it speaks in.

The contract (:class:`Task`) -- what ``task.kind: "my_pkg.my_module:make_task"`` must return:

- ``problems(split) -> list[Problem]``: the problems of a split, deterministic. Splits: ``teacher_rl``
  (labeled, stage 1), ``prompts`` (answers withheld: ``answer=None``; stages 2a/2b), ``student_rl``
  (held-out labeled, stage 3), ``eval`` (held out, every stage's evaluation), ``validation`` (held out,
  for choosing hyper-parameters), ``bootstrap`` (only when the tiny base models are built here), and any
  further evaluation set named in ``eval.sets``. An unknown split raises KeyError.
- ``reward(completion, problem) -> float``: the verifier, on the decoded completion (no prompt, no EOS).
- a problem's optional ``shots``: solved (question, reply) examples sent before its prompt (few-shot).
- optional ``solution(problem, rng, noise) -> str``: a worked completion (``rng``/``noise``: corrupt it with
  probability ``noise``); a task that has it can build the tiny base models (``bootstrap``).
- optional ``check() -> list[str]``: load and check everything up front (raise :class:`TaskError` for what
  cannot run), return warnings. ``python -m stages validate`` calls it.

The factory is called with the :class:`~stages.config.TaskConfig`; a plugin's own settings are in
``cfg.options`` (``task.options: {...}`` in the config). The stage identity includes a digest of the
problems each stage reads and of the plugin module's source, so editing either re-runs the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .config import InputError

LABELED = ("bootstrap", "teacher_rl", "student_rl", "validation", "eval")
OPTIONAL = ("validation",)  # splits a stage uses when the task has them


class TaskError(InputError):
    """Task data or a plugin that cannot run; the message names the config key, file and row."""


class DataUnavailable(TaskError):
    """Data that cannot be read on this machine (a hub dataset offline): an error for a stage, a warning
    for ``validate`` on a machine that will not run the stages."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str | None  # None on the prompts-only split: stages 2a/2b never see labels
    # solved examples shown before the prompt, as (question, reply) pairs: earlier user/assistant turns
    # under a chat template, plain text before the prompt without one (a few-shot prompt)
    shots: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class Task(Protocol):
    """What every task provides (see the module docstring for the optional ``solution`` and ``check``)."""

    def problems(self, split: str) -> list[Problem]: ...

    def reward(self, completion: str, problem: Problem) -> float: ...
