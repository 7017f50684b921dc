"""The paper's table in miniature: every arm of the sparse-to-dense ablation, 5 seeds, tuned fairly.

    python bench/paper_table.py --preset cpu                 # 5 seeds; 28.8 min on 2 CPU cores (make bench-paper)
    make bench-mechanism     # --digits 3 4 5 --seeds 0 1 2 at the chosen rates: the 2b gain vs trace length
    python bench/paper_table.py --preset stages/configs/tiny.yaml --select-only  # learning rates for a preset
    python bench/paper_table.py --preset gpu --workers 1     # one GPU (bigger models and batches)

Selection (never on eval): on the first seed, the 2a/2b learning rate (one value for both) is swept on the
full arm, then stage 3's learning rate on the full arm at the chosen 2a/2b rate, and direct GRPO sweeps its
own (``--lrs``, ``--distill-lrs``); each is chosen by avg@k on the task's ``validation`` split. A best value
at an edge of its grid is no optimum: the grid is extended past that edge (1-3-10 steps, at most twice; a tie
keeps the grid's value). Every arm of every seed then runs at the chosen values (the arms share the stages,
so they share the stages' rates).

Arms, equal student update steps (the labeled examples and teacher tokens each consumed are in the table):

    full                stage 1 teacher -> 2a warmup -> 2b on-policy distill (the preset's form) -> 3 student GRPO
    full, 2b <other>    the same with the other 2b form (sampled-token vs full-vocabulary reverse KL)
    raw teacher         no stage 1: 2a/2b use the base teacher               (paper: -7.8 MATH)
    no warmup           no 2a: its steps go to 2b                            (paper: -1.7)
    no on-policy 2b     no 2b: its steps go to 2a                            (paper: -3.3)
    warmup only         control: 2a for the whole student budget, no RL, no on-policy data
    direct GRPO         the baseline, at its own chosen learning rate
    (controls, only with --arms:)
    2a until C2 plateaus  2a stops once C2 stops falling (kl_warmup.c2_patience); 2b takes the steps it left
    no 2a, 2b steps as full's   control: no 2a and its steps NOT given to 2b (the student does fewer steps)
    half 2a, rest to 2b         control: half of 2a's steps, the other half to 2b
    2a at a third of its rate   control: 2a's learning rate / 3
    full, 2b's rate warmed up   2b's rate rises linearly over its first sixth of steps, at least 2 (the hand-over from 2a)

and at equal teacher tokens (about the full arm's: a 2a step has the teacher generate and score, about two
2b steps' worth): "no 2b" and "warmup only" with w + d/2 warmup steps. Per seed, every arm is compared with
the full arm of the same seed (paired differences, 95% t-interval over seeds).

The base models (the bootstrap: the stand-in for pretraining) are shared by all seeds, like a
pretrained checkpoint; stage 1 and everything after run once per seed. Every stage is the real
stage code (``stages.workflow.run_stage``); every process uses one torch thread (bench/determinism.py:
the thread count changes the float results); artifacts land under ``--root`` and a rerun skips what is
published. Results: ``<out>/paper_table_<preset>.{md,png,json}`` (``mechanism_*``, ``selection_*``) and
one MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine, paired, preset_path  # noqa: E402
from stages import storage, workflow  # noqa: E402
from stages.config import ConfigError, load_config  # noqa: E402

WARM, DISTILL, RL = "kl_warmup", "onpolicy_distill", "student_rl"


def arms(cfg) -> dict[str, dict]:
    """Arm name -> (teacher: 'rl'|'base', stages, overrides). The first six have the same student steps; the two
    "= full's teacher tokens" arms get the teacher compute of the full arm instead (a 2a step has the teacher
    generate and score, about twice a 2b step's scoring, so 2a steps = w + d/2)."""
    w, d, r = cfg.kl_warmup.steps, cfg.onpolicy_distill.steps, cfg.student_rl.steps
    budget = w + d + r
    other = "sampled" if cfg.onpolicy_distill.form == "full" else "full"
    w_eq = w + math.ceil(d / 2)
    return {
        "full": {"teacher": "rl", "stages": [WARM, DISTILL, RL], "set": []},
        f"full, 2b {other}": {"teacher": "rl", "stages": [WARM, DISTILL, RL], "set": [f"onpolicy_distill.form={other}"]},
        "raw teacher (no 1)": {"teacher": "base", "stages": [WARM, DISTILL, RL], "set": []},
        "no warmup (no 2a)": {"teacher": "rl", "stages": [DISTILL, RL], "set": [f"onpolicy_distill.steps={w + d}"]},
        # 2a for at most w steps, stopped once C2 stops falling (2 measurements without a 2% drop, one every
        # ceil(w / 6) steps); 2b takes the steps 2a left (the paper's purpose of the warmup: C2, not a count)
        # issue 27's controls for "no 2a beats full": is it 2a's steps, its length or its rate?
        NO2A_SAME_2B: {"teacher": "rl", "stages": [DISTILL, RL], "set": []},  # 2a's steps are not given to 2b
        HALF_2A: {"teacher": "rl", "stages": [WARM, DISTILL, RL],
                  "set": [f"kl_warmup.steps={w // 2}", f"onpolicy_distill.steps={d + w - w // 2}"]},
        SLOW_2A: {"teacher": "rl", "stages": [WARM, DISTILL, RL], "set": [], "scale": {"kl_warmup.optim.lr": 1 / 3}},
        # the 2a -> 2b hand-over: 2b starts a fresh AdamW at its full rate, and its first steps undo part of 2a;
        # at least 2 steps (a 1-step warmup is none: the first step already runs at the full rate)
        WARM_2B: {"teacher": "rl", "stages": [WARM, DISTILL, RL],
                  "set": [f"onpolicy_distill.optim.warmup_steps={max(2, math.ceil(d / 6))}"]},
        PLATEAU: {"teacher": "rl", "stages": [WARM, DISTILL, RL],
                  "set": [f"kl_warmup.c2_every={max(1, math.ceil(w / 6))}", "kl_warmup.c2_patience=2",
                          "onpolicy_distill.take_unused_warmup=true"]},
        "no on-policy (no 2b)": {"teacher": "rl", "stages": [WARM, RL], "set": [f"kl_warmup.steps={w + d}"]},
        "warmup only": {"teacher": "rl", "stages": [WARM], "set": [f"kl_warmup.steps={budget}"]},
        EQ_NO2B: {"teacher": "rl", "stages": [WARM, RL], "set": [f"kl_warmup.steps={w_eq}"]},
        EQ_WARM: {"teacher": "rl", "stages": [WARM], "set": [f"kl_warmup.steps={w_eq}"]},
    }


EQ_NO2B, EQ_WARM = "no 2b, = full's teacher tokens", "warmup only, = full's teacher tokens"
PLATEAU = "2a until C2 plateaus"
WARM_2B = "full, 2b's rate warmed up"
NO2A_SAME_2B, HALF_2A, SLOW_2A = "no 2a, 2b steps as full's", "half 2a, rest to 2b", "2a at a third of its rate"
CONTROLS = (PLATEAU, NO2A_SAME_2B, HALF_2A, SLOW_2A, WARM_2B)  # run only when named with --arms
MECHANISM_ARMS = ("full", "no on-policy (no 2b)", EQ_WARM)


def direct(lr: float, budget: int) -> dict:
    return {
        "teacher": "rl",
        "stages": [],
        "lr": lr,
        "direct": True,
        "set": ["workflow.baseline=true", f"direct_grpo.steps={budget}", f"direct_grpo.optim.lr={lr}"],
    }


def arm_config(base: str, overrides: list[str], teacher: str, student: str, arm: dict):
    """One arm's config: the preset, the table's overrides, the arm's own, its base models given as checkpoints."""
    sets = overrides + arm["set"] + [
        # an imported preset's import settings (import_from, layers) no longer apply to a checkpoint source
        f"models.teacher.source={teacher}", "models.teacher.import_from=null", "models.teacher.layers=null",
        f"models.student.source={student}",
        f"workflow.stages=[{','.join(arm['stages'])}]", f"workflow.baseline={'true' if arm.get('direct') else 'false'}"]
    cfg = load_config(base, sets)
    if arm.get("scale"):  # a setting relative to the value in force (the chosen learning rate, say)
        cfg = load_config(base, sets + [f"{key}={_get(cfg, key) * f:.3g}" for key, f in arm["scale"].items()])
    return cfg


def run_arm(base: str, overrides: list[str], root: str, teacher: str, student: str, arm: dict) -> dict:
    """Run one arm's stages (skipping published ones); return its manifests and config."""
    cfg = arm_config(base, overrides, teacher, student, arm)
    results, reused = {}, 0
    for step in workflow.plan(cfg, root):
        manifest, skipped = workflow.run_stage(cfg, root, step["stage"], step["inputs"])
        results[step["stage"]] = manifest
        reused += skipped
    return {"cfg": cfg, "results": results, "reused": reused}


def _get(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def run_arm_summary(*a) -> dict:
    """run_arm for a worker process: only the (picklable) manifests come back, and how many were reused."""
    out = run_arm(*a)
    return {"results": out["results"], "stages": len(out["results"]), "stages_reused": out["reused"]}


def arm_job(base, overrides, arm_root, teacher, student, arm, name, seed, k, rl_teacher, validate=False) -> dict:
    """One arm of one seed, in a worker: its stages, its table row, its final C2 against the RL teacher and,
    for the learning-rate sweep, its avg@k on the validation split."""
    out = run_arm(base, overrides, arm_root, teacher, student, arm)
    row = arm_row(name, out, arm_root, k) | {"seed": seed, "overrides": [o for o in overrides if "lr=" in o],
                                             "stages": len(out["results"]), "stages_reused": out["reused"]}
    row["c2_final"], val = c2_of(base, overrides, arm_root, rl_teacher, row["final_model"], validate)
    if validate:
        row["val"] = val
    print(f"[seed {seed}] {name:<22} avg@{k} {row[f'avg@{k}']:.3f}  C2 {row['c2_final']:.3f}  "
          f"steps {row['student_steps']}  {row['student_wall_s']:.0f}s", flush=True)
    return row


class _Now:
    """An executor that runs each job at submit time (workers=1: no subprocesses)."""

    def submit(self, fn, *a):
        from concurrent.futures import Future

        f = Future()
        f.set_result(fn(*a))
        return f

    def shutdown(self):
        pass


def _pool(workers: int):
    if workers <= 1:
        return _Now()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # a fresh process per arm: a worker that ran a real-model arm keeps its allocator's peak (~12 GB on
    # smollm2-cpu), and two such workers at once do not fit in 24 GB
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1)


def stage_tokens(stage_uri: str, per_step: int) -> float:
    """Completion tokens a stage's rollouts had (sum over steps of completion_len x samples)."""
    raw = storage.store_for(stage_uri).read_bytes(storage.join(stage_uri, "metrics.jsonl"))
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()] if raw else []
    return sum(r.get("completion_len", 0.0) * per_step for r in rows)


def arm_row(name: str, out: dict, root: str, k: int) -> dict:
    cfg, res = out["cfg"], out["results"]
    last = res.get("direct_grpo") or res[[s for s in (WARM, DISTILL, RL) if s in res][-1]]
    m = last["metrics"]
    row = {"arm": name, f"avg@{k}": m[f"eval.avg@{k}"], f"pass@{k}": m.get(f"eval.pass@{k}"), "greedy": m.get("eval.greedy"),
           "student_steps": sum(r.get("student_steps", 0) for r in res.values()),
           "labeled_student": sum(r.get("labeled_examples", 0) for r in res.values()),
           "student_wall_s": sum(r.get("wall_time_s", 0.0) for r in res.values())}
    # teacher compute in the student stages: tokens the teacher generated (2a) or scored (2a, 2b)
    t_tok = 0.0
    if WARM in res:
        t_tok += 2 * stage_tokens(storage.join(root, WARM), cfg.kl_warmup.prompts_per_step)
    if DISTILL in res:
        t_tok += stage_tokens(storage.join(root, DISTILL), cfg.onpolicy_distill.prompts_per_step)
    row["teacher_tokens"] = t_tok
    if WARM in res:  # 2a's steps actually run (fewer when C2 stopped it)
        row["warmup_steps"] = res[WARM].get("student_steps")
    for s in (WARM, DISTILL):
        if s in res:
            row[f"c2_before_{s}"] = res[s]["metrics"].get("c2_before")
            row[f"c2_after_{s}"] = res[s]["metrics"].get("c2_after")
    row["final_model"] = last["outputs"]["model"]
    return row


def c2_of(base: str, overrides: list[str], root: str, teacher: str, student_uri: str, validate: bool = False):
    """KL(student || teacher) per token of a final model against the seed's RL teacher (same draws everywhere)
    and, with ``validate``, (c2, the model's avg@k on the validation split); else (c2, None).

    Kept in ``<root>/_scores/<key>.json``, the key a hash of everything the numbers depend on (both models'
    manifests, the config, ``validate``): a rerun that skips the published stages skips these passes too."""
    import hashlib

    from stages import artifacts
    from stages.runtime import StageRun
    from stages.scoring import eval_metrics, student_teacher_kl

    cfg = load_config(base, overrides)
    digests = [artifacts.manifest_sha256(found[0]) if (found := artifacts.find_manifest(u)) else u
               for u in (teacher, student_uri)]
    key = hashlib.sha256(json.dumps([digests, cfg.model_dump(mode="json"), validate], sort_keys=True,
                                    default=str).encode()).hexdigest()[:24]
    store, cache = storage.store_for(root), storage.join(root, "_scores", f"{key}.json")
    if (raw := store.read_bytes(cache)) is not None:
        got = json.loads(raw)
        return got["c2"], got["val"]
    run = StageRun("c2", cfg, root)  # publishes nothing: only its loading and sampling are used
    try:
        t, s, tok = run.load_teacher_student(teacher, student_uri)
        c2 = student_teacher_kl(run.rollout_maker, s, t, tok, run.task.problems("prompts"), label="c2-final")
        val = (
            eval_metrics(run.rollout_maker, s, tok, run.task.problems("validation"))[f"avg@{cfg.eval.samples}"]
            if validate
            else None
        )
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    store.write_bytes(cache, storage.dumps({"c2": c2, "val": val, "teacher": teacher, "student": student_uri}).encode())
    return c2, val


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="bench/configs/paper-<preset>.yaml or a YAML path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                   help="RL learning rates swept (stage 3 and direct GRPO), on the first seed's validation split")
    p.add_argument("--distill-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                   help="learning rates swept for stages 2a and 2b (one value for both)")
    p.add_argument("--digits", type=int, nargs="+", default=None,
                   help="the mechanism instead of the table: full vs no-2b vs warmup-only at equal teacher tokens, "
                        "for tasks of this many digits (longer traces), at the preset's learning rates")
    p.add_argument("--select-only", action="store_true",
                   help="only the learning-rate selection (first seed): the values to put in a preset, e.g. "
                        "--preset stages/configs/tiny.yaml for the demo")
    p.add_argument("--sweep", choices=("all", "direct", "none"), default="all",
                   help="which learning rates are chosen on validation: all (2a/2b, stage 3, direct GRPO) or only direct "
                        "GRPO's (the stages keep the preset's rates: cheaper, for a preset whose rates are already chosen) "
                        "or none (every arm at the preset's rates and --set values, e.g. those a full run chose)")
    p.add_argument("--per-arm-rates", action="store_true",
                   help="each arm also gets its OWN 2a/2b learning rate, chosen on validation over --distill-lrs like the "
                        "full arm's (at stage 3's rate in force), instead of sharing the full arm's (issue 27)")
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="only these arms (names or their slugs: full, no-warmup-no-2a, no-on-policy-no-2b, "
                        "raw-teacher-no-1, direct-grpo, ...); default: all")
    p.add_argument("--root", default=None, help="artifact root (default runs/bench-paper-<preset>)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--workers", type=int, default=2, help="arms run side by side in this many processes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    base = preset_path(args.preset)
    try:
        cfg0 = load_config(base, args.overrides)  # a bad config fails here, before any training
        if cfg0.task.sizes.get("validation", 0) < 1:
            raise ConfigError("task.sizes.validation: the learning-rate sweep needs a validation split")
        for d in args.digits or []:  # the task draws distinct problems: too few of them would never finish
            if (need := sum(cfg0.task.sizes.values())) > (room := distinct_problems(cfg0.task.ops, min(2, d), d)) * 0.9:
                raise ConfigError(f"--digits {d}: the splits need {need} distinct problems and {d}-digit tasks have "
                                  f"about {room}; use more digits or smaller task.sizes")
        known = [*arms(cfg0), "direct GRPO"]
        if bad := [a for a in args.arms or [] if a not in known and a not in map(arm_key, known)]:
            raise ConfigError(f"--arms {' '.join(bad)}: no such arm (arms: {', '.join(map(arm_key, known))})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = args.root or str(REPO / "runs" / f"bench-paper-{cfg0.name}")
    command = " ".join(["python", "bench/paper_table.py", *(argv if argv is not None else sys.argv[1:])])
    # one torch thread in every process, the bootstrap included: the draws then do not depend on the
    # machine's core count (bench/results/determinism.md: intra-op threads change the float results)
    # (stage-level MLflow runs off: the benchmark logs one run of its own)
    overrides = ["torch_threads=1", "tracking.enabled=false"] + args.overrides
    pool = _pool(args.workers)
    t_start = time.perf_counter()
    try:
        if args.digits:
            result, seeds = {"mechanism": [], "seeds": args.seeds}, args.seeds
            for d in args.digits:
                ov = overrides + [f"task.min_digits={min(2, d)}", f"task.max_digits={d}",
                                  f"sampling.max_new_tokens={10 * d + 10}"]
                r = run_table(base, ov, args.seeds, storage.join(root, f"digits{d}"), pool, sweep=None,
                              only=MECHANISM_ARMS)
                result["mechanism"].append({"digits": d} | r)
            stem_name = f"mechanism_{cfg0.name}"
        else:
            seeds = args.seeds[:1] if args.select_only else args.seeds
            sweep = {"rl": args.lrs, "distill": args.distill_lrs, "stages": args.sweep == "all"}
            only = ("full", "direct GRPO") if args.select_only else args.arms  # the selection's rows come from the sweep
            if args.select_only and args.sweep == "direct":
                only = ("direct GRPO",)
            result = run_table(base, overrides, seeds, root, pool, sweep=None if args.sweep == "none" else sweep, only=only,
                               own_rates=args.distill_lrs if args.per_arm_rates else None)
            stem_name = f"{'selection' if args.select_only else 'paper_table'}_{cfg0.name}"
    finally:
        pool.shutdown()
    result |= {
        "preset": cfg0.name,
        "config": base,
        "overrides": args.overrides,
        "seeds": result["seeds"] if args.digits else seeds,
        "wall_s": time.perf_counter() - t_start,
        "machine": machine(),
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    md = render_mechanism(result) if args.digits else render(result)
    stem.with_suffix(".md").write_text(md)
    (plot_mechanism if args.digits else plot)(result, stem.with_suffix(".png"))
    log_mlflow(result, stem)
    print(md)
    return 0


def distinct_problems(ops: list[str], lo: int, hi: int) -> int:
    """About how many distinct problems a task of lo..hi digits has (a+b and b+a are one)."""
    n = 10**hi - (10 ** (lo - 1) if lo > 1 else 0)
    return ("add" in ops) * n * (n + 1) // 2 + ("mul" in ops) * n * 8


def distill_lr(dl: float) -> list[str]:
    """The overrides that set 2a's and 2b's learning rate (one value for both)."""
    return [f"{WARM}.optim.lr={dl}", f"{DISTILL}.optim.lr={dl}"]


def announce(sel: dict) -> None:
    print(f"[select] {sel['what']}: " + ", ".join(f"{v:g}: {x:.3f}" for v, x in sel["values"].items())
          + f" -> {sel['chosen']:g}", flush=True)


def run_table(base: str, overrides: list[str], seeds: list[int], root: str, pool, sweep: dict | None, only,
              own_rates: list[float] | None = None) -> dict:
    """Bootstrap once, stage 1 per seed, the learning-rate selection (on validation, first seed), every arm per seed.
    With ``own_rates``, every arm (the full one too when its rate was not swept already) has its own 2a/2b rate
    chosen on validation over that grid, at the stage 3 / direct GRPO rates in force."""
    cfg0 = load_config(base, overrides)
    k = cfg0.eval.samples
    boot, boot_reused, base_t, base_s = base_models(base, overrides, storage.join(root, "base"))
    print(f"[base] teacher avg@{k} {boot['metrics'].get(f'teacher.eval.avg@{k}', float('nan')):.3f}  "
          f"student {boot['metrics'].get(f'student.eval.avg@{k}', float('nan')):.3f}", flush=True)
    # stage 1 once per seed; every arm with an RL'd teacher reads it
    t_arm = {"teacher": "base", "stages": ["teacher_rl"], "set": []}
    t_jobs = [pool.submit(run_arm_summary, base, overrides + [f"seed={s}"], storage.join(root, f"seed{s}", "teacher"),
                          base_t, base_s, t_arm) for s in seeds]
    teacher_rows, rl_teacher = [], {}
    for s, job in zip(seeds, t_jobs):
        tm = job.result()["results"]["teacher_rl"]
        rl_teacher[s] = tm["outputs"]["model"]
        teacher_rows.append({"seed": s, "before": tm["metrics"][f"eval_before.avg@{k}"], "after": tm["metrics"][f"eval.avg@{k}"],
                             "wall_s": tm["wall_time_s"], "labeled": tm["labeled_examples"]})
        print(f"[seed {s}] C1 teacher avg@{k} {teacher_rows[-1]['before']:.3f} -> {teacher_rows[-1]['after']:.3f}", flush=True)
    # a base teacher that was imported, not bootstrapped, is scored by stage 1 before its first update
    boot["metrics"].setdefault(f"teacher.eval.avg@{k}", teacher_rows[0]["before"])

    def submit(seed: int, name: str, arm: dict, extra: list[str], where: str, validate: bool = False):
        teacher = rl_teacher[seed] if arm["teacher"] == "rl" else base_t
        return pool.submit(arm_job, base, overrides + [f"seed={seed}"] + extra, storage.join(root, f"seed{seed}", where),
                           teacher, base_s, arm, name, seed, k, rl_teacher[seed], validate)

    budget = cfg0.student_step_budget()
    table = arms(cfg0)
    chosen, selection, reuse, sweep_jobs = [], [], {}, []

    def val(job):
        return job.result()["val"]

    def g_job(lr):  # one point of direct GRPO's sweep, on the first seed's validation split
        return submit(seeds[0], "direct GRPO", direct(lr, budget), [], f"sweep/direct-lr{lr:g}", True)

    if sweep and not sweep.get("stages", True):
        # only direct GRPO's rate is chosen on validation; the stages keep the preset's rates
        g_jobs = {lr: g_job(lr) for lr in sweep["rl"]}
        g_val, best_g, g_ext = choose(g_jobs, g_job, val)
        selection = [{"what": "direct GRPO lr", "values": g_val, "chosen": best_g, "extended": g_ext}]
        announce(selection[0])
        chosen, reuse, sweep_jobs = [f"direct_grpo.optim.lr={best_g}"], {"direct GRPO": g_jobs[best_g]}, list(g_jobs.values())
        table["direct GRPO"] = direct(best_g, budget)
    elif sweep:
        # Selection on the validation split of the first seed, never on eval. The 2a/2b learning rate is
        # swept on the full arm (stage 3 at the preset's rate), then stage 3's on the full arm at the chosen
        # 2a/2b rate; direct GRPO sweeps its own. Every arm then runs at the chosen values.
        s0, full = seeds[0], table["full"]
        rl_default = cfg0.student_rl.optim.lr

        def lr_set(dl, rl):
            return distill_lr(dl) + [f"{RL}.optim.lr={rl}"]

        def d_job(dl):
            return submit(s0, "full", full, lr_set(dl, rl_default), f"sweep/full-d{dl:g}-rl{rl_default:g}", True)

        d_jobs = {dl: d_job(dl) for dl in sweep["distill"]}
        g_jobs = {lr: g_job(lr) for lr in sweep["rl"]}
        d_val, best_d, d_ext = choose(d_jobs, d_job, val)

        def r_job(rl):
            return d_jobs[best_d] if rl == rl_default else submit(s0, "full", full, lr_set(best_d, rl),
                                                                  f"sweep/full-d{best_d:g}-rl{rl:g}", True)

        r_jobs = {rl: r_job(rl) for rl in sweep["rl"]}
        r_val, best_r, r_ext = choose(r_jobs, r_job, val)
        g_val, best_g, g_ext = choose(g_jobs, g_job, val)
        selection = [{"what": "2a/2b lr (full arm)", "values": d_val, "chosen": best_d, "extended": d_ext},
                     {"what": "stage 3 lr (full arm)", "values": r_val, "chosen": best_r, "extended": r_ext},
                     {"what": "direct GRPO lr", "values": g_val, "chosen": best_g, "extended": g_ext}]
        for sel in selection:
            announce(sel)
        chosen = lr_set(best_d, best_r) + [f"direct_grpo.optim.lr={best_g}"]
        reuse = {"full": r_jobs[best_r], "direct GRPO": g_jobs[best_g]}  # the first seed's rows, already run
        sweep_jobs = [*d_jobs.values(), *r_jobs.values(), *g_jobs.values()]
        table["direct GRPO"] = direct(best_g, budget)
    else:
        table["direct GRPO"] = direct(cfg0.direct_grpo.optim.lr, budget)
    if only is None:  # the issue-27 controls run only when named (--arms): the default table stays the paper's
        names = [n for n in table if n not in CONTROLS]
    else:
        names = [n for n in table if n in only or arm_key(n) in only]
    own = {}  # arm -> its own 2a/2b rate
    if own_rates:
        # issue 27: the ablations share the full arm's 2a/2b rate, which favours the full arm; here each arm's
        # own rate is chosen on the first seed's validation split like the full arm's (same grid, same extension)
        rest = [c for c in chosen if not c.startswith((f"{WARM}.", f"{DISTILL}."))]

        def own_job(n: str, dl: float):
            return submit(seeds[0], n, table[n], rest + distill_lr(dl), f"sweep/{_slug(n)}-d{dl:g}", True)

        swept = [n for n in names if n != "direct GRPO" and not (n == "full" and "full" in reuse)]
        grids = {n: {dl: own_job(n, dl) for dl in own_rates} for n in swept}  # all submitted before any wait
        for n, grid in grids.items():
            vals, own[n], ext = choose(grid, lambda dl, n=n: own_job(n, dl), val)
            selection.append({"what": f"2a/2b lr ({n}, its own)", "values": vals, "chosen": own[n], "extended": ext})
            announce(selection[-1])
            reuse[n] = grid[own[n]]
            sweep_jobs += list(grid.values())

    def arm_sets(n: str) -> tuple[list[str], str]:  # an arm's rate overrides and its folder
        if n in own:
            return rest + distill_lr(own[n]), f"{_slug(n)}-d{own[n]:g}"
        return chosen, _slug(n)

    jobs = [reuse[n] if s == seeds[0] and n in reuse else submit(s, n, table[n], *arm_sets(n))
            for s in seeds for n in names]
    rows = [j.result() for j in jobs]
    # stage runs this command made or found published: bootstrap, stage 1, every arm once (sweep points included)
    outs = [j.result() for j in {id(j): j for j in [*t_jobs, *jobs, *sweep_jobs]}.values()]
    reused = boot["stages"] * int(boot_reused) + sum(o["stages_reused"] for o in outs)
    stages = {"reused": reused, "run": boot["stages"] + sum(o["stages"] for o in outs) - reused}
    for seed in seeds:
        # the base student, for reference (no training; C2 against the same RL teacher)
        rows.append(
            {
                "arm": "base student (no training)",
                "seed": seed,
                f"avg@{k}": boot["metrics"].get(f"student.eval.avg@{k}", float("nan")),  # nan: a base given as a path
                f"pass@{k}": boot["metrics"].get(f"student.eval.pass@{k}"),
                "greedy": boot["metrics"].get("student.eval.greedy"),
                "student_steps": 0,
                "labeled_student": 0,
                "student_wall_s": 0.0,
                "teacher_tokens": 0.0,
                "c2_final": c2_of(
                    base, overrides + [f"seed={seed}"], storage.join(root, f"seed{seed}", "teacher"), rl_teacher[seed], base_s
                )[0],
            }
        )
    return {"k": k, "eval_problems": min(cfg0.eval.problems, cfg0.task.sizes.get("eval", 0)),
            "validation_problems": min(cfg0.eval.problems, cfg0.task.sizes.get("validation", 0)),
            "selection": selection, "chosen": chosen, "own_rates": {n: str(lr) for n, lr in own.items()},
            "teacher": teacher_rows, "rows": rows, "stages": stages,
            "bootstrap": {"wall_s": boot.get("wall_time_s"), **boot["metrics"]},
            "base_stages": " + ".join(s["stage"] for s in workflow.plan(
                load_config(base, overrides + ["workflow.stages=[]", "workflow.baseline=false"]), storage.join(root, "base"))),
            "params": {"teacher": boot["metrics"].get("teacher.params"), "student": boot["metrics"].get("student.params")}}


def base_models(base: str, overrides: list[str], root: str) -> tuple[dict, bool, str, str]:
    """The base models every seed shares, like a pretrained checkpoint: the preset's setup stages (``bootstrap``,
    or ``import`` and ``prune`` for a real checkpoint) run once at seed 0. Returns (their metrics in one
    manifest-like dict, whether all were already published, the base teacher URI, the base student URI)."""
    cfg = load_config(base, overrides + ["seed=0", "workflow.stages=[]", "workflow.baseline=false"])
    merged, reused, wall = {}, True, 0.0
    for step in workflow.plan(cfg, root):  # with no workflow stage planned, only the setup stages remain
        manifest, skipped = workflow.run_stage(cfg, root, step["stage"], step["inputs"])
        merged |= manifest["metrics"]
        reused &= skipped
        wall += manifest.get("wall_time_s") or 0.0
    return ({"metrics": merged, "wall_time_s": wall, "stages": len(workflow.plan(cfg, root))}, reused,
            workflow.base_uri(cfg, root, "teacher"), workflow.base_uri(cfg, root, "student"))


def next_lr(lr: float, up: bool) -> float:
    """The next value of the 1-3-10 grid above or below ``lr`` (1e-3 -> 3e-3 -> 1e-2; 1e-4 -> 3e-5)."""
    one = round(lr / 10 ** math.floor(math.log10(lr))) == 1
    return float(f"{lr * (3 if one else 10 / 3) if up else lr / (10 / 3 if one else 3):.3g}")


def choose(jobs: dict, make, val, max_extend: int = 2) -> tuple[dict, float, list]:
    """Best value of a sweep by validation score; a best value at an edge of the grid is no optimum, so
    the grid is extended beyond that edge (``make(value)`` runs one more point), at most ``max_extend``
    times. Returns (values -> score, chosen value, the values added). ``jobs`` gains the added points."""
    scores = {v: val(j) for v, j in jobs.items()}
    added = []
    best = max(scores, key=scores.get)  # a tie keeps the value listed first: the grid's, before any extension
    for _ in range(max_extend):
        if len(scores) < 3 or min(scores) < best < max(scores):
            break
        nxt = next_lr(best, up=best == max(scores))
        jobs[nxt] = make(nxt)
        scores[nxt] = val(jobs[nxt])
        added.append(nxt)
        best = max(scores, key=scores.get)
    return dict(sorted(scores.items())), best, added


def arm_key(name: str) -> str:
    """An arm's name as a command-line word: "no warmup (no 2a)" -> no-warmup-no-2a."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def aggregate(rows: list[dict], key: str) -> tuple[float, float, int]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


PAPER = {"full": "79.3", "raw teacher (no 1)": "-7.8", "no warmup (no 2a)": "-1.7", "no on-policy (no 2b)": "-3.3",
         "direct GRPO": "75.9 (-3.4)"}
EQUAL_TOKENS = ("full", EQ_NO2B, EQ_WARM, "direct GRPO")  # the second table: arms at (about) the full arm's teacher tokens


def summary(result: dict) -> list[dict]:
    """Per arm: mean ± std of each metric over seeds, and the paired difference to the full arm (95% t-interval)."""
    k = result["k"]
    names = list(dict.fromkeys(r["arm"] for r in result["rows"]))
    full = {r["seed"]: r[f"avg@{k}"] for r in result["rows"] if r["arm"] == "full"}
    out = []
    for name in names:
        rs = sorted((r for r in result["rows"] if r["arm"] == name), key=lambda r: r["seed"])
        s = {"arm": name, "n": len(rs)}
        for key in (f"avg@{k}", f"pass@{k}", "greedy", "c2_final", "student_wall_s", "teacher_tokens",
                    "c2_after_kl_warmup", "c2_after_onpolicy_distill", "warmup_steps"):
            s[key] = aggregate(rs, key)[:2]
        s["student_steps"] = rs[0]["student_steps"]
        s["labeled_student"] = rs[0]["labeled_student"]
        s["per_seed"] = [r[f"avg@{k}"] for r in rs]
        both = [r for r in rs if r["seed"] in full]
        s["vs_full"] = None if name == "full" else paired([r[f"avg@{k}"] for r in both], [full[r["seed"]] for r in both])
        out.append(s)
    return out


def _f(ms, nd=3):
    m, s = ms
    return "-" if math.isnan(m) else f"{m:.{nd}f} ± {s:.{nd}f}"


def _delta(r) -> tuple[str, str]:
    d = r.get("vs_full")
    if not d:
        return "", ""
    if math.isnan(d["lo"]):
        return f"{d['mean']:+.3f}", "-"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", ("**resolved**" if d["resolved"] else "within noise")


def _reused(result: dict) -> str:
    st = result.get("stages") or {}
    if not st.get("reused"):
        return ""
    return (f" ({st['reused']} of {st['reused'] + st['run']} stage runs were already published under the root and reused: "
            "the wall time is not a from-scratch time)")


def _count(n) -> str:
    return "?" if n is None else f"{n:,}"  # base models given as paths: their stage metrics are not at hand


def render(result: dict) -> str:
    k = result["k"]
    rows = summary(result)
    t = result["teacher"]
    lab_t = t[0]["labeled"] if t else 0
    m = result["machine"]
    lines = [
        f"# The paper's table in miniature ({result['preset']})",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}. Machine: {m['cpu']} ({m['cores']} cores, torch kernels {m.get('cpu_capability')}), "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. Git: {m['git']}. "
        f"One torch thread per process, {result['wall_s'] / 60:.1f} min wall{_reused(result)}.  ",
        f"Seeds {result['seeds']}; avg@{k} on {result['eval_problems']} held-out eval problems (k = {k} samples each); "
        + (f"learning rates chosen on {result['validation_problems']} validation problems (seed {result['seeds'][0]}); "
           if result.get("selection") else "learning rates given, not chosen here (--sweep none); ")
        + f"teacher {_count(result['params']['teacher'])} parameters, student {_count(result['params']['student'])}.",
        "",
        f"Base models ({result.get('base_stages') or 'given as paths'}, shared by all seeds): teacher avg@{k} {result['bootstrap'].get(f'teacher.eval.avg@{k}', float('nan')):.3f}, "  # noqa: E501
        f"student {result['bootstrap'].get(f'student.eval.avg@{k}', float('nan')):.3f}. "
        f"Stage 1 ({lab_t} labeled examples): teacher avg@{k} "
        + ", ".join(f"seed {r['seed']}: {r['before']:.3f} -> {r['after']:.3f}" for r in t)
        + " (C1).",
        "",
        "## Selection (validation split, first seed; never the eval split)",
        "",
        "| what | avg@%d on validation per value | chosen |" % k,
        "|---|---|---|",
    ]
    if not result.get("selection"):  # --sweep none: no selection section, the rates in force instead
        given = ", ".join(f"`{o}`" for o in result["overrides"] if "lr=" in o) or "the preset's"
        lines[-4:] = [f"Learning rates (given): {given}.", ""]
    for sel in result.get("selection", []):
        ext = f" (grid extended past its edge: {', '.join(f'{v:g}' for v in sel['extended'])})" if sel.get("extended") else ""
        lines.append(
            f"| {sel['what']} | "
            + ", ".join(f"{v:g}: {x:.3f}" for v, x in sel["values"].items())
            + f"{ext} | {sel['chosen']:g} |"
        )
    if result.get("selection"):
        in_force = result.get("chosen") or [o for o in result["overrides"] if "lr=" in o]
        own = result.get("own_rates") or {}
        lines += [
            "",
            "Every arm of every seed runs at " + (", ".join(f"`{c}`" for c in in_force) or "the preset's rates")
            + (f"; 2a/2b at each arm's own chosen rate ({', '.join(f'{n}: {v}' for n, v in own.items())})" if own else "")
            + ".",
            "",
        ]

    def table(title: str, names) -> list[str]:
        out = [
            f"## {title}",
            "",
            f"| arm | avg@{k} mean ± std | Δ vs full, paired [95% CI] | ordering | paper (MATH) | per seed | pass@{k} | C2 final "
            "| C2 after 2a | C2 after 2b | 2a steps | student steps | labeled (student) | teacher tokens | student wall s |",
            "|" + "---|" * 15,
        ]
        for r in rows:
            if r["arm"] not in names:
                continue
            delta, res = _delta(r)
            out.append(f"| {r['arm']} | {_f(r[f'avg@{k}'])} | {delta} | {res} | {PAPER.get(r['arm'], '')} | "
                       f"{', '.join(f'{v:.3f}' for v in r['per_seed'])} | {_f(r[f'pass@{k}'])} | {_f(r['c2_final'])} | "
                       f"{_f(r['c2_after_kl_warmup'])} | {_f(r['c2_after_onpolicy_distill'])} | {_f(r['warmup_steps'], 1)} | "
                       f"{r['student_steps']} | "
                       f"{r['labeled_student']} | {_f(r['teacher_tokens'], 0)} | {_f(r['student_wall_s'], 0)} |")
        return out + [""]

    all_names = [r["arm"] for r in rows]
    lines += table("Equal student steps", [n for n in all_names if n not in (EQ_NO2B, EQ_WARM)])
    if len(set(all_names) & set(EQUAL_TOKENS)) > 1:
        lines += table("Equal teacher tokens (about the full arm's)", [n for n in all_names if n in EQUAL_TOKENS])
    lines += ["Δ vs full: mean over seeds of (arm - full) on the same seed, with a 95% t-interval over seeds; "
              "**resolved** when the interval excludes 0, else within noise.",
              "Teacher tokens: completion tokens the teacher generated and scored (2a: 2 per token) or scored (2b).",
              "Labeled examples: stage 1 uses the `teacher_rl` split for the teacher; arms with stage 3 add the "
              "`student_rl` split; direct GRPO draws from both splits. Stages 2a/2b see prompts only.",
              "C2 = KL(student || teacher) per completion token on student rollouts, against the seed's RL'd teacher."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    rows = summary(result)
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    names = [r["arm"] for r in rows]
    colors = ["tab:green" if n.startswith("full") else "tab:red" if n == "direct GRPO" else "tab:gray" for n in names]
    ax = axes[0]
    ax.bar(range(len(rows)), [r[f"avg@{k}"][0] for r in rows], yerr=[r[f"avg@{k}"][1] for r in rows], color=colors, capsize=3)
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["per_seed"]), r["per_seed"], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7)
    ax.set_title(f"student avg@{k} (mean ± std, dots: seeds)")
    ax = axes[1]
    diffs = [r for r in rows if r.get("vs_full") and not math.isnan(r["vs_full"]["lo"])]
    ax.errorbar(
        [r["vs_full"]["mean"] for r in diffs],
        range(len(diffs)),
        fmt="o",
        xerr=[
            [r["vs_full"]["mean"] - r["vs_full"]["lo"] for r in diffs],
            [r["vs_full"]["hi"] - r["vs_full"]["mean"] for r in diffs],
        ],
        capsize=3,
    )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(diffs)), [r["arm"] for r in diffs], fontsize=7)
    ax.set_title("arm - full, paired over seeds (95% CI)")
    ax = axes[2]
    for r, c in zip(rows, colors):
        ax.errorbar(r["teacher_tokens"][0], r[f"avg@{k}"][0], yerr=r[f"avg@{k}"][1], fmt="o", color=c, capsize=3)
        ax.annotate(r["arm"], (r["teacher_tokens"][0], r[f"avg@{k}"][0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("teacher tokens (generated + scored)")
    ax.set_title(f"avg@{k} against teacher compute")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Sparse-to-dense in miniature ({result['preset']}, seeds {result['seeds']}, {result['eval_problems']} eval problems)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mechanism_points(result: dict) -> list[dict]:
    """Per digit count: the 2b gain (full - no 2b; full - warmup-only at equal teacher tokens), paired over seeds."""
    pts = []
    for m in result["mechanism"]:
        sm = {r["arm"]: r for r in summary(m)}
        pts.append({"digits": m["digits"], "full": sm["full"][f"avg@{m['k']}"],
                    "teacher": [t["after"] for t in m["teacher"]],
                    "vs_no2b": _neg(sm["no on-policy (no 2b)"]["vs_full"]), "vs_warm_eq": _neg(sm[EQ_WARM]["vs_full"]),
                    "no2b": sm["no on-policy (no 2b)"][f"avg@{m['k']}"], "warm_eq": sm[EQ_WARM][f"avg@{m['k']}"]})
    return pts


def _neg(d: dict) -> dict:
    """full - arm, from arm - full."""
    return d | {"mean": -d["mean"] + 0.0, "lo": -d["hi"] + 0.0, "hi": -d["lo"] + 0.0}  # + 0.0: no "-0.000"


def render_mechanism(result: dict) -> str:
    k = result["mechanism"][0]["k"]
    m = result["machine"]
    lines = [
        "# The mechanism: does on-policy distillation (2b) gain more as traces get longer?",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}. Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}. Git: {m['git']}. "
        f"{result['wall_s'] / 60:.1f} min wall. Seeds {result['seeds']}; learning rates: "
        + (", ".join(f"`{o}`" for o in result["overrides"] if ".lr=" in o) or "the preset's")
        + " (set them to what the table's validation sweep chose; no selection here).",
        "",
        "A task of d digits has a d-column worked trace (~10 tokens a column). 2b gain = full - arm on the same seed, "
        "95% t-interval over seeds.",
        "",
        f"| digits | teacher after stage 1 | full avg@{k} | no 2b | warmup only, = teacher tokens | 2b gain vs no 2b | 2b gain vs warmup only (= tokens) |",  # noqa: E501
        "|---|---|---|---|---|---|---|",
    ]
    for p in mechanism_points(result):
        g = lambda d: f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" + (" **resolved**" if d["resolved"] else "")  # noqa: E731
        lines.append(
            f"| {p['digits']} | {statistics.mean(p['teacher']):.3f} | {_f(p['full'])} | {_f(p['no2b'])} | {_f(p['warm_eq'])} | "
            f"{g(p['vs_no2b'])} | {g(p['vs_warm_eq'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_mechanism(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = mechanism_points(result)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label, dx in (("vs_no2b", "full - no 2b (equal student steps)", -0.05),
                           ("vs_warm_eq", "full - warmup only (equal teacher tokens)", 0.05)):
        xs = [p["digits"] + dx for p in pts]
        ys = [p[key]["mean"] for p in pts]
        err = [[p[key]["mean"] - p[key]["lo"] for p in pts], [p[key]["hi"] - p[key]["mean"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("digits (trace length grows ~10 tokens a digit)")
    ax.set_ylabel(f"2b gain in avg@{result['mechanism'][0]['k']} (95% CI over seeds)")
    ax.set_xticks([p["digits"] for p in pts])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("On-policy distillation's gain against trace length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_mlflow(result: dict, stem: Path) -> None:
    """One MLflow run in experiment ``s2d-bench`` (tracking URI from the environment)."""
    import mlflow

    mlflow.set_experiment("s2d-bench")
    with mlflow.start_run(run_name=stem.name):
        mlflow.log_params({"preset": result["preset"], "seeds": ",".join(map(str, result["seeds"])),
                           **{c.split("=")[0]: c.split("=")[1] for c in result.get("chosen", [])}})
        for r in summary(result) if "rows" in result else []:
            k = result["k"]
            key = _slug(r["arm"]).replace("-s-", "-")
            mlflow.log_metrics({f"{key}.avg_at_{k}.mean": r[f"avg@{k}"][0], f"{key}.avg_at_{k}.std": r[f"avg@{k}"][1],
                                f"{key}.c2_final.mean": r["c2_final"][0]})
        mlflow.log_metric("wall_s", result["wall_s"])
        for suffix in (".md", ".png", ".json"):
            mlflow.log_artifact(str(stem.with_suffix(suffix)))


if __name__ == "__main__":
    sys.exit(main())
