"""A task plugin for tests (``task.kind: "digit_task:make_task"``): reward 1 when the completion
starts with a digit. A random-init model does that ~10% of the time, so GRPO has signal at once."""

from stages.tasks import ArithmeticTask


class DigitTask(ArithmeticTask):
    def reward(self, completion, problem):
        return float(completion[:1].isdigit())


def make_task(cfg):
    return DigitTask(cfg)
