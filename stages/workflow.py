"""The whole chain in one process: bootstrap -> teacher_rl -> kl_warmup -> onpolicy_distill ->
student_rl, plus the direct-GRPO baseline, then a table of every stage's eval and C1/C2.

    python -m stages workflow --config tiny --root runs/demo
    python -m stages workflow --config tiny --root runs/no-warmup --set 'workflow.stages=[teacher_rl,onpolicy_distill,student_rl]'

Finished stages (same config, same inputs) are skipped, so re-running resumes a broken run.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext

from . import artifacts, cost, lineage, lock, storage
from .config import Config, InputError
from .lineage import quote, short_uri
from .registry import STAGES, get
from .tracking import Tracker


def base_uri(cfg: Config, root: str, role: str) -> str:
    src = getattr(cfg.models, role).source
    if src in STAGES and STAGES[src].kind == "setup":
        return storage.join(root, src, role)
    # models:/<name>/<version> is looked up in the registry: the version's checkpoint URI is the input
    return lineage.resolve_model_uri(src)


def _planned(cfg: Config, name: str) -> bool:
    kind = STAGES[name].kind
    if kind == "setup":  # a setup stage runs when a base model comes from it (models.*.source: bootstrap)
        return name in (cfg.models.teacher.source, cfg.models.student.source)
    if kind == "data":  # made for a planned consumer that reads it (teacher_data: kl_warmup.form topk)
        stage, key, value = STAGES[name].when
        return stage in cfg.workflow.stages and getattr(getattr(cfg, stage), key) == value
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
        steps.append({"stage": name, "inputs": {k: roles[role] for k, role in st.inputs.items()
                                                if role in roles or k not in st.optional},
                      "uri": storage.join(root, name)})
        if st.output:  # every stage publishes its model at <root>/<stage>/model (teacher_data: its data)
            roles[st.output] = storage.join(root, name, st.published)
        if st.kind == "baseline":  # what the promotion gate compares the final student with
            roles["baseline_student"] = storage.join(root, name, st.published)
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
                  {k: roles[role] for k, role in spec.inputs.items() if role in roles or k not in spec.optional})
    return {k: explicit.get(spec.inputs[k]) or v for k, v in inputs.items()}


def run_stage(cfg: Config, root: str, stage: str, inputs: dict, parent_run_id: str | None = None) -> tuple[dict, bool]:
    """Run one stage unless it is already published; returns (manifest, skipped)."""
    from .runtime import StageRun

    with StageRun(stage, cfg, root, inputs=inputs, parent_run_id=parent_run_id) as r:
        # one writer per stage folder, taken by the main process of a launch (accelerate knows which one;
        # launchers do not all set RANK) before any model loads or MLflow run starts, so it is also the
        # up-front check that the artifact root is writable
        with lock.StageLock(r.uri) if r.is_main else nullcontext():
            # decided again under the lock (every rank, after the main one holds it): a run that waited for the
            # lock skips what the holder just published instead of training and republishing it
            r.accelerator.wait_for_everyone()
            r.recheck()
            if not r.finished and r.is_main:
                guard_registered(cfg, root, r.uri)
            if r.finished:
                if r.is_main:  # a kill between manifest and cleanup leaves the training state behind
                    artifacts.clear_state(r.uri)
                    # a skip makes the stage's MLflow run say what the manifest says (repairs a run left RUNNING
                    # or unrecorded by a kill or a tracking outage); a no-op when it already does
                    Tracker(cfg.tracking).reconcile(r.finished, r.uri, root, parent_run_id)
                return r.finished, True
            return get(stage).fn()(r, *inputs.values()), False


OVERWRITE_REGISTERED = "S2D_OVERWRITE_REGISTERED"


class RegisteredOverwrite(InputError):
    """Running the stage would overwrite files a registered model version pins."""


def guard_registered(cfg: Config, root: str, stage_uri: str) -> None:
    """Before a stage that will train and republish ``stage_uri``: refuse when a registered model version pins
    the files there (its lineage points at them), unless the operator asks (``--overwrite-registered`` or
    ``S2D_OVERWRITE_REGISTERED=1``: a deployment setting, never a trigger parameter). Nothing published there,
    or tracking off: nothing to check. A tracking server that does not answer: a warning (training never
    waits for MLflow); ``tracking.required`` makes that an error earlier."""
    if os.environ.get(OVERWRITE_REGISTERED, "").lower() in ("1", "true", "yes") or not cfg.tracking.enabled:
        return
    digest = artifacts.manifest_sha256(stage_uri)
    if digest is None:
        return
    tracker = Tracker(cfg.tracking)
    found = tracker.call("check registered versions", lambda c: lineage.pinning_versions(c, root, stage_uri, digest),
                         timeout=cfg.tracking.flush_timeout_s)
    if found is None:
        print(f"warning: MLflow at {tracker.shown_uri} did not answer: not checked whether a registered model version "
              f"pins {stage_uri}", file=sys.stderr, flush=True)
        return
    if found:
        names = ", ".join(f"{mv.name}/{mv.version}" for mv in found)
        raise RegisteredOverwrite(
            f"{stage_uri} holds the checkpoint of registered model version{'s' * (len(found) > 1)} {names}; running "
            f"{stage_uri.rsplit('/', 1)[-1]} again with another config would overwrite it: use another --root, or pass "
            f"--overwrite-registered ({OVERWRITE_REGISTERED}=1) to replace it (the version then refuses to resolve)")


def stage_identity(cfg: Config, stage: str, inputs: dict[str, str], task) -> str:
    """The config hash that decides "already published": the stage's config section, its inputs (URI
    and the digest of the manifest that published each), and the problems it reads (editing a data
    file or a task plugin in place re-runs it)."""
    from .tasks import data_digest, stage_splits

    ident = {k: f"{v}@{input_digest(v)}" for k, v in inputs.items()}
    ident["task_data"] = data_digest(task, stage_splits(stage, cfg))
    return cfg.stage_hash(stage, ident)


def input_digest(uri: str) -> str:
    found = artifacts.find_manifest(uri)
    return artifacts.manifest_digest(found[0]) if found else "external"


def all_published(cfg: Config, root: str) -> bool:
    """Every planned stage is published with this config and these inputs: a run would skip them all."""
    from .tasks import make_task

    try:
        task = make_task(cfg.task)
        for step in plan(cfg, root):
            m = artifacts.read_manifest(step["uri"])
            if not m or m.get("config_hash") != stage_identity(cfg, step["stage"], step["inputs"], task):
                return False
        return True
    except Exception:  # noqa: BLE001 - unreadable or damaged: the stages find out (and say why) when they run
        return False


def parent_name(cfg: Config, root: str) -> str:
    """A parent-run name that tells DAG runs apart within the first characters the MLflow UI shows: the
    preset, the run's date and time and its kind (``tiny · 12-02 21:25:46 manual``; a schedule DAG adds
    its name), else the Airflow run id, else (outside Airflow) the root's last folder."""
    from datetime import datetime

    rid = os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    if not rid:
        return f"{cfg.name} · {root.rstrip('/').rsplit('/', 1)[-1]}"
    kind, _, when = rid.partition("__")
    try:
        at = datetime.fromisoformat(when)
    except ValueError:  # a run id given through the API: as it is
        return f"{cfg.name} · {rid}"
    schedule = os.environ.get("AIRFLOW_CTX_DAG_ID", "").partition("__")[2]
    return f"{cfg.name} · {at:%m-%d %H:%M:%S} {kind.replace('_triggered', '')}{f' {schedule}' if schedule else ''}"


def open_parent(cfg: Config, root: str) -> str | None:
    """The MLflow parent run for this workflow run: reused when one for the same root is still open
    (an Airflow retry, a re-trigger), else created. None when the server does not answer in time
    (the stages then record their runs without a parent), and when every stage is already published
    and the store has the workflow run that published them: a run that skips everything adds no
    empty parent run (the results stay on that run)."""
    tracker = Tracker(cfg.tracking)
    if not tracker.enabled:
        return None
    query = f"tags.`s2d.root` = '{quote(root)}' and tags.`s2d.kind` = 'workflow'"
    found = tracker.call(
        "find the parent run",
        lambda c: c.search_runs([tracker.experiment(c)], query, max_results=1, order_by=["attributes.start_time DESC"]),
        timeout=cfg.tracking.flush_timeout_s,
    )
    if found is None:  # no answer: do not create a second parent later
        return None
    if found and found[0].info.status == "RUNNING":  # an Airflow retry, a re-trigger of an unfinished run
        return found[0].info.run_id
    if found and all_published(cfg, root):
        print(f"every stage is already published: no new MLflow parent run (the results are on run "
              f"{found[0].info.run_id}, {found[0].info.run_name!r})", file=sys.stderr, flush=True)
        return None
    rid = tracker.start(parent_name(cfg, root), tags={"s2d.root": root, "s2d.preset": cfg.name, "s2d.kind": "workflow"},
                        params={"preset": cfg.name, "root": root, "stages": ",".join(cfg.workflow.stages),
                                "baseline": cfg.workflow.baseline, "seed": cfg.seed,
                                "student_step_budget": cfg.student_step_budget()})
    tracker.flush()
    return rid


def find_parent(cfg: Config, root: str) -> str | None:
    """The newest MLflow parent run of ``root``, open or not (a gate or an approval run after the workflow
    ended records there); None without one or without an answer."""
    tracker = Tracker(cfg.tracking)
    if not tracker.enabled:
        return None
    query = f"tags.`s2d.root` = '{quote(root)}' and tags.`s2d.kind` = 'workflow'"
    found = tracker.call("find the parent run", lambda c: c.search_runs([tracker.experiment(c)], query, max_results=1,
                                                                        order_by=["attributes.start_time DESC"]),
                         timeout=cfg.tracking.flush_timeout_s)
    return found[0].info.run_id if found else None


def run(cfg: Config, root: str, parent_run_id: str | None = None) -> dict:
    if mismatch := budget_mismatch(cfg):
        print(mismatch, file=sys.stderr, flush=True)
    parent = parent_run_id or open_parent(cfg, root)
    tracker = Tracker(cfg.tracking)
    tracker.attach(parent)
    try:
        with tracker.running() if not parent_run_id else nullcontext():
            for step in plan(cfg, root):
                print(f"[{step['stage']}] running", flush=True)
                _, skipped = run_stage(cfg, root, step["stage"], step["inputs"], parent)
                if skipped:
                    print(f"[{step['stage']}] already published with the same config and inputs: skipped", flush=True)
            summary = report(cfg, root, parent, close=False)
            return promote(cfg, root, parent) if gate_planned(cfg) else summary
    finally:
        tracker.flush()


def report(cfg: Config, root: str, parent_run_id: str | None, close: bool = True) -> dict:
    """Read every planned stage's manifest, print and publish the table, log it to the parent run."""
    steps = plan(cfg, root)
    results = {}
    for s in steps:
        m = artifacts.read_manifest(s["uri"])
        if m is None:
            raise storage.ArtifactError(f"{s['uri']}: stage {s['stage']} has not published (no manifest)")
        results[s["stage"]] = m
    models = final_models(cfg, root)
    summary = summarize(cfg, results, models["final_student"], models["teacher"])
    text = format_table(summary)
    print(text, flush=True)
    store = storage.store_for(root)
    store.write_bytes(storage.join(root, "summary.json"), storage.dumps(summary, indent=2).encode())
    store.write_bytes(storage.join(root, "summary.md"), text.encode())
    tracker = Tracker(cfg.tracking)
    if tracker.enabled:
        versions = register_models(cfg, tracker, results, models, root, parent_run_id)
        if parent_run_id:
            tracker.attach(parent_run_id)
            tracker.metrics({k: v for k, v in summary["headline"].items() if isinstance(v, (int, float))})
            tracker.metrics(cost_metrics(summary["cost"]))
            tracker.tags({"s2d.final_student": short_uri(models["final_student"], root),
                          "s2d.teacher": short_uri(models["teacher"], root),
                          **{f"s2d.registered.{role}": f"{mv.name}/{mv.version}" for role, mv in versions.items()}})
            tracker.params({"final_student": models["final_student"], "teacher": models["teacher"]})
            tracker.text(text, "summary.md")
            if close:
                tracker.end("FINISHED")
        left = tracker.flush()
        if left:
            print(f"warning: MLflow at {tracker.shown_uri} did not record {', '.join(dict.fromkeys(left))} "
                  f"({tracker.error or 'no answer in time'})", file=sys.stderr, flush=True)
    return summary


def cost_metrics(costs: dict) -> dict[str, float]:
    """The cost table as parent-run metrics: ``cost.<stage>.<key>`` and ``cost.total.<key>``."""
    out = {}
    for name, c in [*costs["stages"].items(), ("total", costs["total"])]:
        out |= {f"cost.{name}.{k}": v for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def register_models(cfg: Config, tracker: Tracker, results: dict, models: dict, root: str, parent_run_id: str | None) -> dict:
    """Register the RL teacher and the final student (when a stage trained them) as versions of the
    configured registered models, tagged with their lineage: the teacher's version, the datasets, the
    Airflow run, the root and preset. Idempotent: a checkpoint already registered is not added twice."""
    names = cfg.tracking.registered_models
    trained = {role: any(STAGES[s].kind == "workflow" and STAGES[s].output == role for s in results)
               for role in ("teacher", "student")}
    uris = {"teacher": models["teacher"], "student": models["final_student"]}

    def reg(c):
        exp = tracker.experiment(c)
        runs = c.search_runs([exp], f"tags.`s2d.root` = '{quote(root)}'", max_results=1000)
        datasets = sorted({f"{d.dataset.name}@{d.dataset.digest}" for r in runs for d in r.inputs.dataset_inputs})
        common = {"s2d.preset": cfg.name, "s2d.root": root, "s2d.task": cfg.task.kind, "s2d.datasets": ",".join(datasets),
                  **({"s2d.parent_run": parent_run_id} if parent_run_id else {}), **lineage.airflow_tags()}
        out = {}
        for role in ("teacher", "student"):  # the teacher first: the student's version names it
            if not (names.get(role) and trained[role]):
                continue
            tags = dict(common, **{"s2d.role": role})
            if "teacher" in out:
                tags["s2d.teacher_version"] = f"{out['teacher'].name}/{out['teacher'].version}"
            elif role == "student":
                tags["s2d.teacher_uri"] = uris["teacher"]
            mv = lineage.register(c, exp, names[role], uris[role], tags)
            if mv is not None:
                out[role] = mv
                lineage.describe_version(c, exp, mv, role)
        return out

    return tracker.call("register models", reg) or {}


def summarize(cfg: Config, results: dict, final_student: str, teacher: str) -> dict:
    k = cfg.eval.samples
    rows = []

    def row(label, metrics, prefix, stage, timed=True, base=False) -> dict:
        m = {} if base else results.get(stage, {})  # base: a model before the stage (no steps, no labels)
        return {
            "model": label, "stage": stage,
            f"avg@{k}": metrics.get(f"{prefix}avg@{k}"), f"pass@{k}": metrics.get(f"{prefix}pass@{k}"),
            "greedy": metrics.get(f"{prefix}greedy"),
            "student_steps": m.get("student_steps", 0), "labeled": m.get("labeled_examples", 0),
            "time_s": results.get(stage, {}).get("wall_time_s") if timed else None,
        }

    setup = [n for n, st in STAGES.items() if n in results and st.kind == "setup"]
    scored = {role: n for n in setup for role in ("teacher", "student")
              if any(key.startswith(f"{role}.eval.") for key in results[n]["metrics"])}
    for name in setup:  # the base models, as the setup stage that made them scored them
        roles = [role for role, n in scored.items() if n == name]
        for role in roles:
            rows.append(row(f"base {role}", results[name]["metrics"], f"{role}.eval.", name, timed=role == roles[0]))
        if not roles:  # a conversion (import): its time only
            rows.append(row(f"{name} (setup)", {}, "", name))
    if "teacher" not in scored:  # an imported teacher's first score: stage 1's evaluation before RL (same draws)
        first = next((n for n, st in STAGES.items() if n in results and st.trains == "teacher" and st.kind == "workflow"), None)
        if first is not None and f"eval_before.avg@{k}" in results[first]["metrics"]:
            rows.insert(0, row("base teacher", results[first]["metrics"], "eval_before.", first, timed=False, base=True))
    for name, st in STAGES.items():
        if name in results and st.label:
            rows.append(row(st.label, results[name]["metrics"], "eval.", name))
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
            if "workflow_student_steps" in headline:  # the paper's comparison is at the same student budget
                headline["equal_budgets"] = headline[f"{st.name}_steps"] == headline["workflow_student_steps"]
    headline["labeled_examples_workflow"] = sum(results[st.name].get("labeled_examples", 0) for st in done
                                                if st.kind == "workflow" and st.labeled)
    costs = {name: {**m["cost"], **({"reused_from": m["reused"]["from"]} if m.get("reused") else {})}
             for name, m in results.items() if isinstance(m.get("cost"), dict)}
    headline |= efficiency(results, headline, k)
    return {"k": k, "rows": rows, "headline": headline, "final_student": final_student, "teacher": teacher,
            "total_time_s": sum(m.get("wall_time_s") or 0 for m in results.values()),
            "cost": {"stages": costs, "total": cost.total(list(costs.values()))}}


def efficiency(results: dict, headline: dict, k: int) -> dict:
    """Labeled examples and teacher tokens per point (0.01) of avg@k the final student gained over the base
    student (the setup stage's evaluation; unknown for a base student it did not make), and the baseline's
    labeled examples per point it gained."""
    out = {}
    base = next((m["metrics"].get(f"student.eval.avg@{k}") for n, m in results.items() if STAGES[n].kind == "setup"), None)
    teacher_tokens = sum((m.get("cost") or {}).get("teacher_tokens_scored", 0) for n, m in results.items()
                         if STAGES[n].kind in ("data", "workflow"))
    out["teacher_tokens_workflow"] = teacher_tokens
    if base is None:
        return out
    out["base_student_avg"] = base
    if headline.get("final_student_avg") is not None:
        gain = out["gain_points"] = round(100 * (headline["final_student_avg"] - base), 4)
        if gain > 0:
            out["labeled_per_point"] = headline["labeled_examples_workflow"] / gain
            out["teacher_tokens_per_point"] = teacher_tokens / gain
    for n, m in results.items():
        if STAGES[n].kind == "baseline" and headline.get(f"{n}_avg") is not None:
            gain = out[f"{n}_gain_points"] = round(100 * (headline[f"{n}_avg"] - base), 4)
            if gain > 0:
                out[f"{n}_labeled_per_point"] = m.get("labeled_examples", 0) / gain
    return out


def budget_warning(baseline: int, workflow_steps: int) -> str:
    """The line that says the headline compares unequal student budgets (``direct_grpo.steps`` set)."""
    side = "the workflow" if baseline < workflow_steps else "the baseline"
    return (f"WARNING: NOT AN EQUAL-BUDGET COMPARISON: direct GRPO trained {baseline} steps, the workflow's student "
            f"{workflow_steps}; this favours {side} (direct_grpo.steps was set; unset, it equals the workflow's)")


def budget_mismatch(cfg: Config) -> str | None:
    """Before anything runs: the baseline's steps set apart from the workflow's student steps, or None."""
    if not cfg.workflow.baseline or cfg.direct_grpo.steps is None:
        return None
    budget = cfg.student_step_budget()
    return budget_warning(cfg.direct_grpo.steps, budget) if cfg.direct_grpo.steps != budget else None


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
        before, after = fmt(h["c1_teacher_before"]), fmt(h["c1_teacher_after"])
        lines.append(f"\nC1 (teacher reward-shaped): teacher avg@{k} {before} -> {after} after teacher_rl")
    if "c2_kl_warmup_before" in h:
        before, after = fmt(h["c2_kl_warmup_before"]), fmt(h["c2_kl_warmup_after"])
        lines.append(f"C2 (student close to teacher): KL(student||teacher)/token {before} -> {after} after kl_warmup")
    if "c2_onpolicy_distill_after" in h:
        lines.append(f"   after onpolicy_distill: {fmt(h['c2_onpolicy_distill_after'])}")
    if "direct_grpo_avg" in h and "final_student_avg" in h:
        lines.append(
            f"Final student avg@{k} {fmt(h['final_student_avg'])} ({h['workflow_student_steps']} student steps) vs direct GRPO "
            f"{fmt(h['direct_grpo_avg'])} ({h['direct_grpo_steps']} steps)"
        )
        if h.get("equal_budgets") is False:
            lines.append(budget_warning(h["direct_grpo_steps"], h["workflow_student_steps"]))
    if "gain_points" in h:
        if "labeled_per_point" in h:
            line = (f"Per point of avg@{k} gained over the base student ({h['gain_points']:+.1f} points): "
                    f"{h['labeled_per_point']:.1f} labeled examples, {h['teacher_tokens_per_point']:,.0f} teacher tokens")
        else:
            line = f"No gain over the base student ({h['gain_points']:+.1f} points of avg@{k}): no cost per point"
        if "direct_grpo_labeled_per_point" in h:
            line += (f"; direct GRPO: {h['direct_grpo_labeled_per_point']:.1f} labeled examples per point "
                     f"({h['direct_grpo_gain_points']:+.1f} points)")
        elif "direct_grpo_gain_points" in h:
            line += f"; direct GRPO gained {h['direct_grpo_gain_points']:+.1f} points"
        lines.append(line)
    lines.append(f"Wall time of all stages: {summary['total_time_s']:.0f} s")
    if summary.get("cost", {}).get("stages"):
        lines += ["", format_cost(summary["cost"])]
    if summary.get("promotion"):
        lines += ["", format_promotion(summary)]
    return "\n".join(lines)


def format_cost(costs: dict) -> str:
    """The per-stage cost table (stages/cost.py), with a total row; ``$`` only when priced."""
    cols = {k: v for k, v in cost.COLUMNS.items() if k != "usd" or "usd" in costs["total"]}

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"

    lines = ["Cost per stage:", "", "| stage | " + " | ".join(cols.values()) + " |", "|---|" + "---|" * len(cols)]
    for name, c in costs["stages"].items():
        label = f"{name} (reused)" if c.get("reused_from") else name
        lines.append(f"| {label} | " + " | ".join(fmt(c.get(k)) for k in cols) + " |")
    lines.append("| **total** | " + " | ".join(fmt(costs["total"].get(k)) for k in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the promotion gate (stages/recipes/promote.py)


def gate_planned(cfg: Config) -> bool:
    """The gate runs when it is on and there is a model registry to promote in."""
    from .recipes.promote import registered_name

    return cfg.promote.enabled and registered_name(cfg) is not None


def promote(cfg: Config, root: str, parent_run_id: str | None = None, model: str | None = None) -> dict:
    """Run the promotion gate on this root's final student (or ``model``): its inputs are the final student,
    the baseline's model when the baseline is planned, and the checkpoint of the version holding the champion
    alias (left out when that is the final student itself, so a rerun is a skip). Returns the run's summary
    with the decision added (``summary.json`` / ``summary.md`` and the MLflow parent run updated)."""
    from .cli import check_input
    from .recipes.promote import RegistryUnavailable, registered_name

    inputs = stage_inputs(cfg, root, "promote", {"final_student": model})
    name = registered_name(cfg)
    tracker = Tracker(cfg.tracking)
    parent_run_id = parent_run_id or find_parent(cfg, root)
    if name:
        alias = cfg.promote.champion_alias

        def find(c):
            mv = lineage.alias_holder(c, name, alias)
            return {"version": mv and mv.version, "uri": mv and lineage.checkpoint_of(c, mv)}

        champ = tracker.call(f"find {name}@{alias}", find, timeout=cfg.tracking.flush_timeout_s)
        if champ is None:
            raise RegistryUnavailable(f"the model registry at {tracker.tracking_uri} did not answer "
                                      f"({tracker.error or 'no answer in time'}): the gate needs it")
        if champ["version"] and champ["uri"] is None:
            raise storage.ArtifactError(f"{name}@{alias} (version {champ['version']}) points at no checkpoint URI")
        if champ["uri"] and champ["uri"] != inputs["model"]:
            inputs["champion"] = champ["uri"]
    for what, uri in inputs.items():
        check_input(uri, f"promote: {what}", cfg.models.student)
    print("[promote] running", flush=True)
    manifest, skipped = run_stage(cfg, root, "promote", inputs, parent_run_id)
    if skipped:
        print("[promote] already decided with the same config and inputs: skipped", flush=True)
    return record_promotion(cfg, root, parent_run_id, manifest["decision"])


def approve(cfg: Config, root: str, approved: bool, by: str = "", note: str = "", parent_run_id: str | None = None) -> dict:
    """A person's verdict on a promotion held for approval (see :func:`stages.recipes.promote.approve`)."""
    from .recipes import promote as gate

    gate.approve(cfg, root, approved, by, note)
    m = artifacts.read_manifest(storage.join(root, "promote"))
    return record_promotion(cfg, root, parent_run_id or find_parent(cfg, root), m["decision"])


def record_promotion(cfg: Config, root: str, parent_run_id: str | None, decision: dict) -> dict:
    """The decision (and its approval, if any) in ``summary.json`` / ``summary.md`` and on the parent run."""
    from .recipes.promote import champion_now, metrics_of, read_approval

    store = storage.store_for(root)
    raw = store.read_bytes(storage.join(root, "summary.json"))
    summary = json.loads(raw) if raw else {"rows": [], "headline": {}}
    approval = read_approval(root)
    summary["promotion"] = {**decision, "approval": approval, "champion_now": champion_now(decision, approval)}
    text = format_table(summary) if summary.get("rows") else format_promotion(summary)
    store.write_bytes(storage.join(root, "summary.json"), storage.dumps(summary, indent=2).encode())
    store.write_bytes(storage.join(root, "summary.md"), text.encode())
    tracker = Tracker(cfg.tracking)
    if tracker.enabled and parent_run_id:
        tracker.attach(parent_run_id)
        name = cfg.tracking.registered_models.get("student")
        tracker.metrics(metrics_of(decision))
        tracker.tags({"s2d.gate.status": (approval or {}).get("verdict") or decision["status"],
                      "s2d.gate.reason": decision["reason"][:5000],
                      **({"s2d.gate.version": f"{name}/{decision['version']}"} if decision.get("version") else {}),
                      "s2d.champion": f"{name}/{summary['promotion']['champion_now']}" if summary["promotion"]["champion_now"]
                      else "none"})
        tracker.text(text, "summary.md")
        tracker.flush()
    return summary


def format_promotion(summary: dict) -> str:
    from .recipes.promote import format_decision

    p = summary.get("promotion")
    return format_decision(p, p.get("approval")) if p else ""
