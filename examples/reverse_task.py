"""An example task plugin: reverse a word. Everything a task needs, in one file (README, "Tasks").

    python -m stages workflow --config examples/reverse.yaml --root runs/reverse

The config names the factory (``task.kind: "examples.reverse_task:make_task"``, importable from the
repository root) and passes this plugin its own settings in ``task.options``. Because it can write worked
solutions, the tiny base models are bootstrapped on it exactly as on the built-in arithmetic task.
"""

from __future__ import annotations

import random

from stages.config import TaskConfig
from stages.task_contract import Problem, TaskError

DEFAULTS = {"alphabet": "abcdefgh", "min_len": 3, "max_len": 6}


class ReverseTask:
    """``rev abcd=`` -> ``dcba``. Splits are disjoint and deterministic (``task.seed``); sizes come from
    ``task.sizes``; the ``prompts`` split withholds answers."""

    def __init__(self, cfg: TaskConfig):
        unknown = set(cfg.options) - set(DEFAULTS)
        if unknown:
            raise TaskError(f"task.options: unknown key(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
        self.opts = {**DEFAULTS, **cfg.options}
        lo, hi, alphabet = self.opts["min_len"], self.opts["max_len"], self.opts["alphabet"]
        if not 1 <= lo <= hi or len(set(alphabet)) < 2:
            raise TaskError(f"task.options: need 1 <= min_len <= max_len and 2+ letters, got {self.opts}")
        rng, seen, self.sizes = random.Random(cfg.seed), set(), dict(cfg.sizes)
        self._splits: dict[str, list[str]] = {}
        # held-out splits first, so changing the training sizes never changes them
        for split in ("eval", "validation", "student_rl", "teacher_rl", "prompts", "bootstrap"):
            words = []
            for _ in range(100 * cfg.sizes.get(split, 0)):  # bounded: a small alphabet runs out of words
                if len(words) == cfg.sizes.get(split, 0):
                    break
                w = "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))
                if w not in seen:
                    seen.add(w)
                    words.append(w)
            self._splits[split] = words

    def problems(self, split: str) -> list[Problem]:
        if split not in self._splits:
            raise KeyError(f"unknown split '{split}' (splits: {', '.join(self._splits)})")
        return [Problem(f"{split}-{i}", f"rev {w}=", None if split == "prompts" else w[::-1])
                for i, w in enumerate(self._splits[split])]

    def reward(self, completion: str, problem: Problem) -> float:
        return float(completion.strip() == problem.answer)

    def solution(self, problem: Problem, rng: random.Random | None = None, noise: float = 0.0) -> str:
        """The answer; with probability ``noise`` two letters swapped (an imperfect base model)."""
        out = list(problem.prompt[4:-1][::-1])
        if rng is not None and rng.random() < noise and len(out) > 1:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        return "".join(out)

    def check(self) -> list[str]:
        """Called by `validate` and before every stage: the splits got the sizes asked for."""
        short = {s: len(w) for s, w in self._splits.items() if len(w) < self.sizes.get(s, 0)}
        if short:
            raise TaskError(f"task.options: alphabet {self.opts['alphabet']!r} and lengths {self.opts['min_len']}-"
                            f"{self.opts['max_len']} allow too few distinct words for task.sizes (got {short})")
        return []


def make_task(cfg: TaskConfig) -> ReverseTask:
    return ReverseTask(cfg)
