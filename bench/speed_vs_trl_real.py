"""Ours against TRL on the real models (issue 25 item 4): SmolLM2-135M-Instruct as the teacher, its 10-layer cut
as the student (bench/real_models.py), a 49,152-entry vocabulary, identical data, lengths, batch and optimizer.

    python bench/speed_vs_trl_real.py --repeats 3 --out bench/results              # ~1-2 h on 2 loaded cores

Sides (each a fresh process per repeat, so its peak RSS is its own; order reversed on odd repeats):

- ``ours_grpo`` / ``trl_grpo``: stage ``teacher_rl`` (``grpo.main``) vs TRL ``GRPOTrainer`` on the teacher;
- ``ours_2a`` / ``trl_gkd_2a``: stage 2a ``kl_warmup`` form ``token_kl`` (the teacher samples, full-vocabulary forward
  KL on its tokens) vs ``GKDTrainer(seq_kd=True, lmbda=0, beta=0)``, the same objective (teacher-generated
  sequences, KL(p_T || p_S) over the vocabulary);
- ``ours_2b_full`` / ``ours_2b_sampled`` / ``trl_distill_2b`` / ``trl_gkd_2b``: stage 2b ``onpolicy_distill`` forms
  ``full`` (reverse KL over the vocabulary on student samples) and ``sampled`` vs ``DistillationTrainer(beta=1)``
  (trl 1.16's on-policy distillation with its chunked full-vocabulary JSD) and ``GKDTrainer(lmbda=1, beta=1)``.

Arms are pairs of sides, each ratio taken per repeat (ours samples/s / theirs), reported min / median / max.
The mapping of every setting to TRL's is ``bench/speed_vs_trl.py``'s (same helpers: constant lr, AdamW, clip 1.0, one
optimizer step per batch, no reference model, completions exactly ``--max-new-tokens`` long on both sides, steps timed
from rollout to optimizer step). Prompts: the arithmetic task through SmolLM2's chat template on both sides
(conversational rows for TRL). Precision: ``--autocast bfloat16`` (ours ``autocast: bfloat16``, TRL ``bf16=True``:
both torch.autocast on the CPU with fp32 weights) or ``none`` (fp32 both). Only the training steps after ``--warmup``
are timed; peak RSS is the whole worker's (``ru_maxrss``: imports, both models, optimizer, every step).
Writes ``<out>/speed_vs_trl_real.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for k, v in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)

SIDES = ("ours_grpo", "trl_grpo", "ours_2a", "trl_gkd_2a", "ours_2b_full", "ours_2b_sampled", "trl_distill_2b", "trl_gkd_2b")
ARMS = {  # name: (ours, theirs, title)
    "grpo": ("ours_grpo", "trl_grpo", "GRPO step, teacher (ours teacher_rl vs TRL GRPOTrainer)"),
    "warmup_2a": (
        "ours_2a",
        "trl_gkd_2a",
        "2a forward-KL warmup on teacher samples (ours token_kl vs GKDTrainer seq_kd, beta=0)",
    ),
    "distill_2b_full": (
        "ours_2b_full",
        "trl_distill_2b",
        "2b on-policy, full-vocab reverse KL (ours form=full vs DistillationTrainer beta=1)",
    ),
    "distill_2b_full_gkd": (
        "ours_2b_full",
        "trl_gkd_2b",
        "2b on-policy, full-vocab reverse KL (ours form=full vs GKDTrainer lmbda=1, beta=1)",
    ),
    "distill_2b_sampled": ("ours_2b_sampled", "trl_distill_2b", "2b on-policy (ours form=sampled vs DistillationTrainer beta=1)"),
}


def _svt():
    """bench/speed_vs_trl.py as a module (its setup, timing hooks and TRL settings are reused)."""
    if "speed_vs_trl" in sys.modules:
        return sys.modules["speed_vs_trl"]
    spec = importlib.util.spec_from_file_location("speed_vs_trl", REPO / "bench" / "speed_vs_trl.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- worker
def workload(opts):
    """The tiny benchmark's workload on the real models: same overrides plus their folders, 2a's batch, precision."""
    import torch
    from transformers import AutoTokenizer

    from bench import real_models
    from stages.config import load_config
    from stages.runtime import StageRun

    svt = _svt()
    torch.set_num_threads(opts.threads)
    teacher, student = real_models.teacher(opts.models), real_models.student(opts.models)
    sets = svt.overrides(opts) + [
        f"models.teacher.source={teacher}", f"models.student.source={student}",
        f"kl_warmup.prompts_per_step={opts.distill_prompts}", "kl_warmup.c2_every=1000000",
        "eval.max_new_tokens=4", "eval.c2_prompts=2", f"autocast={opts.autocast}", f"logprob_chunk={opts.chunk}",
    ]
    cfg = load_config("tiny", sets)
    tmp = Path(tempfile.mkdtemp(prefix="s2d-real-"))
    n = opts.warmup + opts.steps

    def batches(stage, split, k):
        helper = StageRun(stage, cfg, str(tmp / "batches"))
        problems = helper.task.problems(split)
        out = [helper.batch_of(problems, k, s) for s in range(n)]
        shutil.rmtree(helper.work, ignore_errors=True)
        return out

    tok = AutoTokenizer.from_pretrained(str(student))
    return svt.Workload(cfg, sets, tok, str(teacher), str(student),
                        batches("teacher_rl", "teacher_rl", cfg.teacher_rl.prompts_per_step),
                        batches("onpolicy_distill", "prompts", cfg.onpolicy_distill.prompts_per_step),
                        opts.threads, opts.seed, tmp)


IN_FIT = [False]  # set while a stage's Trainer.fit runs: its rollouts are the training steps'


def _ours(w, stage: str, steps: int, sets: list[str], call) -> list:
    """One of our stages for ``steps`` steps (``speed_vs_trl._ours``, but a rollout counts when it runs inside
    ``Trainer.fit``, whoever samples: 2a's rollouts are the frozen teacher's)."""
    from stages.config import load_config
    from stages.runtime import StageRun
    from stages.trainer import Trainer

    svt = _svt()

    class FitSampler(svt.TimedSampler):
        def generate(self, model, prompts, **kw):
            if not IN_FIT[0]:
                return self.inner.generate(model, prompts, **kw)
            svt._begin()
            t0, c0 = time.perf_counter(), time.process_time()
            ro = self.inner.generate(model, prompts, **kw)
            self.calls.append({"gen_s": time.perf_counter() - t0, "gen_cpu_s": time.process_time() - c0,
                               "cpu_start": c0, "tokens": int(ro.completion.sum()), "samples": len(ro)})
            return ro

    fit = Trainer.fit

    def flagged(self, step_fn):
        IN_FIT[0] = True
        try:
            return fit(self, step_fn)
        finally:
            IN_FIT[0] = False

    Trainer.fit = flagged
    cfg = load_config("tiny", w.overrides + sets)
    root = tempfile.mkdtemp(prefix="s2d-real-ours-", dir=w.tmp)
    run = StageRun(stage, cfg, root, inputs={"teacher": w.teacher_path, "student": w.student_path})
    sampler = run.rollout_maker.sampler = FitSampler(svt.make_engine(cfg, w.tok.pad_token_id))
    clock = run.tracker = svt.StepEndClock(cfg.tracking)
    call(run, steps)
    Trainer.fit = fit
    hist = [json.loads(line) for line in (Path(root) / stage / "metrics.jsonl").read_text().splitlines()]
    assert len(sampler.calls) == len(hist) == len(clock.ends) == steps, (len(sampler.calls), len(hist), steps)
    return [svt.Step(h["step_time_s"], c["gen_s"], c["samples"], c["tokens"], end - c["cpu_start"], c["gen_cpu_s"])
            for h, c, end in zip(hist, sampler.calls, clock.ends)]


def _trl_args(w, out: str, steps: int, batch: int, optim, opts) -> dict:
    common = _svt().trl_common(w, out, steps, batch, optim)
    common["bf16"] = opts.autocast == "bfloat16"  # accelerate: torch.autocast(bf16) on the CPU, fp32 weights, as ours
    return common


def _rows(batches, conversational_key: str = "prompt") -> list[dict]:
    """The same problems as TRL rows, as one user message each (TRL applies the chat template, as ours does)."""
    rows = []
    for b in batches:
        for p in b:
            msg = [{"role": "user", "content": p.prompt}]
            # GKD's collator wants a finished conversation; its completion is regenerated every step (lmbda=1 or
            # seq_kd), so the placeholder answer is never trained on (the prompts split has no answers)
            rows.append({"prompt": msg, "answer": p.answer} if conversational_key == "prompt"
                        else {"messages": msg + [{"role": "assistant", "content": p.answer or "0"}]})
    return rows


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def trl_grpo(w, steps: int, opts) -> list:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from stages.task_contract import Problem
    from stages.tasks import make_task

    svt = _svt()
    verifier = make_task(w.cfg.task)

    def reward(completions, answer, **_):
        return [verifier.reward(c[0]["content"] if isinstance(c, list) else c, Problem("", "", a))
                for c, a in zip(completions, answer)]

    g = w.cfg.teacher_rl
    ds = Dataset.from_list(_rows(w.grpo_batches[:steps]))

    def make(out):
        args = GRPOConfig(**_trl_args(w, out, steps, g.prompts_per_step * g.group_size, g.optim, opts),
                          num_generations=g.group_size, steps_per_generation=1, num_iterations=1, beta=0.0,
                          epsilon=g.clip_low, epsilon_high=g.clip_high, loss_type="dapo",
                          scale_rewards="group" if g.normalize_std else "none", mask_truncated_completions=False)
        return GRPOTrainer(model=_load(w.teacher_path), reward_funcs=reward, args=args, train_dataset=ds,
                           processing_class=copy.deepcopy(w.tok))

    return svt._run_trl(w, make, steps, g.prompts_per_step * g.group_size)


def trl_distill(w, steps: int, opts) -> list:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    svt = _svt()
    d = w.cfg.onpolicy_distill
    teacher = _load(w.teacher_path).requires_grad_(False).eval()
    ds = Dataset.from_list(_rows(w.distill_batches[:steps]))

    def make(out):
        args = DistillationConfig(**_trl_args(w, out, steps, d.prompts_per_step, d.optim, opts), beta=1.0,
                                  disable_dropout=True)
        return DistillationTrainer(model=_load(w.student_path), teacher_model=teacher, args=args, train_dataset=ds,
                                   processing_class=copy.deepcopy(w.tok))

    return svt._run_trl(w, make, steps, d.prompts_per_step)


def trl_gkd(w, steps: int, opts, on_policy: bool) -> list:
    """GKDTrainer: ``on_policy`` = 2b (lmbda=1: the student samples; beta=1: reverse KL); else 2a (seq_kd: the
    teacher samples; lmbda=0, beta=0: forward KL). Its loss takes both models' full [B, L, V] logits."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    svt = _svt()
    d = w.cfg.onpolicy_distill
    common = _trl_args(w, "", steps, d.prompts_per_step, d.optim, opts)
    keep = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
            "max_grad_norm", "optim", "lr_scheduler_type", "warmup_steps", "bf16", "fp16", "gradient_checkpointing",
            "use_cpu", "seed", "report_to", "logging_steps", "save_strategy", "eval_strategy", "disable_tqdm",
            "dataloader_num_workers", "remove_unused_columns")
    out = tempfile.mkdtemp(prefix="s2d-real-gkd-", dir=w.tmp)
    args = GKDConfig(output_dir=out, **{k: common[k] for k in keep}, temperature=w.cfg.sampling.temperature,
                     lmbda=1.0 if on_policy else 0.0, beta=1.0 if on_policy else 0.0, seq_kd=not on_policy,
                     max_new_tokens=w.N, disable_dropout=True, shuffle_dataset=False)
    teacher = _load(w.teacher_path).requires_grad_(False).eval()
    ds = Dataset.from_list(_rows(w.distill_batches[:steps], "messages"))
    trainer = GKDTrainer(model=_load(w.student_path), teacher_model=teacher, args=args, train_dataset=ds,
                         processing_class=copy.deepcopy(w.tok))
    trainer.generation_config.min_new_tokens = trainer.generation_kwargs["min_new_tokens"] = w.N  # exactly N tokens
    trainer.remove_callback(PrinterCallback)
    clock = svt._StepClock()
    trainer.add_callback(clock)
    gen, tokens = [], []
    real = trainer.generate_on_policy_outputs

    def timed(model, inputs, generation_config):
        t0, c0 = time.perf_counter(), time.process_time()
        ids, attn, labels = real(model, inputs, generation_config)
        gen.append((time.perf_counter() - t0, time.process_time() - c0))
        tokens.append(int((labels != -100).sum()))
        return ids, attn, labels

    trainer.generate_on_policy_outputs = timed
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    assert len(clock.steps) == len(gen) == steps, (len(clock.steps), len(gen), steps)
    return [svt.Step(s, g, d.prompts_per_step, t, cs, gc) for (s, cs), (g, gc), t in zip(clock.steps, gen, tokens)]


def run_side(side: str, w, steps: int, opts) -> list:
    from stages.recipes import grpo, kl_warmup, onpolicy_distill

    if side == "ours_grpo":
        return _ours(
            w, "teacher_rl", steps, [f"teacher_rl.steps={steps}"], lambda run, n: grpo.main(run, w.teacher_path, steps=n)
        )
    if side == "ours_2a":
        return _ours(w, "kl_warmup", steps, [f"kl_warmup.steps={steps}", "kl_warmup.form=token_kl"],
                     lambda run, n: kl_warmup.main(run, w.teacher_path, w.student_path))
    if side in ("ours_2b_full", "ours_2b_sampled"):
        form = side.rsplit("_", 1)[1]
        return _ours(w, "onpolicy_distill", steps, [f"onpolicy_distill.steps={steps}", f"onpolicy_distill.form={form}"],
                     lambda run, n: onpolicy_distill.main(run, w.teacher_path, w.student_path))
    if side == "trl_grpo":
        return trl_grpo(w, steps, opts)
    if side == "trl_distill_2b":
        return trl_distill(w, steps, opts)
    if side in ("trl_gkd_2a", "trl_gkd_2b"):
        return trl_gkd(w, steps, opts, on_policy=side.endswith("2b"))
    raise ValueError(side)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(opts) -> int:
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    svt = _svt()
    w = workload(opts)
    rss0 = _rss_mb()
    prof = None
    if opts.profile:
        class Late(svt.StepProfile):  # profile the last step only
            def __init__(self, skip):
                super().__init__()
                self.skip = skip

            def begin(self):
                if self.skip > 0:
                    self.skip -= 1
                    return
                super().begin()

        prof = svt.PROFILE = Late(opts.warmup + opts.steps - 1)
    steps = run_side(opts.worker, w, opts.warmup + opts.steps, opts)[opts.warmup :]
    shutil.rmtree(w.tmp, ignore_errors=True)
    out = {"side": opts.worker, "steps": [s.__dict__ for s in steps], "rss_after_setup_mb": rss0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if prof is not None and prof.done:
        out["profile"] = svt.op_breakdown(prof)
    Path(opts.result).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------- parent
def side_run(opts, side: str, profile: bool = False) -> dict:
    res = Path(tempfile.mkstemp(prefix=f"s2d-real-{side}-", suffix=".json")[1])
    cmd = (
        [sys.executable, __file__, "--worker", side, "--result", str(res)]
        + _pass_through(opts)
        + (["--profile"] if profile else [])
    )
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(res.read_text())
    res.unlink()
    out["process_wall_s"] = time.time() - t0
    out["load_avg"] = os.getloadavg()
    return out


def _pass_through(opts) -> list[str]:
    return ["--models", str(opts.models), "--threads", str(opts.threads), "--steps", str(opts.steps), "--warmup",
            str(opts.warmup), "--seed", str(opts.seed), "--max-new-tokens", str(opts.max_new_tokens), "--group-size",
            str(opts.group_size), "--grpo-prompts", str(opts.grpo_prompts), "--distill-prompts", str(opts.distill_prompts),
            "--autocast", opts.autocast, "--chunk", str(opts.chunk)]


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.worker:
        return worker(opts)
    from bench._common import machine

    svt = _svt()
    arms = {k: v for k, v in ARMS.items() if not opts.arms or k in opts.arms}
    sides = [s for s in SIDES if any(s in v[:2] for v in arms.values())]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    t0, load0 = time.time(), os.getloadavg()
    for r in range(opts.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            runs[side].append(side_run(opts, side))
            s = svt.summarize_side([svt.Step(**x) for x in runs[side][-1]["steps"]])
            print(f"repeat {r + 1} {side}: {s['samples_per_s']:.3f} samples/s, peak RSS {runs[side][-1]['peak_rss_mb']:.0f} MB, "
                  f"load {os.getloadavg()[0]:.1f} ({time.time() - t0:.0f} s)", flush=True)
    profiles = {s: side_run(opts, s, profile=True).get("profile") for s in opts.profile_sides}
    res = {"arms": {}, "sides": {}, "profiles": profiles,
           "meta": {"command": "python bench/speed_vs_trl_real.py " + " ".join(opts.argv), "machine": machine(),
                    "trl": svt._version("trl"), "threads": opts.threads, "load_avg_before": load0,
                    "load_avg_after": os.getloadavg(), "wall_s": round(time.time() - t0), "repeats": opts.repeats,
                    "steps": opts.steps, "warmup": opts.warmup, "autocast": opts.autocast, "chunk": opts.chunk,
                    "work": {"max_new_tokens": opts.max_new_tokens, "grpo": f"{opts.grpo_prompts} prompts x {opts.group_size}",
                             "distill_prompts": opts.distill_prompts}}}
    for side, rs in runs.items():
        summ = [svt.summarize_side([svt.Step(**x) for x in r["steps"]]) for r in rs]
        res["sides"][side] = {"samples_per_s": [x["samples_per_s"] for x in summ],
                              "samples_per_cpu_s": [x["samples_per_cpu_s"] for x in summ],
                              "gen_s_per_step": [x["gen_s_per_step"] for x in summ],
                              "train_s_per_step": [x["train_s_per_step"] for x in summ],
                              "peak_rss_mb": [r["peak_rss_mb"] for r in rs],
                              "rss_after_setup_mb": [r["rss_after_setup_mb"] for r in rs], "runs": rs}
    for name, (a, b, title) in arms.items():
        A, B = res["sides"][a], res["sides"][b]
        res["arms"][name] = {
            "title": title, "ours": a, "theirs": b,
            "ratio": svt.spread([x / y for x, y in zip(A["samples_per_s"], B["samples_per_s"])]),
            "cpu_ratio": svt.spread([x / y for x, y in zip(A["samples_per_cpu_s"], B["samples_per_cpu_s"])]),
            "rss_ratio": svt.spread([x / y for x, y in zip(A["peak_rss_mb"], B["peak_rss_mb"])]),
        }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "speed_vs_trl_real.json").write_text(json.dumps(res, indent=1))
    (opts.out / "speed_vs_trl_real.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    m = res["meta"]
    mm = m["machine"]
    med = statistics.median
    sp = lambda r: f"{r['min']:.2f} / **{r['median']:.2f}** / {r['max']:.2f}"  # noqa: E731
    lines = ["# Ours vs TRL on the real models", "",
             f"Command: `{m['command']}`  ",
             f"Machine: {mm['cpu']} ({mm['cpu_capability']}), torch {mm['torch']}, transformers {mm['transformers']}, "
             f"trl {m['trl']}, {m['threads']} torch thread(s); git {mm['git']}; wall {m['wall_s']} s  ",
             f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in m['load_avg_before'])}, after: "
             f"{' / '.join(f'{x:.1f}' for x in m['load_avg_after'])}: 2 cores shared with other jobs; the ratios "
             "compare sides run back to back, CPU-time ratios are less disturbed by the load.  ",
             f"Work: GRPO {m['work']['grpo']} on the teacher, distillation {m['work']['distill_prompts']} prompts per step; "
             f"completions exactly {m['work']['max_new_tokens']} tokens; precision: autocast {m['autocast']} on both sides; "
             f"logprob_chunk {m['chunk']}. Each side: a fresh process per repeat, {m['warmup']} warm-up step(s) then "
             f"{m['steps']} timed step(s); {m['repeats']} repeats.", "",
             "| arm | ours samples/s | theirs samples/s | ratio (min / median / max) | ratio per CPU-s | ours peak RSS MB | "
             "theirs peak RSS MB | RSS ratio (min / median / max) |", "|---|---|---|---|---|---|---|---|"]
    for a in res["arms"].values():
        A, B = res["sides"][a["ours"]], res["sides"][a["theirs"]]
        lines.append(f"| {a['title']} | {med(A['samples_per_s']):.3f} | {med(B['samples_per_s']):.3f} | {sp(a['ratio'])} | "
                     f"{sp(a['cpu_ratio'])} | {med(A['peak_rss_mb']):.0f} | {med(B['peak_rss_mb']):.0f} | {sp(a['rss_ratio'])} |")
    lines += ["", "Per side (medians): generation and the rest of the step, seconds per step; RSS after imports and "
              "workload setup (before models load) and at peak.", "",
              "| side | gen s/step | train s/step | RSS after setup MB | peak RSS MB |", "|---|---|---|---|---|"]
    for side, s in res["sides"].items():
        lines.append(f"| {side} | {med(s['gen_s_per_step']):.2f} | {med(s['train_s_per_step']):.2f} | "
                     f"{med(s['rss_after_setup_mb']):.0f} | {med(s['peak_rss_mb']):.0f} |")
    if any(res["profiles"].values()):
        lines += ["", "Profiles (one extra step per side under torch.profiler): self time of the top aten ops, ms (calls).", ""]
        for side, p in res["profiles"].items():
            if p:
                top = "; ".join(f"{k.removeprefix('aten::')} {ms:.0f} ({n})" for k, ms, n in p["top"])
                lines.append(f"- {side}: profiled step {p['profiled_step_ms']:.0f} ms; by category "
                             + ", ".join(f"{k} {v:.0f}" for k, v in p["ms"].items()) + f"; top: {top}")
    return "\n".join(lines) + "\n"


def parse(argv=None):
    from bench import real_models

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, in the same process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--grpo-prompts", type=int, default=2)
    p.add_argument("--distill-prompts", type=int, default=8)
    p.add_argument("--autocast", choices=["none", "bfloat16"], default="bfloat16")
    p.add_argument("--chunk", type=int, default=512, help="our logprob_chunk (tokens per [tokens, vocab] chunk)")
    p.add_argument("--models", type=Path, default=real_models.DEFAULT_DIR)
    p.add_argument("--arms", nargs="*", choices=list(ARMS))
    p.add_argument("--profile-sides", nargs="*", default=[], choices=SIDES, help="one profiled step of these after the repeats")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    return opts


if __name__ == "__main__":
    sys.exit(main())
