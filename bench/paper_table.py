"""The paper's table in miniature: every arm of the sparse-to-dense ablation, several seeds.

    python bench/paper_table.py --preset cpu                 # <= 30 min on 2 CPU cores
    python bench/paper_table.py --preset gpu                 # one GPU (bigger models and batches)
    python bench/paper_table.py --preset cpu --seeds 0 1 2 --root runs/bench-paper --out bench/results

Arms (equal student update steps; the labeled examples each arm consumed are in the table):

    full                stage 1 teacher -> 2a warmup -> 2b on-policy distill (sampled-token) -> 3 student GRPO
    full, 2b full-vocab the same with the full-vocabulary reverse-KL form of 2b
    raw teacher         no stage 1: 2a/2b use the base teacher               (paper: -7.8 MATH)
    no warmup           no 2a: its steps go to 2b                            (paper: -1.7)
    no on-policy 2b     no 2b: its steps go to 2a                            (paper: -3.3)
    warmup only         control: 2a for the whole student budget, no RL, no on-policy data
    teacher-sample SFT  control: sequence-level fine-tuning on teacher samples for the whole budget
    direct GRPO         the baseline, learning-rate sweep on seed 0; the best is run on every seed

The base models (the bootstrap: the stand-in for pretraining) are shared by all seeds, like a
pretrained checkpoint; stage 1 and everything after run once per seed. Every stage is the real
stage code (``stages.workflow.run_stage``); artifacts land under ``--root`` and a rerun skips what
is published. Results: ``<out>/paper_table_<preset>.{md,png,json}`` and one MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import artifacts, workflow  # noqa: E402
from stages.config import ConfigError, load_config  # noqa: E402

WARM, DISTILL, RL = "kl_warmup", "onpolicy_distill", "student_rl"


def arms(cfg) -> dict[str, dict]:
    """Arm name -> (teacher: 'rl'|'base', stages, overrides). Every arm gets the same student steps."""
    w, d, r = cfg.kl_warmup.steps, cfg.onpolicy_distill.steps, cfg.student_rl.steps
    budget = w + d + r
    out = {
        "full": {"teacher": "rl", "stages": [WARM, DISTILL, RL], "set": []},
        "full, 2b full-vocab": {"teacher": "rl", "stages": [WARM, DISTILL, RL], "set": ["onpolicy_distill.form=full"]},
        "raw teacher (no 1)": {"teacher": "base", "stages": [WARM, DISTILL, RL], "set": []},
        "no warmup (no 2a)": {"teacher": "rl", "stages": [DISTILL, RL], "set": [f"onpolicy_distill.steps={w + d}"]},
        "no on-policy (no 2b)": {"teacher": "rl", "stages": [WARM, RL], "set": [f"kl_warmup.steps={w + d}"]},
        "warmup only": {"teacher": "rl", "stages": [WARM], "set": [f"kl_warmup.steps={budget}"]},
        "teacher-sample SFT": {"teacher": "rl", "stages": [WARM], "set": [f"kl_warmup.steps={budget}", "kl_warmup.form=seq_sft"]},
    }
    return out


def direct(lr: float, budget: int) -> dict:
    return {"teacher": "rl", "stages": [], "lr": lr, "direct": True, "set": ["workflow.baseline=true", f"direct_grpo.steps={budget}",
                                                    f"direct_grpo.optim.lr={lr}"]}


def run_arm(base: str, overrides: list[str], root: str, teacher: str, student: str, arm: dict) -> dict:
    """Run one arm's stages (skipping published ones); return its manifests and config."""
    cfg = load_config(base, overrides + arm["set"] + [
        f"models.teacher.source={teacher}", f"models.student.source={student}",
        f"workflow.stages=[{','.join(arm['stages'])}]", f"workflow.baseline={'true' if arm.get('direct') else 'false'}"])
    results = {}
    for step in workflow.plan(cfg, root):
        manifest, _ = workflow.run_stage(cfg, root, step["stage"], step["inputs"])
        results[step["stage"]] = manifest
    return {"cfg": cfg, "results": results}


def run_arm_summary(*a) -> dict:
    """run_arm for a worker process: only the (picklable) manifests come back."""
    return run_arm(*a)["results"]


def arm_job(base, overrides, arm_root, teacher, student, arm, name, seed, k, rl_teacher) -> dict:
    """One arm of one seed, in a worker: its stages, its table row, and its final C2 against the RL teacher."""
    out = run_arm(base, overrides, arm_root, teacher, student, arm)
    row = arm_row(name, out, arm_root, k) | {"seed": seed}
    row["c2_final"] = c2_of(base, overrides, arm_root, rl_teacher, row["final_model"])
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

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))


def stage_tokens(stage_uri: str, per_step: int) -> float:
    """Completion tokens a stage's rollouts had (sum over steps of completion_len x samples)."""
    raw = artifacts.store_for(stage_uri).read_bytes(artifacts.join(stage_uri, "metrics.jsonl"))
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
        t_tok += 2 * stage_tokens(artifacts.join(root, WARM), cfg.kl_warmup.prompts_per_step)
    if DISTILL in res:
        t_tok += stage_tokens(artifacts.join(root, DISTILL), cfg.onpolicy_distill.prompts_per_step)
    row["teacher_tokens"] = t_tok
    for s in (WARM, DISTILL):
        if s in res:
            row[f"c2_before_{s}"] = res[s]["metrics"].get("c2_before")
            row[f"c2_after_{s}"] = res[s]["metrics"].get("c2_after")
    row["final_model"] = last["outputs"]["model"]
    return row


def c2_of(base: str, overrides: list[str], root: str, teacher: str, student_uri: str) -> float:
    """KL(student || teacher) per token of a final model against the seed's RL teacher (same draws everywhere)."""
    from stages.runtime import StageRun
    from stages.scoring import student_teacher_kl

    cfg = load_config(base, overrides)
    run = StageRun("c2", cfg, root)  # publishes nothing: only its loading and sampling are used
    try:
        t, s, tok = run.load_teacher_student(teacher, student_uri)
        return student_teacher_kl(run.rollouts, s, t, tok, run.task.problems("prompts"), label="c2-final")
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="bench/configs/paper-<preset>.yaml or a YAML path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="direct-GRPO sweep (seed 0)")
    p.add_argument("--root", default=None, help="artifact root (default runs/bench-paper-<preset>)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--workers", type=int, default=2, help="arms run side by side in this many processes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    base = args.preset if args.preset.endswith((".yaml", ".yml")) else str(REPO / "bench" / "configs" / f"paper-{args.preset}.yaml")
    try:
        cfg0 = load_config(base, args.overrides)  # a bad config fails here, before any training
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = args.root or str(REPO / "runs" / f"bench-paper-{cfg0.name}")
    k = cfg0.eval.samples
    t_start = time.perf_counter()

    # the base models: one bootstrap, shared by every seed (the stand-in for a pretrained checkpoint)
    boot_root = artifacts.join(root, "base")
    boot_cfg = load_config(base, args.overrides + ["seed=0"])
    boot, _ = workflow.run_stage(boot_cfg, boot_root, "bootstrap", {})
    base_t, base_s = boot["outputs"]["teacher"], boot["outputs"]["student"]
    log = {"bootstrap": {"wall_s": boot.get("wall_time_s"), **boot["metrics"]}}
    print(f"[base] teacher avg@{k} {boot['metrics'][f'teacher.eval.avg@{k}']:.3f}  student {boot['metrics'][f'student.eval.avg@{k}']:.3f}", flush=True)

    # workers: arms are independent once stage 1 has run; on a small CPU, processes with one torch thread
    # each beat one process with many threads (tiny matmuls), so arms run side by side
    ov_par = ["torch_threads=1"] if args.workers > 1 else []
    pool = _pool(args.workers)
    seeds = args.seeds
    # stage 1 once per seed; every arm with an RL'd teacher reads it
    t_arm = {"teacher": "base", "stages": ["teacher_rl"], "set": []}
    t_jobs = [pool.submit(run_arm_summary, base, args.overrides + ov_par + [f"seed={s}"],
                          artifacts.join(root, f"seed{s}", "teacher"), base_t, base_s, t_arm) for s in seeds]
    teacher_rows, rl_teacher = [], {}
    for s, job in zip(seeds, t_jobs):
        tm = job.result()["teacher_rl"]
        rl_teacher[s] = tm["outputs"]["model"]
        teacher_rows.append({"seed": s, "before": tm["metrics"][f"eval_before.avg@{k}"], "after": tm["metrics"][f"eval.avg@{k}"],
                             "wall_s": tm["wall_time_s"], "labeled": tm["labeled_examples"]})
        print(f"[seed {s}] C1 teacher avg@{k} {teacher_rows[-1]['before']:.3f} -> {teacher_rows[-1]['after']:.3f}", flush=True)

    def submit(seed: int, name: str, arm: dict):
        sroot = artifacts.join(root, f"seed{seed}")
        arm_root = artifacts.join(sroot, _slug(name) if not arm.get("direct") else f"direct-lr{arm['lr']:g}")
        teacher = rl_teacher[seed] if arm["teacher"] == "rl" else base_t
        return pool.submit(arm_job, base, args.overrides + ov_par + [f"seed={seed}"], arm_root, teacher, base_s, arm,
                           name, seed, k, rl_teacher[seed])

    budget = cfg0.student_step_budget()
    # the baseline's learning-rate sweep on the first seed, side by side with every other arm
    sweep_jobs = {lr: submit(seeds[0], "direct GRPO", direct(lr, budget)) for lr in args.lrs}
    jobs = [submit(s, name, arm) for s in seeds for name, arm in arms(cfg0).items()]
    sweep_rows = {lr: j.result() for lr, j in sweep_jobs.items()}
    sweep = {lr: r[f"avg@{k}"] for lr, r in sweep_rows.items()}
    best_lr = max(sweep, key=sweep.get)
    print("[sweep] direct GRPO " + ", ".join(f"lr {lr:g}: {v:.3f}" for lr, v in sweep.items()) + f" -> {best_lr:g}", flush=True)
    jobs += [submit(s, "direct GRPO", direct(best_lr, budget)) for s in seeds[1:]]
    rows = [sweep_rows[best_lr]] + [j.result() for j in jobs]
    for seed in seeds:
        # the base student, for reference (no training; C2 against the same RL teacher)
        rows.append({"arm": "base student (no training)", "seed": seed, f"avg@{k}": boot["metrics"][f"student.eval.avg@{k}"],
                     f"pass@{k}": boot["metrics"].get(f"student.eval.pass@{k}"), "greedy": boot["metrics"].get("student.eval.greedy"),
                     "student_steps": 0, "labeled_student": 0, "student_wall_s": 0.0, "teacher_tokens": 0.0,
                     "c2_final": c2_of(base, args.overrides + [f"seed={seed}"], artifacts.join(root, f"seed{seed}", "teacher"),
                                       rl_teacher[seed], base_s)})
    pool.shutdown()

    wall = time.perf_counter() - t_start
    result = {"preset": cfg0.name, "config": base, "overrides": args.overrides, "seeds": args.seeds, "k": k,
              "eval_problems": cfg0.eval.problems, "best_direct_lr": best_lr, "lr_sweep_seed0": sweep,
              "teacher": teacher_rows, "rows": rows, "wall_s": wall, "log": log, "machine": machine(),
              "command": " ".join(["python", "bench/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "params": {"teacher": boot["metrics"].get("teacher.params"), "student": boot["metrics"].get("student.params")}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"paper_table_{cfg0.name}"
    (stem.with_suffix(".json")).write_text(json.dumps(result, indent=2, default=str))
    md = render(result)
    stem.with_suffix(".md").write_text(md)
    plot(result, stem.with_suffix(".png"))
    log_mlflow(result, stem)
    print(md)
    return 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def aggregate(rows: list[dict], key: str) -> tuple[float, float, int]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


ORDER = ["full", "full, 2b full-vocab", "raw teacher (no 1)", "no warmup (no 2a)", "no on-policy (no 2b)",
         "warmup only", "teacher-sample SFT", "direct GRPO", "base student (no training)"]
PAPER = {"full": "79.3", "raw teacher (no 1)": "-7.8", "no warmup (no 2a)": "-1.7", "no on-policy (no 2b)": "-3.3",
         "direct GRPO": "75.9 (-3.4)"}


def summary(result: dict) -> list[dict]:
    k = result["k"]
    out = []
    for name in ORDER:
        rs = [r for r in result["rows"] if r["arm"] == name]
        if not rs:
            continue
        s = {"arm": name, "n": len(rs)}
        for key in (f"avg@{k}", f"pass@{k}", "greedy", "c2_final", "student_wall_s", "teacher_tokens",
                    "c2_after_kl_warmup", "c2_after_onpolicy_distill"):
            s[key] = aggregate(rs, key)[:2]
        s["student_steps"] = rs[0]["student_steps"]
        s["labeled_student"] = rs[0]["labeled_student"]
        s["per_seed"] = [r[f"avg@{k}"] for r in rs]
        out.append(s)
    return out


def render(result: dict) -> str:
    k = result["k"]
    rows = summary(result)
    full = next((r for r in rows if r["arm"] == "full"), None)
    t = result["teacher"]
    lab_t = t[0]["labeled"] if t else 0
    lines = [
        f"# The paper's table in miniature ({result['preset']})", "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}. Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"Python {result['machine']['python']}, torch {result['machine']['torch']}, transformers {result['machine']['transformers']}. "
        f"Git: {result['machine']['git']}.  ",
        f"Seeds {result['seeds']}; avg@{k} on {result['eval_problems']} held-out problems (k = {k} samples each); "
        f"teacher {result['params']['teacher']:,} parameters, student {result['params']['student']:,}. "
        f"Total wall time {result['wall_s'] / 60:.1f} min.", "",
        f"Stage 1 (shared by every arm with an RL'd teacher; {lab_t} labeled examples): teacher avg@{k} "
        + ", ".join(f"seed {r['seed']}: {r['before']:.3f} -> {r['after']:.3f} ({r['wall_s']:.0f} s)" for r in t) + " (C1).", "",
        f"| arm | avg@{k} mean ± std | Δ vs full | paper (MATH) | per seed | pass@{k} | greedy | C2 final | C2 after 2a | C2 after 2b "
        "| student steps | labeled (student) | student wall s | teacher tokens |",
        "|" + "---|" * 14,
    ]

    def f(ms, nd=3):
        m, s = ms
        return "-" if math.isnan(m) else f"{m:.{nd}f} ± {s:.{nd}f}"

    for r in rows:
        delta = "" if full is None or r["arm"] == "full" else f"{r[f'avg@{k}'][0] - full[f'avg@{k}'][0]:+.3f}"
        lines.append(f"| {r['arm']} | {f(r[f'avg@{k}'])} | {delta} | {PAPER.get(r['arm'], '')} | "
                     f"{', '.join(f'{v:.3f}' for v in r['per_seed'])} | {f(r[f'pass@{k}'])} | {f(r['greedy'])} | "
                     f"{f(r['c2_final'])} | {f(r['c2_after_kl_warmup'])} | {f(r['c2_after_onpolicy_distill'])} | "
                     f"{r['student_steps']} | {r['labeled_student']} | {f(r['student_wall_s'], 0)} | {f(r['teacher_tokens'], 0)} |")
    sweep = ", ".join(f"lr {lr}: {v:.3f}" for lr, v in result["lr_sweep_seed0"].items())
    lines += ["", f"Direct GRPO learning-rate sweep (seed {result['seeds'][0]}, avg@{k}): {sweep}; best lr "
              f"{result['best_direct_lr']} is the row above (selected on the eval set: this favours the baseline).",
              "", "Labeled examples: stage 1 uses the `teacher_rl` split for the teacher; arms with stage 3 add the "
              "`student_rl` split; direct GRPO draws from both splits. Stages 2a/2b see prompts only.",
              "C2 = KL(student || teacher) per completion token on student rollouts, against the seed's RL'd teacher."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    rows = summary(result)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    names = [r["arm"] for r in rows]
    for ax, key, title in ((axes[0], f"avg@{k}", f"student avg@{k} (mean ± std over seeds)"),
                           (axes[1], "c2_final", "C2: KL(student || RL teacher) per token")):
        means = [r[key][0] for r in rows]
        stds = [r[key][1] for r in rows]
        colors = ["tab:green" if n.startswith("full") else "tab:red" if n == "direct GRPO" else "tab:gray" for n in names]
        ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
        for i, r in enumerate(rows):
            if key == f"avg@{k}":
                ax.scatter([i] * len(r["per_seed"]), r["per_seed"], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Sparse-to-dense in miniature ({result['preset']}, seeds {result['seeds']}, {result['eval_problems']} eval problems)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "stages"], capture_output=True, text=True).stdout.strip()
        git += " (stages/ modified)" if dirty else ""
    except OSError:
        git = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "git": git,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def log_mlflow(result: dict, stem: Path) -> None:
    """One MLflow run in experiment ``s2d-bench`` (tracking URI from the environment)."""
    import mlflow

    k = result["k"]
    mlflow.set_experiment("s2d-bench")
    with mlflow.start_run(run_name=f"paper_table_{result['preset']}"):
        mlflow.log_params({"preset": result["preset"], "seeds": ",".join(map(str, result["seeds"])), "k": k,
                           "eval_problems": result["eval_problems"], "best_direct_lr": result["best_direct_lr"]})
        for r in summary(result):
            key = _slug(r["arm"])
            mlflow.log_metrics({f"{key}.avg_at_{k}.mean": r[f"avg@{k}"][0], f"{key}.avg_at_{k}.std": r[f"avg@{k}"][1],
                                f"{key}.c2_final.mean": r["c2_final"][0]})
        mlflow.log_metric("wall_s", result["wall_s"])
        for suffix in (".md", ".png", ".json"):
            mlflow.log_artifact(str(stem.with_suffix(suffix)))


if __name__ == "__main__":
    sys.exit(main())
