"""Evaluate any checkpoint on the eval split: avg@k, pass@k, greedy accuracy.

    python -m stages evaluate --config tiny --root runs/demo --model runs/demo/student_rl/model --label final
"""

from __future__ import annotations

from .runtime import StageRun
from .scoring import score


def run(run: StageRun, model_uri: str) -> dict:
    model, tok = run.load_model(model_uri, "student")
    eval_set = run.task.problems("eval")
    with run.tracking(datasets={"eval": eval_set}, context="evaluation"):
        metrics = {f"eval.{k}": v for k, v in score(run.rollouts, model, tok, eval_set).items()}
        return run.publish({}, tok, metrics=metrics, extra={"labeled_examples": 0, "student_steps": 0})
