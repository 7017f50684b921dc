"""Evaluate any checkpoint on the eval split: avg@k, pass@k, greedy accuracy.

    python -m stages evaluate --config tiny --root runs/demo --model runs/demo/student_rl/model --label final
"""

from __future__ import annotations

from .evaluation import evaluate
from .runtime import StageRun


def run(run: StageRun, model_uri: str) -> dict:
    model, tok = run.load_model(model_uri, "student")
    run.start_tracking()
    eval_set = run.task.problems("eval")
    run.log_dataset("eval", eval_set, context="evaluation")
    with run.tracker.running():
        run.metrics = {f"eval.{k}": v for k, v in evaluate(run, model, tok, eval_set).items()}
        run.tracker.metrics(run.metrics)
        run.extra = {"labeled_examples": 0, "student_steps": 0}
        return run.publish({}, tok)
