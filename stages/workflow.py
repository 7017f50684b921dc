"""The whole chain in one process: bootstrap -> teacher_rl -> kl_warmup -> onpolicy_distill ->
student_rl, plus the direct-GRPO baseline, then a table of every stage's eval and C1/C2.

    python -m stages workflow --config tiny --root runs/demo
    python -m stages workflow --config tiny --root runs/no-warmup --set 'workflow.stages=[teacher_rl,onpolicy_distill,student_rl]'

Finished stages (same config, same inputs) are skipped, so re-running resumes a broken run.
"""

from __future__ import annotations

import json
import time

from . import artifacts
from .config import Config
from .tracking import Tracker


def base_uri(cfg: Config, root: str, role: str) -> str:
    src = getattr(cfg.models, role).source
    return artifacts.join(root, "bootstrap", role) if src == "bootstrap" else src


def run(cfg: Config, root: str, parent_run_id: str | None = None) -> dict:
    from . import bootstrap, grpo, kl_warmup, onpolicy_distill
    from .runtime import StageRun

    tracker = Tracker(cfg.tracking)
    parent = parent_run_id or tracker.start("workflow", tags={"s2d.root": root, "s2d.preset": cfg.name})
    if not parent_run_id:
        tracker.params({"preset": cfg.name, "root": root, "stages": ",".join(cfg.workflow.stages),
                        "baseline": cfg.workflow.baseline, "seed": cfg.seed,
                        "student_step_budget": cfg.student_step_budget()})
    results: dict[str, dict] = {}
    times: dict[str, float] = {}

    def stage(name: str, fn, *args, inputs: dict | None = None, **kw) -> dict:
        t0 = time.perf_counter()
        r = StageRun(name, cfg, root, inputs=inputs, parent_run_id=parent)
        if r.finished:
            print(f"[{name}] already published with the same config and inputs: skipped", flush=True)
            results[name] = r.finished
            times[name] = None
        else:
            print(f"[{name}] running", flush=True)
            results[name] = fn(r, *args, **kw)
            times[name] = time.perf_counter() - t0
        return results[name]

    with tracker.running() if not parent_run_id else _null():
        teacher, student = base_uri(cfg, root, "teacher"), base_uri(cfg, root, "student")
        if "bootstrap" in (cfg.models.teacher.source, cfg.models.student.source):
            stage("bootstrap", bootstrap.run)
        base_student = student
        enabled = cfg.workflow.stages
        if "teacher_rl" in enabled:
            teacher = stage("teacher_rl", grpo.run, teacher, inputs={"policy": teacher})["outputs"]["model"]
        if "kl_warmup" in enabled:
            student = stage("kl_warmup", kl_warmup.run, teacher, student,
                            inputs={"teacher": teacher, "student": student})["outputs"]["model"]
        if "onpolicy_distill" in enabled:
            student = stage("onpolicy_distill", onpolicy_distill.run, teacher, student,
                            inputs={"teacher": teacher, "student": student})["outputs"]["model"]
        if "student_rl" in enabled:
            student = stage("student_rl", grpo.run, student, inputs={"policy": student})["outputs"]["model"]
        if cfg.workflow.baseline:
            stage("direct_grpo", grpo.run, base_student, inputs={"policy": base_student})
        summary = summarize(cfg, results, times, final_student=student, teacher=teacher)
        text = format_table(summary)
        print(text, flush=True)
        store = artifacts.store_for(root)
        store.write_bytes(artifacts.join(root, "summary.json"), json.dumps(summary, indent=2).encode())
        store.write_bytes(artifacts.join(root, "summary.md"), text.encode())
        if tracker.enabled and not parent_run_id:
            tracker.metrics({k: v for k, v in summary["headline"].items() if isinstance(v, float)})
            tracker.tags({"s2d.final_student": student, "s2d.teacher": teacher})
            tracker.client.log_text(parent, text, "summary.md")
        return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def summarize(cfg: Config, results: dict, times: dict, final_student: str, teacher: str) -> dict:
    k = cfg.eval.samples
    rows = []

    def row(label, metrics, prefix, stage):
        m = results.get(stage, {})
        rows.append({
            "model": label, "stage": stage,
            f"avg@{k}": metrics.get(f"{prefix}avg@{k}"), f"pass@{k}": metrics.get(f"{prefix}pass@{k}"),
            "greedy": metrics.get(f"{prefix}greedy"),
            "student_steps": m.get("student_steps", 0), "labeled": m.get("labeled_examples", 0),
            "time_s": times.get(stage),
        })

    if "bootstrap" in results:
        bm = results["bootstrap"]["metrics"]
        row("base teacher", bm, "teacher.eval.", "bootstrap")
        row("base student", bm, "student.eval.", "bootstrap")
    names = {"teacher_rl": "RL teacher (1)", "kl_warmup": "warmed student (2a)", "onpolicy_distill": "distilled student (2b)",
             "student_rl": "final student (3)", "direct_grpo": "direct GRPO baseline"}
    for stage, label in names.items():
        if stage in results:
            row(label, results[stage]["metrics"], "eval.", stage)
    headline = {}
    if "teacher_rl" in results:
        tm = results["teacher_rl"]["metrics"]
        headline["c1_teacher_before"] = tm.get(f"eval_before.avg@{k}")
        headline["c1_teacher_after"] = tm.get(f"eval.avg@{k}")
    for stage in ("kl_warmup", "onpolicy_distill"):
        if stage in results:
            headline[f"c2_{stage}_before"] = results[stage]["metrics"].get("c2_before")
            headline[f"c2_{stage}_after"] = results[stage]["metrics"].get("c2_after")
    last_student = next((s for s in ("student_rl", "onpolicy_distill", "kl_warmup") if s in results), None)
    if last_student:
        headline["final_student_avg"] = results[last_student]["metrics"].get(f"eval.avg@{k}")
        headline["workflow_student_steps"] = sum(results[s].get("student_steps", 0) for s in ("kl_warmup", "onpolicy_distill", "student_rl") if s in results)
    if "direct_grpo" in results:
        headline["direct_grpo_avg"] = results["direct_grpo"]["metrics"].get(f"eval.avg@{k}")
        headline["direct_grpo_steps"] = results["direct_grpo"].get("student_steps")
    headline["labeled_examples_workflow"] = sum(results[s].get("labeled_examples", 0) for s in ("teacher_rl", "student_rl") if s in results)
    return {"k": k, "rows": rows, "headline": headline, "final_student": final_student, "teacher": teacher,
            "total_time_s": sum(t for t in times.values() if t)}


def format_table(summary: dict) -> str:
    k = summary["k"]
    cols = ["model", f"avg@{k}", f"pass@{k}", "greedy", "student_steps", "labeled", "time_s"]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in summary["rows"]]
    h = summary["headline"]
    if "c1_teacher_before" in h:
        lines.append(f"\nC1 (teacher reward-shaped): teacher avg@{k} {fmt(h['c1_teacher_before'])} -> {fmt(h['c1_teacher_after'])} after teacher_rl")
    if "c2_kl_warmup_before" in h:
        lines.append(f"C2 (student close to teacher): KL(student||teacher)/token {fmt(h['c2_kl_warmup_before'])} -> {fmt(h['c2_kl_warmup_after'])} after kl_warmup")
    if "c2_onpolicy_distill_after" in h:
        lines.append(f"   after onpolicy_distill: {fmt(h['c2_onpolicy_distill_after'])}")
    if "direct_grpo_avg" in h and "final_student_avg" in h:
        lines.append(f"Final student avg@{k} {fmt(h['final_student_avg'])} ({h['workflow_student_steps']} student steps) vs direct GRPO "
                     f"{fmt(h['direct_grpo_avg'])} ({h['direct_grpo_steps']} steps)")
    lines.append(f"Wall time of the stages run now: {summary['total_time_s']:.0f} s (time_s '-': skipped, already published)")
    return "\n".join(lines)
