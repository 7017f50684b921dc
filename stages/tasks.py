"""Verifiable tasks: the built-in arithmetic task, the plugin loader, and which splits each stage reads.

The contract every task follows (:class:`~stages.task_contract.Task`) is ``stages/task_contract.py``;
task data from files and hub datasets is ``stages/data.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random

from .config import Config, TaskConfig
from .data import DatasetTask
from .task_contract import LABELED, OPTIONAL, DataUnavailable, Problem, Task, TaskError


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

    def splits(self) -> list[str]:
        return list(self._splits)

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


class ArithmeticQuestions(ArithmeticTask):
    """The same problems asked in words for instruct models (``task.style: question``)::

        What is 123 + 489?\nPut the final answer in \\boxed{}.      ->  ... \\boxed{612}

    The question goes through ``task.prompt_template`` (and the model's chat template); the reward is the
    project's verifier (:func:`stages.verify.grade`: the last ``\\boxed{}``, math-verify). Operands are not
    zero-padded. ``task.few_shot: n`` puts n solved questions before each one (earlier chat turns, replies
    ending in a boxed answer), drawn from a pool no split shares, the same shots for every problem: a small
    instruct model learns the answer format from them, not the arithmetic.
    """

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        rng = random.Random(f"{cfg.seed}:shots")
        taken = {item for items in self._splits.values() for item in items}
        self._shots = []
        while len(self._shots) < cfg.few_shot:
            op = "add" if cfg.ops == ["add"] else rng.choice(cfg.ops)
            item = (op, self._number(rng), self._number(rng) if op == "add" else rng.randint(2, 9))
            if item not in taken and (op, item[2], item[1]) not in taken:
                taken.add(item)
                self._shots.append(item)
        self.shots = tuple((self.prompt(*item), self.reply(*item)) for item in self._shots)

    def prompt(self, op: str, a: int, b: int) -> str:
        return self.cfg.prompt_template.format(problem=f"What is {a} {'*' if op == 'mul' else '+'} {b}?")

    @staticmethod
    def reply(op: str, a: int, b: int) -> str:
        c = a * b if op == "mul" else a + b
        return f"{a} {'*' if op == 'mul' else '+'} {b} = {c}. The final answer is \\boxed{{{c}}}."

    def problems(self, split: str) -> list[Problem]:
        return [Problem(p.id, p.prompt, p.answer, self.shots) for p in super().problems(split)]

    def solution(self, problem: Problem, rng: random.Random | None = None, noise: float = 0.0) -> str:
        """A worked reply (``bootstrap`` can train tiny models on it); with ``noise`` a wrong sum."""
        a, op, b = problem.prompt.split("?")[0].removeprefix("What is ").split()[-3:]
        c = int(a) * int(b) if op == "*" else int(a) + int(b)
        if rng is not None and rng.random() < noise:
            c += rng.choice([-10, -1, 1, 10])
        return f"{a} {op} {b} = {c}. The final answer is \\boxed{{{c}}}."

    def reward(self, completion: str, problem: Problem) -> float:
        from .verify import grade

        return grade(completion, problem.answer, self.cfg.answer_format)


def make_task(cfg: TaskConfig) -> Task:
    if cfg.kind == "arithmetic":
        return ArithmeticQuestions(cfg) if cfg.style == "question" else ArithmeticTask(cfg)
    if cfg.kind in ("dataset", "math_jsonl"):

        return DatasetTask(cfg)
    module, _, attr = cfg.kind.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001 - an import can fail in any way; say which plugin and why
        raise TaskError(f"task.kind: cannot load plugin '{cfg.kind}': {type(e).__name__}: {e}") from None
    try:
        task = factory(cfg)
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a bad task.options value; name the plugin
        raise TaskError(f"task.kind: plugin '{cfg.kind}' failed to build its task: {type(e).__name__}: {e}") from None
    if not isinstance(task, Task):
        raise TaskError(
            f"task.kind: '{cfg.kind}' returned {type(task).__name__}, which lacks problems(split) and reward(completion, problem)"
        )
    return task


def stage_splits(stage: str, cfg: Config) -> tuple[str, ...]:
    """The splits a stage reads (its data digest covers exactly these): the ones it trains on (the stage
    table) and ``eval``, which every stage scores its output on; ``evaluate``: the ``eval.sets``."""
    from .registry import STAGES

    s = STAGES.get(stage.split("/")[0])
    if s is None:  # a helper run outside the stage table (bench/paper_table.py's C2 probe): what it scores on
        return ("eval",)
    if s.kind == "tool":
        return tuple(cfg.eval.sets)
    if s.kind == "gate":  # the promotion gate scores the evaluation protocol's sets
        return tuple(cfg.promote.sets or cfg.eval.sets)
    # bootstrap also checks the teacher beats the student on the (optional) validation split
    return s.splits + (("eval",) if s.scores else ()) + (("validation",) if s.name == "bootstrap" else ())


def needed_splits(cfg: Config) -> dict[str, tuple[str, ...]]:
    """The splits each planned stage (and the ``evaluate`` command) reads."""
    stages = list(cfg.workflow.stages) + (["direct_grpo"] if cfg.workflow.baseline else [])
    from .registry import STAGES

    stages += ["promote"] if cfg.promote.enabled else []
    sources = (cfg.models.teacher.source, cfg.models.student.source)
    stages = [n for n, st in STAGES.items() if st.kind == "setup" and n in sources] + stages
    return {s: stage_splits(s, cfg) for s in stages + ["evaluate"]}


def data_digest(task: Task, splits) -> str:
    """Digest of the problems ``splits`` hold (ids, prompts, answers) and of a plugin's module source."""
    h = hashlib.sha256()
    for split in splits:
        try:
            problems = task.problems(split)
        except KeyError:
            problems = []
        h.update(f"[{split}:{len(problems)}]".encode())
        for p in problems:
            shots = f"\0{p.shots}" if p.shots else ""  # only when present: digests of shot-less tasks unchanged
            h.update(f"{p.id}\0{p.prompt}\0{p.answer}{shots}\n".encode())
    module = inspect.getmodule(type(task))
    if module is not None and not module.__name__.startswith("stages."):
        try:
            h.update(inspect.getsource(module).encode())
        except (OSError, TypeError):
            pass
    return h.hexdigest()[:16]


def check_task(cfg: Config, allow_unavailable: bool = False) -> tuple[Task, list[str]]:
    """Build the task and check every split the config's stages read; errors raise TaskError naming the
    split, warnings (e.g. held-out problems also in a training split) are returned."""
    task = make_task(cfg.task)
    try:
        warnings = list(task.check()) if callable(getattr(task, "check", None)) else []
    except DataUnavailable as e:
        if not allow_unavailable:
            raise
        return task, [f"{e}; the data is not checked here"]
    needs = needed_splits(cfg)
    if "bootstrap" in needs and not callable(getattr(task, "solution", None)):
        raise TaskError(f"models: source 'bootstrap' trains the tiny base models on worked solutions, but task "
                        f"'{cfg.task.kind}' has no solution(problem, rng, noise); start from checkpoints (models.*.source)")
    from .registry import STAGES

    where = "task.data" if cfg.task.kind == "dataset" else "task.files"
    for stage, splits in needs.items():
        loaded = {}
        for split in splits:
            try:
                loaded[split] = problems = task.problems(split)
            except KeyError as e:
                if split in OPTIONAL:
                    continue
                raise TaskError(f"task: stage {stage} reads split '{split}', which task '{cfg.task.kind}' does not have "
                                f"({e.args[0] if e.args else e})") from None
            for p in problems:
                if not isinstance(p, Problem) or not p.prompt:
                    raise TaskError(f"task: split '{split}' has a problem with an empty prompt ({getattr(p, 'id', p)!r})")
                if split in LABELED and p.answer is None and split != "bootstrap":
                    raise TaskError(f"task: split '{split}' is labeled but problem {p.id} has no answer")
                if split == "prompts" and p.answer is not None:
                    raise TaskError(f"task: split 'prompts' must withhold answers (problem {p.id} has one)")
        # a stage trains on its splits together (direct_grpo: two) and evaluates on eval
        spec = STAGES.get(stage)
        groups = spec.groups() if spec and spec.kind not in ("tool", "gate") else [(s,) for s in splits]
        for group in groups:
            if not any(loaded.get(s) for s in group):
                raise TaskError(f"{stage}: the task split{'s' if len(group) > 1 else ''} {' and '.join(group)} "
                                f"{'are' if len(group) > 1 else 'is'} empty (task.sizes / {where})")
    return task, warnings
