"""The whole chain in one process: bootstrap -> teacher_rl -> kl_warmup -> onpolicy_distill ->
student_rl, plus the direct-GRPO baseline, then a table of every stage's eval and C1/C2.

    python -m stages workflow --config tiny --root runs/demo
    python -m stages workflow --config tiny --root runs/no-warmup --set 'workflow.stages=[teacher_rl,onpolicy_distill,student_rl]'

Finished stages (same config, same inputs) are skipped, so re-running resumes a broken run.
"""

from __future__ import annotations

from contextlib import nullcontext

from . import artifacts
from .config import Config
from .registry import STAGES, get
from .tracking import Tracker


def base_uri(cfg: Config, root: str, role: str) -> str:
    src = getattr(cfg.models, role).source
    return artifacts.join(root, src, role) if src in STAGES and STAGES[src].kind == "setup" else src


def _planned(cfg: Config, name: str) -> bool:
    kind = STAGES[name].kind
    if kind == "setup":  # a setup stage runs when a base model comes from it (models.*.source: bootstrap)
        return name in (cfg.models.teacher.source, cfg.models.student.source)
    if kind == "workflow":
        return name in cfg.workflow.stages
    return kind == "baseline" and cfg.workflow.baseline


def _walk(cfg: Config, root: str) -> tuple[list[dict], dict[str, str]]:
    """The planned stages with their input URIs, and the checkpoint each role holds at the end."""
    roles = {"teacher": base_uri(cfg, root, "teacher"), "student": base_uri(cfg, root, "student")}
    roles["base_student"] = roles["student"]
    steps = []
    for name, st in STAGES.items():
        if st.kind == "tool" or not _planned(cfg, name):
            continue
        steps.append({"stage": name, "inputs": {k: roles[role] for k, role in st.inputs.items()},
                      "uri": artifacts.join(root, name)})
        if st.output:  # every stage publishes its model at <root>/<stage>/model
            roles[st.output] = artifacts.join(root, name, "model")
    roles["final_student"] = roles["student"]
    return steps, roles


def plan(cfg: Config, root: str) -> list[dict]:
    """The stages this config runs, in the table's order, with the checkpoint URIs each consumes.

    Every stage publishes its model at ``<root>/<stage>/model``, so the whole chain is known before
    anything runs: the Airflow DAG and ``workflow`` both execute this plan. Switched-off stages
    (the paper's ablations) pass their input through: no stage 1 means the raw teacher is used.
    """
    return _walk(cfg, root)[0]


def final_models(cfg: Config, root: str) -> dict[str, str]:
    """The teacher and the final student this config's workflow ends with."""
    roles = _walk(cfg, root)[1]
    return {"teacher": roles["teacher"], "final_student": roles["final_student"]}


def stage_inputs(cfg: Config, root: str, stage: str, explicit: dict[str, str | None] | None = None) -> dict[str, str]:
    """A stage's input URIs: from the plan when it is planned, else the roles' base checkpoints (the final
    student for ``evaluate``); ``explicit`` maps roles to URIs given on the command line (``student`` also
    stands for ``base_student``)."""
    explicit = {k: v for k, v in (explicit or {}).items() if v}
    explicit.setdefault("base_student", explicit.get("student"))
    steps, roles = _walk(cfg, root)
    roles = {**roles, "teacher": base_uri(cfg, root, "teacher"), "student": roles["base_student"]}
    spec = get(stage)
    inputs = next((s["inputs"] for s in steps if s["stage"] == spec.name),
                  {k: roles[role] for k, role in spec.inputs.items()})
    return {k: explicit.get(spec.inputs[k]) or v for k, v in inputs.items()}


def run_stage(cfg: Config, root: str, stage: str, inputs: dict, parent_run_id: str | None = None) -> tuple[dict, bool]:
    """Run one stage unless it is already published; returns (manifest, skipped)."""
    from .runtime import StageRun

    with StageRun(stage, cfg, root, inputs=inputs, parent_run_id=parent_run_id) as r:
        # one writer per stage folder, taken by the main process of a launch (accelerate knows which one;
        # launchers do not all set RANK) before any model loads or MLflow run starts, so it is also the
        # up-front check that the artifact root is writable
        with artifacts.StageLock(r.uri) if r.is_main else nullcontext():
            if r.finished:
                if r.is_main:  # a kill between manifest and cleanup leaves the training state behind
                    artifacts.clear_state(r.uri)
                return r.finished, True
            return get(stage).fn()(r, *inputs.values()), False


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
    models = final_models(cfg, root)
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

    for name, st in STAGES.items():
        if name not in results:
            continue
        if st.kind == "setup":  # the base models
            for role in ("teacher", "student"):
                row(f"base {role}", results[name]["metrics"], f"{role}.eval.", name)
        elif st.label:
            row(st.label, results[name]["metrics"], "eval.", name)
    done = [STAGES[n] for n in results]
    headline = {}
    for st in done:
        m = results[st.name]["metrics"]
        if st.trains == "teacher" and st.kind == "workflow":  # C1: the teacher's lift from RL
            headline["c1_teacher_before"] = m.get(f"eval_before.avg@{k}")
            headline["c1_teacher_after"] = m.get(f"eval.avg@{k}")
        if "c2_after" in m:  # C2: KL(student || teacher) before and after
            headline[f"c2_{st.name}_before"] = m.get("c2_before")
            headline[f"c2_{st.name}_after"] = m.get("c2_after")
    students = [st for st in done if st.kind == "workflow" and st.output == "student"]
    if students:
        headline["final_student_avg"] = results[students[-1].name]["metrics"].get(f"eval.avg@{k}")
        headline["workflow_student_steps"] = sum(results[st.name].get("student_steps", 0) for st in students)
    for st in done:
        if st.kind == "baseline":
            headline[f"{st.name}_avg"] = results[st.name]["metrics"].get(f"eval.avg@{k}")
            headline[f"{st.name}_steps"] = results[st.name].get("student_steps")
    headline["labeled_examples_workflow"] = sum(results[st.name].get("labeled_examples", 0) for st in done
                                                if st.kind == "workflow" and st.labeled)
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
