"""Verifiable tasks: prompts, disjoint splits, and a reward function.

A task is anything with ``problems(split) -> list[Problem]`` and ``reward(completion, problem) -> float``.
Splits: ``teacher_rl`` (labeled, stage 1), ``prompts`` (answers withheld, stages 2a/2b),
``student_rl`` (held-out labeled, stage 3), ``eval``; the embedded default adds ``bootstrap``.
Plugins: ``task.kind: "my_pkg.my_module:make_task"`` names a factory taking the TaskConfig.
"""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import TaskConfig

LABELED = ("bootstrap", "teacher_rl", "student_rl", "validation", "eval")


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str | None  # None on the prompts-only split: stages 2a/2b never see labels


class Task(Protocol):
    def problems(self, split: str) -> list[Problem]: ...

    def reward(self, completion: str, problem: Problem) -> float: ...


class ArithmeticTask:
    """Additions of two ``min_digits..max_digits``-digit numbers (zero-padded in the prompt) and,
    with ``ops: [add, mul]``, multiplications of such a number by one digit 2-9.

    A worked completion writes one column per step, right to left, then the answer::

        0123+0489=  ->  3+9+0=12;2+8+1=11;1+4+1=06;0+0+0=00;>612
        0347*6=     ->  7*6+0=42;4*6+4=28;3*6+2=20;0*6+2=02;>2082

    Each column reads ``x+y+carry=<carry out><digit>`` (``x*d+carry=<carry out><digit>``). Bootstrap
    traces are corrupted with probability ``noise`` (one column's digit replaced, the answer
    following the corrupted trace), so base models are imperfect in the way a pretrained model is:
    mostly right, sometimes wrong. Multiplication needs the times table and carries up to 8: a
    capacity test that small students fail more often than large teachers.
    """

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.width = cfg.max_digits
        rng = random.Random(cfg.seed)
        seen: set[tuple[str, int, int]] = set()
        self._splits: dict[str, list[tuple[str, int, int]]] = {}
        # eval first, then validation (for choosing hyper-parameters), so changing the training split
        # sizes never changes either. A commuted addition (b+a) is the same problem as a+b: both are
        # marked seen, so no split holds a near-duplicate of another split's problem.
        for split in ("eval", "validation", "student_rl", "teacher_rl", "prompts", "bootstrap"):
            items = []
            while len(items) < cfg.sizes.get(split, 0):
                op = "add" if cfg.ops == ["add"] else rng.choice(cfg.ops)  # add-only draws as before
                a = self._number(rng)
                b = self._number(rng) if op == "add" else rng.randint(2, 9)
                if (op, a, b) not in seen:
                    seen.add((op, a, b))
                    if op == "add":
                        seen.add((op, b, a))
                    items.append((op, a, b))
            self._splits[split] = items

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    def prompt(self, op: str, a: int, b: int) -> str:
        if op == "mul":
            return f"{a:0{self.width}d}*{b}="
        return f"{a:0{self.width}d}+{b:0{self.width}d}="

    def problems(self, split: str) -> list[Problem]:
        if split not in self._splits:
            raise KeyError(f"unknown split '{split}' (splits: {', '.join(self._splits)})")
        return [
            Problem(f"{split}-{i}", self.prompt(op, a, b), None if split == "prompts" else str(a * b if op == "mul" else a + b))
            for i, (op, a, b) in enumerate(self._splits[split])
        ]

    def solution(self, problem: Problem, rng: random.Random | None = None, noise: float = 0.0) -> str:
        """The worked completion (without EOS); with ``noise``, possibly one corrupted column."""
        body = problem.prompt.rstrip("=")
        mul = "*" in body
        a_s, b_s = body.split("*" if mul else "+")
        cols, carry = [], 0
        for x, y in zip(reversed(a_s), reversed(b_s) if not mul else [b_s] * len(a_s)):
            total = int(x) * int(y) + carry if mul else int(x) + int(y) + carry
            cols.append([x, y, carry, total // 10, total % 10])
            carry = total // 10
        if rng is not None and rng.random() < noise:
            col = cols[rng.randrange(len(cols))]
            col[4] = rng.choice([d for d in range(10) if d != col[4]])
        sign = "*" if mul else "+"
        trace = "".join(f"{x}{sign}{y}+{c}={co}{d};" for x, y, c, co, d in cols)
        digits = str(cols[-1][3]) + "".join(str(c[4]) for c in reversed(cols))
        return f"{trace}>{int(digits)}"

    def reward(self, completion: str, problem: Problem) -> float:
        if ">" not in completion:
            return 0.0
        return float(completion.rsplit(">", 1)[1].strip() == problem.answer)


class MathJsonlTask:
    """MATH-style JSONL (``{"problem": ..., "answer": ...}`` per line), verified with math-verify."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        for split, path in cfg.files.items():
            if not Path(path).exists():
                raise FileNotFoundError(f"task.files.{split}: {path} does not exist")

    def problems(self, split: str) -> list[Problem]:
        if split not in self.cfg.files:
            raise KeyError(f"no file for split '{split}' (task.files has {', '.join(self.cfg.files)})")
        out = []
        with open(self.cfg.files[split]) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "problem" not in row or (split != "prompts" and "answer" not in row):
                    raise ValueError(f"{self.cfg.files[split]}:{i + 1}: needs 'problem' and 'answer'")
                prompt = self.cfg.prompt_template.format(problem=row["problem"])
                out.append(Problem(str(row.get("id", f"{split}-{i}")), prompt, None if split == "prompts" else str(row["answer"])))
        limit = self.cfg.sizes.get(split)
        return out[:limit] if limit else out

    def reward(self, completion: str, problem: Problem) -> float:
        from math_verify import parse, verify

        gold = parse(f"\\boxed{{{problem.answer}}}")
        pred = parse(completion)
        return float(bool(pred) and verify(gold, pred))


def make_task(cfg: TaskConfig) -> Task:
    if cfg.kind == "arithmetic":
        return ArithmeticTask(cfg)
    if cfg.kind == "math_jsonl":
        return MathJsonlTask(cfg)
    module, _, attr = cfg.kind.partition(":")
    return getattr(importlib.import_module(module), attr)(cfg)
