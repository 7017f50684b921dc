"""Stage promote (after ``report``): the gate between a run and a deployed student (docs/promotion.md).

The final student is evaluated with the evaluation protocol (``eval``: k samples per problem at the
evaluation temperature, on ``promote.sets`` or ``eval.sets``, problems pooled) next to the same run's
direct-GRPO baseline and the checkpoint of the registered version holding ``@champion``. All three see the
same problems and the same random draws, so they are compared problem by problem: the mean of the paired
differences of avg@k with a confidence interval (``promote.method``: paired bootstrap or paired t).

The new version always gets ``@challenger``. It takes ``@champion`` when there is none yet, or when the lower
end of the interval of (new - champion) exceeds ``promote.margin`` (and, with ``promote.baseline_margin`` set,
that of (new - baseline) exceeds it). With ``promote.approval`` the passing version waits for a person
(``python -m stages promote --approve`` / ``--reject``; the DAG's approval task). Every decision is kept on
the version (``s2d.gate.*`` tags), in the stage's manifest and ``decision.json``, and in the run's summary.

    python -m stages promote --config tiny --root runs/demo             # after report
    python -m stages promote --config tiny --root runs/demo --approve   # a held promotion goes through
"""

from __future__ import annotations

import gc
import json
from datetime import datetime, timezone

from .. import lineage, storage
from ..config import InputError
from ..runtime import StageRun
from ..scoring import paired_interval, problem_scores

DECISION = "decision.json"
APPROVAL = "approval.json"
ROLES = ("model", "baseline", "champion")  # the stage's inputs: the new student, the baseline, the champion


class RegistryUnavailable(RuntimeError):
    """The model registry did not answer: the gate cannot record or apply a decision (nothing is published)."""


def main(run: StageRun, *_uris: str) -> dict:
    cfg, p = run.cfg, run.cfg.promote
    sets = list(p.sets or cfg.eval.sets)
    problems = {s: run.task.problems(s)[: cfg.eval.problems] for s in sets}
    name = registered_name(cfg)
    with run.tracking(datasets=problems, context="evaluation"):
        scores = {role: problem_scores_of(run, run.inputs[role], problems) for role in ROLES if run.inputs.get(role)}
        flat = {role: [x for s in sets for x in by_set[s]] for role, by_set in scores.items()}
        cmp = {other: paired_interval(flat["model"], flat[other], p.confidence, p.method, p.resamples, cfg.seed)
               for other in ("baseline", "champion") if other in flat}
        state = registry_state(run, name) if name else None
        decision = decide(cmp, p, state, run.inputs)
        decision |= {"sets": sets, "problems": len(flat["model"]), "k": cfg.eval.samples, "root": run.root,
                     "uris": {r: run.inputs[r] for r in ROLES if run.inputs.get(r)},
                     "avg": {r: sum(v) / len(v) for r, v in flat.items()},
                     "avg_by_set": {r: {s: sum(v) / max(1, len(v)) for s, v in by_set.items()} for r, by_set in scores.items()},
                     "stage_run": run.run_id, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if run.is_main:  # a new decision: an approval of an earlier one no longer applies
            storage.store_for(run.uri).delete_prefix(storage.join(run.uri, APPROVAL))
        if state is not None:
            apply(run, name, decision)
        out = run.work / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / DECISION).write_text(json.dumps(decision, indent=2) + "\n")
        with open(out / "scores.jsonl", "w") as f:  # per problem, for anyone recomputing the interval
            for s in sets:
                for i, prob in enumerate(problems[s]):
                    f.write(json.dumps({"set": s, "problem_id": prob.id, **{r: scores[r][s][i] for r in scores}}) + "\n")
        print(format_decision(decision), flush=True)
        return run.publish({}, None, metrics=metrics_of(decision),
                           extra={"decision": decision, "labeled_examples": 0, "student_steps": 0})


def registered_name(cfg) -> str | None:
    """The registered model the gate promotes in; None without a registry (tracking off, or no name)."""
    return (cfg.tracking.registered_models.get("student") or None) if cfg.tracking.enabled else None


def problem_scores_of(run: StageRun, uri: str, problems: dict[str, list]) -> dict[str, list[float]]:
    """One checkpoint's per-problem avg@k on every set (the model is freed afterwards)."""
    import torch

    model, tok = run.load_model(uri, "student")
    try:
        return {s: problem_scores(run.rollout_maker, model, tok, probs) for s, probs in problems.items()}
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def registry_state(run: StageRun, name: str) -> dict:
    """The new checkpoint's registered version and the version holding the champion alias, read together."""
    p = run.cfg.promote

    def read(c):
        exp = run.tracker.experiment(c)
        cand = lineage.version_of(c, exp, name, run.inputs["model"])
        champ = lineage.alias_holder(c, name, p.champion_alias)
        return {"candidate": cand and cand.version, "champion": champ and champ.version,
                "champion_uri": champ and lineage.checkpoint_of(c, champ), "ok": True}

    got = run.tracker.call(f"read the registry of {name}", read)
    if not got:
        raise RegistryUnavailable(f"the model registry at {run.tracker.tracking_uri} did not answer "
                                  f"({run.tracker.error or 'no answer in time'}): nothing promoted; run promote again")
    if got["candidate"] is None:
        raise InputError(f"{run.inputs['model']} has no registered version of {name}: `report` registers it "
                         "(tracking.enabled, tracking.registered_models.student)")
    # the champion compared must be the one holding the alias now (not moved while the gate evaluated)
    if got["champion"] not in (None, got["candidate"]) and got["champion_uri"] not in (run.inputs.get("champion"),
                                                                                      run.inputs["model"]):
        raise RegistryUnavailable(f"@{p.champion_alias} of {name} moved to version {got['champion']} while the gate ran: "
                                  "run promote again")
    return got


def decide(cmp: dict, p, state: dict | None, inputs: dict) -> dict:
    """The gate's decision from the paired comparisons: ``passed``, ``status`` and the reason in words."""
    out = {"vs_baseline": cmp.get("baseline"), "vs_champion": cmp.get("champion"), "margin": p.margin,
           "baseline_margin": p.baseline_margin, "confidence": p.confidence, "method": p.method}
    base = cmp.get("baseline")
    base_ok = p.baseline_margin is None or base is None or base["lo"] > p.baseline_margin
    base_why = "" if base_ok else (f"; and the lower end of (new - baseline) {base['lo']:+.3f} does not exceed "
                                   f"baseline_margin {p.baseline_margin:+.3f}")
    version = state and state["candidate"]
    champion = state and state["champion"]
    out |= {"version": version, "champion_before": champion}
    if state is None:
        return out | {"passed": None, "status": "not applied", "champion_after": None,
                      "reason": "no model registry (tracking off or no registered student name): recorded only"}
    if champion == version:
        return out | {"passed": True, "status": "already champion", "champion_after": champion,
                      "reason": f"version {version} already holds @{p.champion_alias}"}
    if champion is None:
        passed = base_ok
        reason = "the first version: no champion to beat" + base_why
    elif cmp.get("champion") is None:  # another version registered for the same checkpoint URI
        passed, reason = False, f"version {champion} holds @{p.champion_alias} for the same checkpoint URI: nothing to compare"
    else:
        c = cmp["champion"]
        passed = c["lo"] > p.margin and base_ok
        rel = "exceeds" if c["lo"] > p.margin else "does not exceed"
        reason = (f"the lower end of (new - champion) {c['lo']:+.3f} {rel} margin {p.margin:+.3f} "
                  f"({c['diff']:+.3f}, {round(100 * c['confidence'])}% {c['method']} interval over {c['n']} problems)"
                  + base_why)
    status = ("awaiting approval" if p.approval else "promoted") if passed else "kept"
    after = version if status == "promoted" else champion
    return out | {"passed": passed, "status": status, "champion_after": after, "reason": reason}


def interval_text(c: dict | None) -> str:
    if not c:
        return "-"
    return (f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] ({round(100 * c['confidence'])}% {c['method']}, "
            f"n={c['n']}; {c['new']:.3f} vs {c['old']:.3f})")


def version_tags(d: dict, name: str) -> dict[str, str]:
    """The decision as tags of the new version (``s2d.gate.*``): numbers, interval, compared versions."""
    tags = {"s2d.gate.status": d["status"], "s2d.gate.passed": str(d["passed"]).lower(), "s2d.gate.reason": d["reason"],
            "s2d.gate.new_avg": f"{d['avg']['model']:.4f}", "s2d.gate.sets": ",".join(d["sets"]),
            "s2d.gate.problems": str(d["problems"]), "s2d.gate.k": str(d["k"]), "s2d.gate.margin": str(d["margin"]),
            "s2d.gate.champion_before": f"{name}/{d['champion_before']}" if d["champion_before"] else "none",
            "s2d.gate.root": d["root"], "s2d.gate.at": d["at"]}
    if d.get("stage_run"):
        tags["s2d.gate.run"] = d["stage_run"]
    for other in ("baseline", "champion"):
        c = d[f"vs_{other}"]
        if c:
            tags[f"s2d.gate.vs_{other}"] = interval_text(c)
            tags |= {f"s2d.gate.vs_{other}.{k}": f"{c[k]:.4f}" for k in ("diff", "lo", "hi")}
            tags[f"s2d.gate.{other}_avg"] = f"{d['avg'][other]:.4f}"
            tags[f"s2d.gate.{other}_uri"] = d["uris"][other]
    return tags


def apply(run: StageRun, name: str, d: dict) -> None:
    """Move the aliases as decided and tag the new version; bounded, and an error when the registry does not
    answer (nothing is published then, so a rerun decides again)."""
    p = run.cfg.promote

    def write(c):
        c.set_registered_model_alias(name, p.challenger_alias, d["version"])
        if d["status"] == "promoted":
            c.set_registered_model_alias(name, p.champion_alias, d["version"])
            if d["champion_before"]:
                c.set_model_version_tag(name, d["champion_before"], "s2d.gate.replaced_by", f"{name}/{d['version']}")
        if d["status"] != "already champion":  # the decision that made it champion stays on it
            for k, v in version_tags(d, name).items():
                c.set_model_version_tag(name, d["version"], k, v[:5000])
        return True

    if not run.tracker.call(f"apply the decision on {name}/{d['version']}", write):
        raise RegistryUnavailable(f"the model registry at {run.tracker.tracking_uri} did not answer "
                                  f"({run.tracker.error or 'no answer in time'}): nothing promoted; run promote again")


def metrics_of(d: dict) -> dict[str, float]:
    out = {f"gate.{r}_avg": v for r, v in d["avg"].items()}
    for other in ("baseline", "champion"):
        if d[f"vs_{other}"]:
            out |= {f"gate.vs_{other}.{k}": d[f"vs_{other}"][k] for k in ("diff", "lo", "hi")}
    if d["passed"] is not None:
        out["gate.passed"] = float(d["passed"])
    return out


def format_decision(d: dict, approval: dict | None = None) -> str:
    """The decision in a few lines (the summary's promotion section)."""
    who = f"version {d['version']}" if d.get("version") else "the final student"
    lines = [f"Promotion gate: avg@{d['k']} on {', '.join(d['sets'])} ({d['problems']} problems, paired, same draws)",
             f"  new ({who}): {d['avg']['model']:.3f}"]
    if d["vs_baseline"]:
        lines.append(f"  vs direct GRPO baseline: {interval_text(d['vs_baseline'])}")
    if d["vs_champion"]:
        lines.append(f"  vs champion (version {d['champion_before']}): {interval_text(d['vs_champion'])}")
    lines.append(f"  decision: {d['status']}: {d['reason']}")
    if approval:
        lines.append(f"  approval: {approval['verdict']} by {approval['by']} at {approval['at']}"
                     + (f" ({approval['note']})" if approval.get("note") else ""))
    if d.get("version"):
        lines.append(f"  aliases: @challenger = {d['version']}, @champion = {champion_now(d, approval) or 'none'}")
    return "\n".join(lines)


def champion_now(d: dict, approval: dict | None = None):
    """The version holding the champion alias after the decision (and its approval, if any)."""
    if approval and approval.get("verdict") == "approved":
        return d["version"]
    return d.get("champion_after")


def read_approval(root: str) -> dict | None:
    raw = storage.store_for(root).read_bytes(storage.join(root, "promote", APPROVAL))
    return json.loads(raw) if raw else None


def approve(cfg, root: str, approved: bool, by: str = "", note: str = "") -> dict:
    """A person's verdict on a promotion held for approval (``promote.approval``): approved moves
    ``@champion`` to the new version, unless the champion changed since the decision (then an error: run the
    gate again); rejected leaves it alone. Tagged on the version, written to ``<root>/promote/approval.json``.
    Giving the same verdict again is a no-op; the opposite one is refused."""
    from .. import artifacts
    from ..tracking import Tracker

    m = artifacts.read_manifest(storage.join(root, "promote"))
    if m is None:
        raise InputError(f"{root}: no promotion decision (run `python -m stages promote` first)")
    d, p = m["decision"], cfg.promote
    if d["status"] != "awaiting approval":
        raise InputError(f"{root}: the promotion of version {d.get('version')} is '{d['status']}', not awaiting approval")
    verdict = "approved" if approved else "rejected"
    prev = read_approval(root)
    if prev:
        if prev["verdict"] != verdict:
            raise InputError(f"{root}: the promotion was already {prev['verdict']} by {prev['by']} at {prev['at']}")
        return prev
    name = registered_name(cfg)
    tracker = Tracker(cfg.tracking)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def write(c):
        if approved:
            now = lineage.alias_holder(c, name, p.champion_alias)
            if (now and now.version) != d["champion_before"]:
                return {"stale": True, "now": now and now.version}
            c.set_registered_model_alias(name, p.champion_alias, d["version"])
            if d["champion_before"]:
                c.set_model_version_tag(name, d["champion_before"], "s2d.gate.replaced_by", f"{name}/{d['version']}")
        tags = {"s2d.gate.status": verdict, "s2d.gate.approval": verdict, "s2d.gate.approved_by": by or "unknown",
                "s2d.gate.approval_at": at, **({"s2d.gate.approval_note": note[:5000]} if note else {})}
        for k, v in tags.items():
            c.set_model_version_tag(name, d["version"], k, v)
        return {"stale": False}

    got = tracker.call(f"{verdict} {name}/{d['version']}", write) if name else None
    if not got:
        raise RegistryUnavailable(f"the model registry at {getattr(tracker, 'tracking_uri', '-')} did not answer "
                                  f"({getattr(tracker, 'error', None) or 'no answer in time'}): nothing changed")
    if got["stale"]:
        raise InputError(f"@{p.champion_alias} of {name} is version {got['now'] or 'none'} now, not "
                         f"{d['champion_before'] or 'none'} as when the gate decided: run promote again")
    approval = {"verdict": verdict, "by": by or "unknown", "at": at, "note": note, "version": d["version"],
                "champion_after": d["version"] if approved else d["champion_before"]}
    storage.store_for(root).write_bytes(storage.join(root, "promote", APPROVAL), (json.dumps(approval, indent=2) + "\n").encode())
    return approval
