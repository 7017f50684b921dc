"""The whole chain in one process: bootstrap -> teacher_rl -> kl_warmup -> onpolicy_distill ->
student_rl, plus the direct-GRPO baseline, then a table of every stage's eval and C1/C2.

    python -m stages workflow --config tiny --root runs/demo
    python -m stages workflow --config tiny --root runs/no-warmup --set 'workflow.stages=[teacher_rl,onpolicy_distill,student_rl]'

Finished stages (same config, same inputs) are skipped, so re-running resumes a broken run.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

from . import artifacts
from .config import Config
from .tracking import Tracker


ROLES = {"bootstrap": {}, "teacher_rl": {"policy": "teacher"}, "kl_warmup": {"teacher": "teacher", "student": "student"},
         "onpolicy_distill": {"teacher": "teacher", "student": "student"}, "student_rl": {"policy": "student"},
         "direct_grpo": {"policy": "base_student"}}


def base_uri(cfg: Config, root: str, role: str) -> str:
    src = getattr(cfg.models, role).source
    return artifacts.join(root, "bootstrap", role) if src == "bootstrap" else src


def plan(cfg: Config, root: str) -> list[dict]:
    """The stages this config runs, in order, with the checkpoint URIs each consumes.

    Every stage publishes its model at ``<root>/<stage>/model``, so the whole chain is known before
    anything runs: the Airflow DAG and ``workflow`` both execute this plan. Switched-off stages
    (the paper's ablations) pass their input through: no stage 1 means the raw teacher is used.
    """
    cur = {"teacher": base_uri(cfg, root, "teacher"), "student": base_uri(cfg, root, "student")}
    cur["base_student"] = cur["student"]
    steps = []
    if "bootstrap" in (cfg.models.teacher.source, cfg.models.student.source):
        steps.append({"stage": "bootstrap", "inputs": {}})
    for stage in ("teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo"):
        if stage in cfg.workflow.stages or (stage == "direct_grpo" and cfg.workflow.baseline):
            steps.append({"stage": stage, "inputs": {k: cur[role] for k, role in ROLES[stage].items()}})
            if stage != "direct_grpo":
                cur["teacher" if stage == "teacher_rl" else "student"] = artifacts.join(root, stage, "model")
    for s in steps:
        s["uri"] = artifacts.join(root, s["stage"])
    return steps


def final_models(steps: list[dict], cfg: Config, root: str) -> dict:
    out = {"teacher": base_uri(cfg, root, "teacher"), "final_student": base_uri(cfg, root, "student")}
    for s in steps:
        if s["stage"] == "teacher_rl":
            out["teacher"] = artifacts.join(s["uri"], "model")
        elif s["stage"] in ("kl_warmup", "onpolicy_distill", "student_rl"):
            out["final_student"] = artifacts.join(s["uri"], "model")
    return out


def run_stage(cfg: Config, root: str, stage: str, inputs: dict, parent_run_id: str | None = None) -> tuple[dict, bool]:
    """Run one stage unless it is already published; returns (manifest, skipped)."""
    from . import bootstrap, evaluate, grpo, kl_warmup, onpolicy_distill
    from .runtime import StageRun

    fns = {"bootstrap": bootstrap.run, "teacher_rl": grpo.run, "student_rl": grpo.run, "direct_grpo": grpo.run,
           "kl_warmup": kl_warmup.run, "onpolicy_distill": onpolicy_distill.run, "evaluate": evaluate.run}
    name = stage.split("/")[0]
    # one writer per stage folder (only the main process of a multi-process launch takes the lock); taken
    # before anything else, so it is also the up-front check that the artifact root is writable
    main_rank = os.environ.get("RANK", "0") == "0"
    with artifacts.StageLock(artifacts.join(root, stage)) if main_rank else nullcontext():
        with StageRun(stage, cfg, root, inputs=inputs, parent_run_id=parent_run_id) as r:
            if r.finished:
                if main_rank:  # a kill between manifest and cleanup leaves the training state behind
                    artifacts.clear_state(r.uri)
                return r.finished, True
            return fns[name](r, *inputs.values()), False


def open_parent(cfg: Config, root: str) -> str | None:
    """The MLflow parent run for this workflow run: reused when one for the same root is still open
    (an Airflow retry, a re-trigger), else created."""
    tracker = Tracker(cfg.tracking)
    if not tracker.enabled:
        return None
    found = tracker.client.search_runs([tracker.experiment_id],
                                       f"tags.`s2d.root` = '{root}' and tags.mlflow.runName = 'workflow' and attributes.status = 'RUNNING'",
                                       max_results=1)
    if found:
        return found[0].info.run_id
    rid = tracker.start("workflow", tags={"s2d.root": root, "s2d.preset": cfg.name})
    tracker.params({"preset": cfg.name, "root": root, "stages": ",".join(cfg.workflow.stages),
                    "baseline": cfg.workflow.baseline, "seed": cfg.seed, "student_step_budget": cfg.student_step_budget()})
    return rid


def run(cfg: Config, root: str, parent_run_id: str | None = None) -> dict:
    parent = parent_run_id or open_parent(cfg, root)
    tracker = Tracker(cfg.tracking)
    tracker.run_id = parent
    with tracker.running() if not parent_run_id else nullcontext():
        for step in plan(cfg, root):
            print(f"[{step['stage']}] running", flush=True)
            _, skipped = run_stage(cfg, root, step["stage"], step["inputs"], parent)
            if skipped:
                print(f"[{step['stage']}] already published with the same config and inputs: skipped", flush=True)
        return report(cfg, root, parent, close=False)


def report(cfg: Config, root: str, parent_run_id: str | None, close: bool = True) -> dict:
    """Read every planned stage's manifest, print and publish the table, log it to the parent run."""
    steps = plan(cfg, root)
    results = {}
    for s in steps:
        m = artifacts.read_manifest(s["uri"])
        if m is None:
            raise artifacts.ArtifactError(f"{s['uri']}: stage {s['stage']} has not published (no manifest)")
        results[s["stage"]] = m
    models = final_models(steps, cfg, root)
    summary = summarize(cfg, results, models["final_student"], models["teacher"])
    text = format_table(summary)
    print(text, flush=True)
    store = artifacts.store_for(root)
    store.write_bytes(artifacts.join(root, "summary.json"), artifacts.dumps(summary, indent=2).encode())
    store.write_bytes(artifacts.join(root, "summary.md"), text.encode())
    tracker = Tracker(cfg.tracking)
    if tracker.enabled and parent_run_id:
        tracker.run_id = parent_run_id
        tracker.metrics({k: v for k, v in summary["headline"].items() if isinstance(v, (int, float))})
        tracker.tags({"s2d.final_student": models["final_student"], "s2d.teacher": models["teacher"]})
        tracker.client.log_text(parent_run_id, text, "summary.md")
        if close:
            tracker.end("FINISHED")
    return summary


def summarize(cfg: Config, results: dict, final_student: str, teacher: str) -> dict:
    k = cfg.eval.samples
    rows = []

    def row(label, metrics, prefix, stage):
        m = results.get(stage, {})
        rows.append({
            "model": label, "stage": stage,
            f"avg@{k}": metrics.get(f"{prefix}avg@{k}"), f"pass@{k}": metrics.get(f"{prefix}pass@{k}"),
            "greedy": metrics.get(f"{prefix}greedy"),
            "student_steps": m.get("student_steps", 0), "labeled": m.get("labeled_examples", 0),
            "time_s": m.get("wall_time_s"),
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
            "total_time_s": sum(m.get("wall_time_s") or 0 for m in results.values())}


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
    lines.append(f"Wall time of all stages: {summary['total_time_s']:.0f} s")
    return "\n".join(lines)
