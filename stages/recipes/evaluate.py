"""Evaluate any checkpoint on every eval set of the config (``eval.sets``): avg@k, pass@k, greedy accuracy,
one table (``eval_table.md`` next to the manifest, and in the MLflow run).

    python -m stages evaluate --config tiny --root runs/demo --model runs/demo/student_rl/model --label final
    python -m stages evaluate --config qwen3-1.7b --root s3://b/runs/q --model s3://b/runs/q/student_rl/model --label final

The paper's protocol is the qwen3-1.7b / llama3.1-8b presets' ``eval`` section: avg@16 (``samples: 16``)
on MATH-500 (split ``eval``) and AIME 2024 (``aime24``), at ``eval.temperature`` / ``eval.max_new_tokens``.
"""

from __future__ import annotations

from ..runtime import StageRun
from ..scoring import eval_metrics


def main(run: StageRun, model_uri: str) -> dict:
    cfg = run.cfg
    model, tok = run.load_model(model_uri, "student")
    sets = {name: run.task.problems(name) for name in cfg.eval.sets}
    with run.tracking(datasets=sets, context="evaluation"):
        results = {name: eval_metrics(run.rollout_maker, model, tok, problems) for name, problems in sets.items()}
        # the default set keeps its historical keys (eval.avg@k ...); every set also as eval.<set>.<metric>
        metrics = {f"eval.{name}.{k}": v for name, r in results.items() for k, v in r.items()}
        if "eval" in results:
            metrics |= {f"eval.{k}": v for k, v in results["eval"].items()}
        run.tracker.metrics(metrics)
        table = format_table(results, {name: min(len(p), cfg.eval.problems) for name, p in sets.items()}, cfg, model_uri)
        print(table, flush=True)
        path = run.work / "out" / "eval_table.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
        run.tracker.artifact(str(path))
        return run.publish({}, tok, metrics=metrics, extra={"labeled_examples": 0, "student_steps": 0, "eval_table": results})


def format_table(results: dict[str, dict], sizes: dict[str, int], cfg, model_uri: str) -> str:
    k = cfg.eval.samples
    cols = [f"avg@{k}"] + ([f"pass@{k}"] if k > 1 else []) + (["greedy"] if cfg.eval.greedy else []) + ["completion_len"]
    T = cfg.eval.temperature or cfg.sampling.temperature
    lines = [f"Evaluation of {model_uri} ({k} samples per problem at temperature {T}, "
             f"up to {cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens} new tokens)", "",
             "| set | problems | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {name} | {sizes[name]} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)
