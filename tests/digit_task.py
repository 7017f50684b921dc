"""Task plugins for tests.

- ``task.kind: "digit_task:make_task"``: reward 1 when the completion starts with a digit. A random-init
  model does that ~10% of the time, so GRPO has signal at once.
- ``task.kind: "digit_task:make_shaped_task"``: the built-in arithmetic task (any ``task.style``; the
  question style's solved turns from ``task.options: {few_shot: n}``) with a dense reward: 1 for the right
  answer (the project's verifier), else 1 / (1 + characters) (shorter completions score more). A 2-layer
  cut of the real checkpoint answers no question right (every sample scores 0 under the verifier alone:
  the GRPO gradient is then exactly zero and an adapter would never move); the length term differs
  between samples, so every group has signal."""

from stages.tasks import ArithmeticTask
from stages.tasks import make_task as builtin_task


class DigitTask(ArithmeticTask):
    def reward(self, completion, problem):
        return float(completion[:1].isdigit())


def make_task(cfg):
    return DigitTask(cfg)


class ShapedTask:
    def __init__(self, cfg):
        self.inner = builtin_task(cfg.model_copy(update={"kind": "arithmetic", "few_shot": cfg.options.get("few_shot", 0)}))

    def problems(self, split):
        return self.inner.problems(split)

    def reward(self, completion, problem):
        return self.inner.reward(completion, problem) or 1.0 / (1 + len(completion))


def make_shaped_task(cfg):
    return ShapedTask(cfg)
