"""Speed against TRL on identical work (issue 5, part 2): our GRPO step, our on-policy distillation
step and our rollout engine against TRL's GRPOTrainer, TRL's DistillationTrainer and plain Hugging
Face ``generate``, alternating arms in one process and reporting ours/TRL ratios.

    make bench-speed                                   # installs .[bench] into .venv, then runs the line below
    .venv/bin/python bench/speed_vs_trl.py --repeats 5 --steps 2 --out bench/results

Writes ``<out>/speed_vs_trl.md`` (tables + command, machine, versions, seeds), ``<out>/speed_vs_trl.png``
(ratios with min/max whiskers) and ``<out>/speed_vs_trl.json`` (every step's timings), and logs one
MLflow run (experiment ``s2d-bench``; tracking URI from ``MLFLOW_TRACKING_URI``, else MLflow's local
default) with the parameters, the ratios and those files. ``--no-mlflow`` skips MLflow.

Identical work, arm by arm (the mapping is in :func:`trl_grpo_config` and :func:`trl_distill_config`):

- models: the tiny preset's Qwen3 shapes (``stages/configs/tiny.yaml``: teacher 128x4, student 96x4),
  random init from ``stages.models.tiny_qwen3``, the char tokenizer, fp32, CPU, the same torch threads
  (``--threads``, default 1: on a shared 2-core machine a second thread mostly measures the scheduler);
  each arm starts every repeat from the same saved weights.
- prompts: the stage's own batches (``StageRun.batch_of``), fed to TRL in the same order
  (``shuffle_dataset=False``), each prompt as ``<s>`` + text so both sides tokenize to the same ids.
- completion length: exactly ``max_new_tokens`` tokens for every completion on both sides, so the two
  sides train on the same number of tokens. Ours: the configured rollout engine is built with an EOS id
  that never occurs (``eos_id=-1``: no row stops early). TRL / HF generate: ``min_new_tokens =
  max_new_tokens`` (EOS is masked to -inf, so no completion ends early and none is truncated by TRL's
  post-EOS mask). Tokens are counted from the completion masks, not assumed.
- GRPO: group size, prompts per step, one optimizer step per batch of rollouts, no reference model,
  clip 0.2 / 0.28, token-mean loss, AdamW at the same lr, grad clip 1.0, constant lr.
- on-policy distillation: TRL's ``DistillationTrainer`` (trl 1.16's on-policy GKD: always on student
  samples = GKD lmbda=1) with ``beta=1`` (reverse KL, full vocabulary) against our
  ``onpolicy_distill.form=full`` (the same objective); our default ``form=sampled`` is reported against
  the same TRL numbers.
- ours runs through the stage code (``grpo.run`` / ``onpolicy_distill.run`` on a ``StageRun`` with
  tracking off, in a temporary root); only the training steps are timed, not the stage's model loading,
  evaluation or publishing. TRL: the trainer's steps (``on_step_begin`` -> ``on_step_end``), not its
  construction.

Generation time is the rollout call alone (ours: the engine's ``generate``; TRL: ``_generate_single_turn``:
padding, ``model.generate`` and the EOS mask); "train" is the rest of the step (rewards, decoding, log-prob
forward, backward, optimizer step, bookkeeping). Every step also records this process's CPU time. After the
timed repeats one more step per side runs under ``torch.profiler`` (``--no-profile`` skips it): the results
say which kernels the time goes to on each side, and what ceiling the generation/training split puts on
each ratio.

Benchmarks are not tests: nothing here asserts a speed. Shared machines drift, so arms alternate
within every repeat (order flipped on odd repeats) and only per-repeat ratios are summarised.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/speed_vs_trl.py` from a fresh clone, package not installed
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from stages.config import Config, load_config  # noqa: E402
from stages.engines.hf import HFSampler  # noqa: E402
from stages.models import char_tokenizer, save, tiny_qwen3  # noqa: E402
from stages.recipes import grpo, onpolicy_distill  # noqa: E402
from stages.rollout import Rollouts, Sampler  # noqa: E402
from stages.runtime import StageRun, seed_for  # noqa: E402
from stages.task_contract import Problem  # noqa: E402
from stages.tracking import Tracker  # noqa: E402

NEVER = -1  # an EOS id no sampled token can equal: our sampler then never stops a row early
ARMS = ("grpo", "distill_full", "distill_sampled", "rollout")
TITLES = {
    "grpo": "GRPO step (ours vs TRL GRPOTrainer)",
    "distill_full": "on-policy distill, full-vocab reverse KL (ours form=full vs TRL DistillationTrainer beta=1)",
    "distill_sampled": "on-policy distill, ours form=sampled vs TRL DistillationTrainer beta=1",
    "rollout": "rollouts (ours HFSampler vs HF model.generate)",
}


# ----------------------------------------------------------------------------------------- setup
@dataclass
class Workload:
    """Everything both sides share: config, saved initial weights, prompts per step."""

    cfg: Config
    overrides: list[str]  # --set items on the tiny preset; each of our stage runs adds its own
    tok: object
    teacher_path: str
    student_path: str
    grpo_batches: list[list[Problem]]  # per step, prompts_per_step problems (before the group repeat)
    distill_batches: list[list[Problem]]
    threads: int
    seed: int
    tmp: Path

    @property
    def G(self) -> int:
        return self.cfg.teacher_rl.group_size

    @property
    def N(self) -> int:
        return self.cfg.sampling.max_new_tokens


def overrides(opts) -> list[str]:
    """The tiny preset with the benchmark's sizes; tracking off, tiny evaluations (never timed)."""
    return [
        "tracking.enabled=false",
        f"seed={opts.seed}",
        f"torch_threads={opts.threads}",
        f"sampling.max_new_tokens={opts.max_new_tokens}",
        f"teacher_rl.group_size={opts.group_size}",
        f"teacher_rl.prompts_per_step={opts.grpo_prompts}",
        f"onpolicy_distill.prompts_per_step={opts.distill_prompts}",
        "task.sizes={bootstrap: 0, teacher_rl: 1000, prompts: 4000, student_rl: 0, eval: 8}",
        "eval.problems=4", "eval.samples=1", "eval.greedy=false", "eval.c2_prompts=4",
        "checkpoint_every=1000000",  # no resume snapshots inside the timed steps
    ]


def setup(opts) -> Workload:
    torch.set_num_threads(opts.threads)
    sets = overrides(opts)
    cfg = load_config("tiny", sets)
    tmp = Path(tempfile.mkdtemp(prefix="s2d-bench-"))
    tok = char_tokenizer()
    paths = {}
    for role in ("teacher", "student"):
        model = tiny_qwen3(getattr(cfg.models, role).arch, tok, seed_for(opts.seed, "bench-init", role))
        paths[role] = str(tmp / f"init-{role}")
        save(model, tok, paths[role])
    n_steps = max(opts.steps, opts.warmup, 1)  # every side trains on batches 0..steps-1 of the stage's order

    def batches(stage: str, split: str, n: int) -> list[list[Problem]]:
        helper = StageRun(stage, cfg, str(tmp / "batches"))
        problems = helper.task.problems(split)
        out = [helper.batch_of(problems, n, s) for s in range(n_steps)]
        shutil.rmtree(helper.work, ignore_errors=True)
        return out

    return Workload(cfg, sets, tok, paths["teacher"], paths["student"],
                    batches("teacher_rl", "teacher_rl", cfg.teacher_rl.prompts_per_step),
                    batches("onpolicy_distill", "prompts", cfg.onpolicy_distill.prompts_per_step),
                    opts.threads, opts.seed, tmp)


@dataclass
class Step:
    """One step of one side: wall seconds, and this process's CPU seconds (all its threads), which a
    shared machine's other load disturbs less than wall time."""

    step_s: float
    gen_s: float
    samples: int
    tokens: int  # completion tokens trained on (or generated, for the rollout arm)
    cpu_s: float = float("nan")
    gen_cpu_s: float = float("nan")


def make_engine(cfg: Config, pad_id: int, engine: str | None = None) -> Sampler:
    """The rollout engine the stages would build from ``cfg.sampling`` (or ``engine``), with an EOS id that
    never occurs, so every completion is exactly ``max_new_tokens`` long."""
    try:
        from stages.engines import make_sampler
    except ImportError:  # a checkout from before the engine registry: HFSampler is the only engine
        return HFSampler(NEVER, pad_id, cfg.sampling.batch_size)
    sampling = cfg.sampling if engine is None else cfg.sampling.model_copy(update={"engine": engine})
    return make_sampler(sampling, NEVER, pad_id, "cpu")


class StepProfile:
    """``torch.profiler`` over exactly one training step (or rollout): the step hooks below call
    :meth:`begin` / :meth:`end`; only the first step after :func:`profiling` is recorded."""

    def __init__(self):
        self.prof, self.wall, self.done = None, 0.0, False

    def begin(self) -> None:
        if self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.start()
            self.t0 = time.perf_counter()

    def end(self) -> None:
        if self.prof is not None and not self.done:
            self.prof.stop()
            self.wall, self.done = time.perf_counter() - self.t0, True


PROFILE: StepProfile | None = None  # set while a profiled step runs


def _begin() -> None:
    if PROFILE is not None:
        PROFILE.begin()


def _end() -> None:
    if PROFILE is not None:
        PROFILE.end()


# -------------------------------------------------------------------------------------- our side
class TimedSampler(Sampler):
    """Our HFSampler, with the rollout calls made during training steps timed (the model is in train
    mode only inside ``Trainer.fit``; the stage's evaluations sample in eval mode and are not counted)."""

    def __init__(self, inner: Sampler):
        self.inner = inner
        self.calls: list[dict] = []

    def generate(self, model, prompts, **kw) -> Rollouts:
        training = model.training
        if training:
            _begin()
        t0, c0 = time.perf_counter(), time.process_time()
        ro = self.inner.generate(model, prompts, **kw)
        if training:
            self.calls.append({"gen_s": time.perf_counter() - t0, "gen_cpu_s": time.process_time() - c0,
                               "cpu_start": c0, "tokens": int(ro.completion.sum()), "samples": len(ro)})
        return ro


class StepEndClock(Tracker):
    """Tracking stays off; ``Trainer.fit`` calls ``metrics(..., step)`` right after every step, which
    marks the step's end in CPU time (its start is the step's rollout call, first thing in a step)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ends: list[float] = []

    def metrics(self, values: dict, step: int | None = None) -> None:
        self.ends.append(time.process_time())
        _end()
        super().metrics(values, step)


def _ours(w: Workload, stage: str, steps: int, overrides: list[str], call) -> list[Step]:
    """Run one of our stages for ``steps`` steps in a fresh temporary root; per-step timings."""
    cfg = load_config("tiny", w.overrides + overrides)
    root = tempfile.mkdtemp(prefix="s2d-bench-ours-", dir=w.tmp)
    run = StageRun(stage, cfg, root, inputs={"teacher": w.teacher_path, "student": w.student_path})
    sampler = run.rollout_maker.sampler = TimedSampler(make_engine(cfg, w.tok.pad_token_id))  # kept once set
    clock = run.tracker = StepEndClock(cfg.tracking)
    call(run, steps)
    hist = [json.loads(line) for line in (Path(root) / stage / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(root, ignore_errors=True)
    assert len(sampler.calls) == len(hist) == len(clock.ends) == steps, (len(sampler.calls), len(hist), steps)
    return [Step(h["step_time_s"], c["gen_s"], c["samples"], c["tokens"], end - c["cpu_start"], c["gen_cpu_s"])
            for h, c, end in zip(hist, sampler.calls, clock.ends)]


def ours_grpo(w: Workload, steps: int) -> list[Step]:
    """Stage 1 (``teacher_rl``) on the teacher-shaped policy: ``grpo.run`` as ``python -m stages`` runs it."""
    return _ours(w, "teacher_rl", steps, [f"teacher_rl.steps={steps}"],
                 lambda run, n: grpo.main(run, w.teacher_path, steps=n))


def ours_distill(w: Workload, steps: int, form: str) -> list[Step]:
    """Stage 2b (``onpolicy_distill``) with the given form, as ``python -m stages`` runs it."""
    return _ours(w, "onpolicy_distill", steps, [f"onpolicy_distill.steps={steps}", f"onpolicy_distill.form={form}"],
                 lambda run, n: onpolicy_distill.main(run, w.teacher_path, w.student_path))


# -------------------------------------------------------------------------------------- TRL side
def trl_common(w: Workload, out: str, steps: int, batch: int, optim) -> dict:
    """TrainingArguments shared by both TRL trainers, each matched to what our Trainer does."""
    return dict(
        output_dir=out,
        max_steps=steps,                      # = our steps; one TRL step = one optimizer step = one of ours
        per_device_train_batch_size=batch,    # every completion of the step in one micro-batch (ours: minibatches=1)
        gradient_accumulation_steps=1,
        learning_rate=optim.lr,               # AdamW, same lr, betas, eps, weight decay and grad clip as ours
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.grad_clip,
        optim="adamw_torch",                  # torch.optim.AdamW, as our Trainer (fused only on CUDA there)
        lr_scheduler_type="constant",         # ours: constant lr (warmup_steps=0 in the tiny preset)
        warmup_steps=0,
        bf16=False, fp16=False,               # fp32 like ours (TRL's default is bf16)
        gradient_checkpointing=False,         # TRL's default is on; ours checkpoints only the lm-head chunks
        use_cpu=True,
        seed=w.seed,
        report_to="none",                     # ours: tracking.enabled=false
        logging_steps=10**6,                  # no logging inside the timed steps (ours logs nothing either)
        save_strategy="no", eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,                # the rows are already our batches, in our order
        remove_unused_columns=False,
        temperature=w.cfg.sampling.temperature,
        top_p=1.0, top_k=0,                   # plain sampling at the temperature, as ours
        max_completion_length=w.N,
        generation_kwargs={"min_new_tokens": w.N},  # every completion exactly N tokens (see module docstring)
        use_vllm=False,
        log_completions=False,
    )


def trl_grpo_config(w: Workload, out: str, steps: int):
    from trl import GRPOConfig

    g = w.cfg.teacher_rl
    return GRPOConfig(
        **trl_common(w, out, steps, g.prompts_per_step * g.group_size, g.optim),
        num_generations=g.group_size,          # G completions per prompt
        steps_per_generation=1,                # generation batch = the one training batch (no reuse)
        num_iterations=1,                      # = our epochs=1: one pass, old log-probs = detached current
        beta=0.0,                              # = our kl_coef=0: no reference model is built
        epsilon=g.clip_low, epsilon_high=g.clip_high,
        loss_type="dapo",                      # token-mean over the whole batch = our aggregation token-mean
        scale_rewards="group" if g.normalize_std else "none",
        mask_truncated_completions=False,      # every completion hits max length; ours masks none either
    )


def trl_distill_config(w: Workload, out: str, steps: int):
    from trl import DistillationConfig

    d = w.cfg.onpolicy_distill
    return DistillationConfig(
        **trl_common(w, out, steps, d.prompts_per_step, d.optim),
        beta=1.0,                              # generalized JSD at beta=1 = reverse KL(student || teacher)
        disable_dropout=True,                  # no dropout in these models either way
    )


class _StepClock:
    """A TrainerCallback (built lazily so TRL stays optional) timing each optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.steps: list[tuple[float, float]] = []  # (wall s, CPU s)
                self._t0 = self._c0 = 0.0

            def on_step_begin(self, args, state, control, **kw):
                _begin()
                self._t0, self._c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                self.steps.append((time.perf_counter() - self._t0, time.process_time() - self._c0))
                _end()

        return Clock()


def _instrument(trainer) -> tuple[list[tuple[float, float]], list[int]]:
    """Time TRL's generation call and count completion tokens of every generated batch."""
    gen_s, tokens = [], []
    real_gen, real_score = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_gen(*a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        out = real_gen(*a, **kw)
        gen_s.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    def counted(*a, **kw):
        out = real_score(*a, **kw)
        tokens.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_single_turn, trainer._generate_and_score_completions = timed_gen, counted
    return gen_s, tokens


def _trl_rows(batches: list[list[Problem]]) -> list[dict]:
    # "<s>" is the BOS special token: the prompt ids equal StageRun.encode's [bos] + text
    return [{"prompt": "<s>" + p.prompt, "answer": p.answer} for b in batches for p in b]


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _run_trl(w: Workload, trainer_fn, steps: int, per_step: int) -> list[Step]:
    out = tempfile.mkdtemp(prefix="s2d-bench-trl-", dir=w.tmp)
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_fn(out)
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training log dict
    clock = _StepClock()
    trainer.add_callback(clock)
    gen_s, tokens = _instrument(trainer)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    assert len(clock.steps) == len(gen_s) == len(tokens) == steps, (len(clock.steps), len(gen_s), len(tokens), steps)
    return [Step(s, g, per_step, t, cs, gc) for (s, cs), (g, gc), t in zip(clock.steps, gen_s, tokens)]


def trl_grpo(w: Workload, steps: int) -> list[Step]:
    from datasets import Dataset
    from trl import GRPOTrainer

    task = w.cfg.task
    from stages.tasks import make_task

    verifier = make_task(task)

    def reward(completions, answer, **_):  # our task's verifier, on the same decoded text
        return [verifier.reward(c, Problem("", "", a)) for c, a in zip(completions, answer)]

    ds = Dataset.from_list(_trl_rows(w.grpo_batches[:steps]))
    g = w.cfg.teacher_rl
    return _run_trl(w, lambda out: GRPOTrainer(model=_load(w.teacher_path), reward_funcs=reward,
                                               args=trl_grpo_config(w, out, steps), train_dataset=ds,
                                               processing_class=copy.deepcopy(w.tok)),
                    steps, g.prompts_per_step * g.group_size)


def trl_distill(w: Workload, steps: int) -> list[Step]:
    from datasets import Dataset
    from trl import DistillationTrainer

    teacher = _load(w.teacher_path).requires_grad_(False).eval()
    ds = Dataset.from_list(_trl_rows(w.distill_batches[:steps]))
    return _run_trl(w, lambda out: DistillationTrainer(model=_load(w.student_path), teacher_model=teacher,
                                                       args=trl_distill_config(w, out, steps), train_dataset=ds,
                                                       processing_class=copy.deepcopy(w.tok)),
                    steps, w.cfg.onpolicy_distill.prompts_per_step)


# ------------------------------------------------------------------------------------- rollouts
def _rollout_prompts(w: Workload, k: int) -> list[list[int]]:
    helper_ids = []
    for p in w.grpo_batches[k % len(w.grpo_batches)]:
        ids = [w.tok.bos_token_id] + w.tok(p.prompt, add_special_tokens=False)["input_ids"]
        helper_ids += [ids] * w.G
    return helper_ids


def ours_rollout(w: Workload, steps: int, engine: str | None = None) -> list[Step]:
    """Our rollout engine (the config's, or ``engine``) on the GRPO step's batch (prompts x group),
    called as the stages call it."""
    model = _load(w.teacher_path)
    sampler = make_engine(w.cfg, w.tok.pad_token_id, engine)
    out = []
    for s in range(steps):
        prompts = _rollout_prompts(w, s)
        _begin()
        t0, c0 = time.perf_counter(), time.process_time()
        ro = sampler.generate(model, prompts, temperature=w.cfg.sampling.temperature, max_new_tokens=w.N,
                              seed=seed_for(w.seed, "bench-rollout", s))
        dt_, dc = time.perf_counter() - t0, time.process_time() - c0
        _end()
        out.append(Step(dt_, dt_, len(ro), int(ro.completion.sum()), dc, dc))
    return out


def hf_generate(w: Workload, steps: int) -> list[Step]:
    """Plain ``model.generate(do_sample=True, ...)`` on the same batch (left-padded, KV cache, defaults)."""
    model = _load(w.teacher_path).eval()
    out = []
    for s in range(steps):
        prompts = _rollout_prompts(w, s)
        _begin()
        t0, c0 = time.perf_counter(), time.process_time()
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), w.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p)
            attn[i, P - len(p):] = 1
        torch.manual_seed(seed_for(w.seed, "bench-rollout", s))
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=w.N,
                                 min_new_tokens=w.N, temperature=w.cfg.sampling.temperature, top_k=0, top_p=1.0,
                                 pad_token_id=w.tok.pad_token_id, eos_token_id=w.tok.eos_token_id)
        dt_, dc = time.perf_counter() - t0, time.process_time() - c0
        _end()
        comp = seq[:, P:]  # min_new_tokens = max_new_tokens: no row ends early, so every column is a token
        out.append(Step(dt_, dt_, len(prompts), comp.numel(), dc, dc))
    return out


def extra_engines(cfg: Config) -> list[str]:
    """Native engines besides the configured one that run on the CPU (e.g. the static-KV-cache engine,
    eager here), each benchmarked as an extra rollout row against HF generate."""
    try:
        from stages.engines import make_sampler  # noqa: F401
    except ImportError:
        return []
    names = [e for e in ("static",) if e != cfg.sampling.engine]
    return [e for e in names if _engine_builds(cfg, e)]


def _engine_builds(cfg: Config, engine: str) -> bool:
    try:
        make_engine(cfg, 0, engine)
        return True
    except Exception:  # noqa: BLE001 - an engine that cannot be built here is simply not benchmarked
        return False


# ----------------------------------------------------------------------------------------- driver
@dataclass
class Pair:
    """One arm's two sides, as functions (workload, steps) -> per-step timings."""

    ours: object
    other: object
    ours_label: str
    other_label: str


def pairs(extra: list[str] = ()) -> dict[str, Pair]:
    out = {
        "grpo": Pair(ours_grpo, trl_grpo, "ours grpo.run (teacher_rl)", "trl GRPOTrainer"),
        "distill_full": Pair(lambda w, n: ours_distill(w, n, "full"), trl_distill,
                             "ours onpolicy_distill form=full", "trl DistillationTrainer beta=1"),
        "distill_sampled": Pair(lambda w, n: ours_distill(w, n, "sampled"), trl_distill,
                                "ours onpolicy_distill form=sampled", "trl DistillationTrainer beta=1"),
        "rollout": Pair(ours_rollout, hf_generate, "ours sampling.engine=hf (HFSampler)", "HF model.generate"),
    }
    for engine in extra:
        out[f"rollout_{engine}"] = Pair(lambda w, n, e=engine: ours_rollout(w, n, e), hf_generate,
                                        f"ours sampling.engine={engine}", "HF model.generate")
    return out


def summarize_side(steps: list[Step]) -> dict:
    t = sum(s.step_s for s in steps)
    g = sum(s.gen_s for s in steps)
    c = sum(s.cpu_s for s in steps)
    gc = sum(s.gen_cpu_s for s in steps)
    n = sum(s.samples for s in steps)
    tok = sum(s.tokens for s in steps)
    k = len(steps)
    return {"samples_per_s": n / t, "tokens_per_s": tok / t, "step_s": t / k,
            "gen_s_per_step": g / k, "train_s_per_step": (t - g) / k,
            "gen_tokens_per_s": tok / g if g > 0 else float("nan"),
            "train_tokens_per_s": tok / (t - g) if t - g > 1e-9 else float("nan"),
            "cpu_s_per_step": c / k, "gen_cpu_s_per_step": gc / k, "samples_per_cpu_s": n / c,
            "samples_per_step": n / k, "tokens_per_step": tok / k}


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def run_benchmark(opts, log=print) -> dict:
    """Warm up every arm, then ``repeats`` rounds alternating ours / theirs; returns the results dict."""
    w = setup(opts)
    arms = pairs(extra_engines(w.cfg) if not opts.no_extra_engines else [])
    arms = {k: v for k, v in arms.items() if not opts.arms or k in opts.arms or any(k.startswith(a + "_") for a in opts.arms)}
    raw = {k: {"ours": [], "other": []} for k in arms}
    t_start = time.perf_counter()
    # warm-up: a step of every side (first-call costs: imports, allocator, kernels), not recorded
    for name, pair in arms.items():
        for side in (pair.ours, pair.other) if opts.warmup else ():
            side(w, opts.warmup)
        log(f"warm-up {name}: done ({time.perf_counter() - t_start:.0f} s)")
    for r in range(opts.repeats):
        for name, pair in arms.items():
            order = (("ours", pair.ours), ("other", pair.other))
            for side, fn in (order if r % 2 == 0 else order[::-1]):  # ABBA: drift hits both sides alike
                raw[name][side].append(fn(w, opts.steps))
        log(
            f"repeat {r + 1}/{opts.repeats}: "
            + ", ".join(
                f"{n} {summarize_side(raw[n]['ours'][-1])['samples_per_s'] / summarize_side(raw[n]['other'][-1])['samples_per_s']:.2f}x"  # noqa: E501
                for n in arms
            )
            + f" ({time.perf_counter() - t_start:.0f} s)"
        )
    profiles = run_profiles(opts, w, arms, log) if opts.profile else {}
    shutil.rmtree(w.tmp, ignore_errors=True)
    results = {"meta": meta(opts, w, time.perf_counter() - t_start), "arms": {}, "profile": profiles}
    for name, pair in arms.items():
        ours = [summarize_side(s) for s in raw[name]["ours"]]
        other = [summarize_side(s) for s in raw[name]["other"]]
        ratio = [o["samples_per_s"] / t["samples_per_s"] for o, t in zip(ours, other)]
        cpu_ratio = [o["samples_per_cpu_s"] / t["samples_per_cpu_s"] for o, t in zip(ours, other)]
        gen_ratio = [o["gen_tokens_per_s"] / t["gen_tokens_per_s"] for o, t in zip(ours, other)]
        train_ratio = [o["train_tokens_per_s"] / t["train_tokens_per_s"] for o, t in zip(ours, other)
                       if o["train_s_per_step"] > 0 and t["train_s_per_step"] > 0]
        med = lambda key, xs: statistics.median(x[key] for x in xs)  # noqa: E731
        results["arms"][name] = {
            "title": TITLES.get(name, f"{pair.ours_label} vs {pair.other_label}"),
            "ours_label": pair.ours_label,
            "other_label": pair.other_label,
            "ratio": spread(ratio),
            "cpu_ratio": spread(cpu_ratio),
            "gen_ratio": spread(gen_ratio),
            "train_ratio": spread(train_ratio) if train_ratio else None,
            "ours": {k: med(k, ours) for k in ours[0]},
            "other": {k: med(k, other) for k in other[0]},
            "repeats": {"ours": ours, "other": other, "ratio": ratio, "cpu_ratio": cpu_ratio},
            "steps": {side: [[s.__dict__ for s in rep] for rep in raw[name][side]] for side in ("ours", "other")},
        }
        for side, p in profiles.get(name, {}).items():
            add_shares(p, results["arms"][name][side]["step_s"] * 1e3)
    return results


CATEGORIES = (  # (label, predicate on an aten op name)
    ("matmul", lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", lambda n: "scaled_dot_product" in n or "attention" in n),
    (
        "cat / copy / index",
        lambda n: (
            n
            in (
                "aten::cat",
                "aten::copy_",
                "aten::_to_copy",
                "aten::clone",
                "aten::index_copy_",
                "aten::index",
                "aten::index_select",
                "aten::gather",
                "aten::scatter_",
                "aten::index_put_",
                "aten::masked_fill_",
                "aten::where",
                "aten::fill_",
                "aten::zero_",
            )
        ),
    ),
    (
        "softmax / sampling",
        lambda n: any(
            k in n for k in ("softmax", "multinomial", "cumsum", "searchsorted", "sort", "topk", "argmax", "uniform", "rand")
        ),
    ),
    ("optimizer (foreach)", lambda n: "_foreach" in n or "addcdiv" in n or "addcmul" in n or "lerp" in n),
    (
        "elementwise / norms",
        lambda n: (
            any(
                k in n
                for k in (
                    "mul",
                    "add",
                    "sub",
                    "div",
                    "pow",
                    "rsqrt",
                    "mean",
                    "silu",
                    "exp",
                    "neg",
                    "sum",
                    "sin",
                    "cos",
                    "sigmoid",
                    "tanh",
                    "log",
                    "sqrt",
                    "clamp",
                    "minimum",
                    "maximum",
                    "threshold",
                    "norm",
                    "embedding",
                    "eq",
                    "ne",
                    "lt",
                    "gt",
                    "ge",
                    "le",
                    "any",
                    "all",
                    "bitwise",
                    "logical",
                    "isin",
                )
            )
            and not n.startswith("aten::_foreach")
        ),
    ),
)


def op_breakdown(prof: StepProfile) -> dict:
    """Self time of one step's aten ops by category (ms), and its top ops."""
    events = [e for e in prof.prof.key_averages() if e.key.startswith("aten::")]
    cats = {label: 0.0 for label, _ in CATEGORIES}
    cats["other aten ops"] = 0.0
    for e in events:
        label = next((lab for lab, pred in CATEGORIES if pred(e.key)), "other aten ops")
        cats[label] += e.self_cpu_time_total / 1e3
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    return {"profiled_step_ms": prof.wall * 1e3, "ms": cats,
            "top": [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in top]}


def add_shares(profile: dict, step_ms: float) -> None:
    """Shares of the profiled step; ``step_ms`` is the side's median unprofiled step, for reference. The
    profiler's own per-op cost lands mostly outside the kernels, so "outside aten ops" (Python, framework,
    autograd glue) is an upper bound."""
    wall = profile["profiled_step_ms"]
    kernels = sum(profile["ms"].values())
    profile["step_ms"] = step_ms
    profile["share"] = {**{k: v / wall for k, v in profile["ms"].items()}, "outside aten ops": max(0.0, 1 - kernels / wall)}


def run_profiles(opts, w: Workload, arms: dict[str, Pair], log=print) -> dict:
    """One profiled step per side of every arm, after the timed repeats (the profiler's own overhead
    never touches the timings)."""
    global PROFILE
    out = {}
    for name, pair in arms.items():
        out[name] = {}
        for side, fn in (("ours", pair.ours), ("other", pair.other)):
            PROFILE = StepProfile()
            try:
                fn(w, 1)
                out[name][side] = op_breakdown(PROFILE)
            finally:
                PROFILE = None
        log(f"profiled {name}")
    return out


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def meta(opts, w: Workload, wall_s: float) -> dict:
    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")
            ),
            platform.processor(),
        )
    except OSError:
        cpu = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "stages"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "unknown", False
    c = w.cfg
    return {
        "command": "python bench/speed_vs_trl.py " + " ".join(opts.argv),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": w.threads, "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {p: _version(p) for p in ("torch", "transformers", "trl", "accelerate", "datasets")},
        "git": f"{commit}{' (stages/ modified)' if dirty else ''}",
        "seeds": {"config_seed": c.seed, "trl_seed": w.seed, "model_init": "seed_for(seed, 'bench-init', role)"},
        "workload": {
            "teacher_arch": c.models.teacher.arch.model_dump(), "student_arch": c.models.student.arch.model_dump(),
            "vocab": len(w.tok), "dtype": "float32", "device": "cpu",
            "grpo": {"prompts_per_step": c.teacher_rl.prompts_per_step, "group_size": c.teacher_rl.group_size,
                     "lr": c.teacher_rl.optim.lr},
            "distill": {"prompts_per_step": c.onpolicy_distill.prompts_per_step, "lr": c.onpolicy_distill.optim.lr},
            "max_new_tokens": c.sampling.max_new_tokens, "temperature": c.sampling.temperature,
            "prompt_tokens": len(w.grpo_batches[0][0].prompt) + 1,
        },
        "repeats": opts.repeats, "steps_per_repeat": opts.steps, "wall_s": round(wall_s, 1),
    }


# ---------------------------------------------------------------------------------------- outputs
def fmt(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def markdown(res: dict, notes: str = "") -> str:
    m = res["meta"]
    wl = m["workload"]
    lines = [
        "# Speed against TRL on identical work",
        "",
        f"Command: `{m['command']}`  ",
        f"Date: {m['date_utc']}; git {m['git']}; wall time {m['wall_s']} s  ",
        f"Machine: {m['machine']['cpu']}, {m['machine']['cpu_count']} CPUs visible, torch threads "
        f"{m['machine']['torch_threads']}, {m['machine']['platform']}, Python {m['machine']['python']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  ",
        f"Seeds: config seed {m['seeds']['config_seed']}, TRL seed {m['seeds']['trl_seed']}, model init "
        f"{m['seeds']['model_init']}  ",
        f"Work: teacher {wl['teacher_arch']}, student {wl['student_arch']}, vocab {wl['vocab']}, fp32 CPU; "
        f"prompts {wl['prompt_tokens']} tokens; completions exactly {wl['max_new_tokens']} tokens at T={wl['temperature']}; "
        f"GRPO {wl['grpo']['prompts_per_step']} prompts x {wl['grpo']['group_size']} per step, lr {wl['grpo']['lr']}; "
        f"distillation {wl['distill']['prompts_per_step']} prompts per step, lr {wl['distill']['lr']}.  ",
        f"Protocol: one warm-up step per side, then {m['repeats']} repeats x {m['steps_per_repeat']} steps per side, "
        "sides alternating (order flipped every other repeat); ratio = ours / theirs per repeat, then min / median / max.",
        "",
        "## Throughput (median over repeats)",
        "",
        "| arm | ours samples/s | theirs samples/s | ratio ours/theirs (min / median / max) | ours tokens/s | theirs tokens/s | ours gen / train s per step | theirs gen / train s per step |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in res["arms"].values():
        o, t, r = a["ours"], a["other"], a["ratio"]
        lines.append(
            f"| {a['title']} | {fmt(o['samples_per_s'])} | {fmt(t['samples_per_s'])} | "
            f"{r['min']:.2f} / **{r['median']:.2f}** / {r['max']:.2f} | {fmt(o['tokens_per_s'], 0)} | {fmt(t['tokens_per_s'], 0)} | "  # noqa: E501
            f"{o['gen_s_per_step']:.3f} / {o['train_s_per_step']:.3f} | {t['gen_s_per_step']:.3f} / {t['train_s_per_step']:.3f} |"
        )
    lines += ["", "## Generation and training apart; CPU time", "",
              "Ratios ours / theirs per repeat (min / median / max): tokens/s of the generation call and of the rest "
              "of the step, and samples per CPU-second of this process (all its threads; less sensitive to other "
              "load on a shared machine than wall time).", "",
              "| arm | generation | training (rest of the step) | samples per CPU-s | ours / theirs CPU-s per step |",
              "|---|---|---|---|---|"]
    s3 = lambda r: f"{r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f}"  # noqa: E731
    for name, a in res["arms"].items():
        tr = a["train_ratio"]
        lines.append(f"| {name} ({a['ours_label']} vs {a['other_label']}) | {s3(a['gen_ratio'])} | "
                     f"{s3(tr) if tr else 'n/a (generation only)'} | {s3(a['cpu_ratio'])} | "
                     f"{a['ours']['cpu_s_per_step']:.3f} / {a['other']['cpu_s_per_step']:.3f} |")
    if res.get("profile"):
        cols = list(next(iter(next(iter(res["profile"].values())).values()))["share"])
        lines += ["", "## Where the time goes", "",
                  "One step per side under `torch.profiler` after the timed repeats: self time of the aten kernels by "
                  "category as a share of the profiled step; \"outside aten ops\" is the rest (Python, framework, "
                  "autograd glue, and most of the profiler's own per-op cost: an upper bound). Step ms is the side's "
                  "median unprofiled step, for comparison with the profiled one.", "",
                  "| arm | side | step ms | profiled step ms | " + " | ".join(cols) + " | top aten ops (self ms, calls) |",
                  "|---|---|---|---|" + "---|" * (len(cols) + 1)]
        for name, sides in res["profile"].items():
            for side, p in sides.items():
                label = res["arms"][name]["ours_label" if side == "ours" else "other_label"]
                top = "; ".join(f"{k.removeprefix('aten::')} {ms:.0f} ({n})" for k, ms, n in p["top"][:4])
                lines.append(f"| {name} | {label} | {p['step_ms']:.0f} | {p['profiled_step_ms']:.0f} | "
                             + " | ".join(f"{v:.0%}" for v in p["share"].values()) + f" | {top} |")
    lines += ["", "## Reading", ""] + reading(res) + ["", NOTES.strip()]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


NOTES = """
## What is and is not identical

- Same model code on both sides (transformers' Qwen3, SDPA attention, DynamicCache in generation), same weights,
  prompts, group size, completion length, optimizer (torch AdamW, lr, betas, eps, no weight decay, clip 1.0),
  constant lr, fp32, one process, the same torch threads. TRL: no reference model (beta=0), one iteration per
  generation, no gradient checkpointing, no bf16, no logging/saving/evaluation inside the timed steps.
- Sampling differs in method, not in work: ours draws one uniform per token and inverts the CDF, HF `generate`
  uses `torch.multinomial`; TRL/HF mask EOS to -inf (`min_new_tokens`) where ours gets an EOS id that never
  occurs. Both give exactly `max_new_tokens` tokens per completion at temperature 1, no top-k/top-p.
- Per-step extras each side does by design are counted as its own cost: ours computes the sampler's log-probs
  and entropies while sampling, writes `rollouts.jsonl` and keeps per-step metrics; TRL computes entropies,
  gathers metrics and runs its callbacks. The teacher forward in distillation is a no-grad forward on both sides.
- Loss normalisation: ours token-mean = TRL `loss_type="dapo"` (one micro-batch) and DistillationTrainer's
  sum / completion tokens. GRPO advantages: both divide by the group's Bessel-corrected std (eps 1e-6 ours,
  1e-4 TRL).
- Threads: 1 by default. On a shared 2-core machine a second torch thread mostly measures the OS scheduler (on
  2026-11-26 a 128x128 by 128x384 linear took 0.37 ms on one thread and 2.5 ms on two while other jobs ran);
  `--threads 2` runs the same comparison on two.
- TRL's experimental `GKDTrainer` (lmbda=1, beta=1) is not run: in trl 1.16 it is an SFTTrainer over
  chat-formatted data, and `DistillationTrainer` is the maintained on-policy trainer with the same objective.
"""


def reading(res: dict) -> list[str]:
    """Computed remarks: for every arm under the 2x goal, the ceiling Amdahl's law puts on it and the
    profile's split between kernels and everything else."""
    out = []
    for name, a in res["arms"].items():
        r, o, t = a["ratio"]["median"], a["ours"], a["other"]
        if r >= 2:
            out.append(f"- **{name}**: {r:.2f}x, at or above the 2x goal.")
            continue
        line = f"- **{name}**: {r:.2f}x, under the 2x goal."
        if o["train_s_per_step"] > 0:
            ceiling = t["step_s"] / o["train_s_per_step"]
            line += (
                f" Ours spends {o['gen_s_per_step'] / o['step_s']:.0%} of its step generating; even with generation "
                f"free, ours would be at most {ceiling:.2f}x (their step {t['step_s']:.2f} s / our training part "
                f"{o['train_s_per_step']:.2f} s), and the training part is the same model's forward and backward on both sides "
                f"(training tokens/s ratio {a['train_ratio']['median']:.2f})."
            )
        p = res.get("profile", {}).get(name)
        if p:
            for side, label in (("ours", "ours"), ("other", "theirs")):
                sh = p[side]["share"]
                line += (
                    f" Profile, {label}: {1 - sh['outside aten ops']:.0%} of the profiled step in aten kernels (matmul "
                    f"{sh['matmul']:.0%}, elementwise/norms {sh['elementwise / norms']:.0%}, attention {sh['attention']:.0%}, "
                    f"cat/copy {sh['cat / copy / index']:.0%}), at most {sh['outside aten ops']:.0%} outside them."
                )
        out.append(line)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.7 * len(names)), gridspec_kw={"width_ratios": [1, 1.2]})
    ys = range(len(names))
    med = [res["arms"][n]["ratio"]["median"] for n in names]
    lo = [m - res["arms"][n]["ratio"]["min"] for n, m in zip(names, med)]
    hi = [res["arms"][n]["ratio"]["max"] - m for n, m in zip(names, med)]
    ax = axes[0]
    ax.barh(
        list(ys),
        med,
        xerr=[lo, hi],
        capsize=4,
        color=["tab:green" if m >= 2 else "tab:orange" if m >= 1 else "tab:red" for m in med],
    )
    ax.axvline(1, color="k", lw=0.8)
    ax.axvline(2, color="tab:green", ls="--", lw=0.8, label="goal 2x")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("throughput ratio ours / theirs (median, min-max)")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    width = 0.4
    for k, (side, color) in enumerate((("ours", "tab:blue"), ("other", "tab:gray"))):
        vals = [res["arms"][n][side]["samples_per_s"] for n in names]
        ax.barh([y + (k - 0.5) * width for y in ys], vals, height=width, color=color,
                label="ours" if side == "ours" else "TRL / HF generate")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("samples/s (median)")
    ax.legend(loc="upper right", fontsize=8)
    m = res["meta"]
    fig.suptitle(
        f"sparse-to-dense vs TRL {m['versions']['trl']}: {m['machine']['cpu']}, torch threads: {m['machine']['torch_threads']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(res: dict, out: Path, notes: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "speed_vs_trl.md", "png": out / "speed_vs_trl.png", "json": out / "speed_vs_trl.json"}
    files["md"].write_text(markdown(res, notes))
    plot(res, files["png"])
    files["json"].write_text(json.dumps(res, indent=1))
    return files


def log_mlflow(res: dict, files: dict[str, Path]) -> str:
    import mlflow

    mlflow.set_experiment("s2d-bench")
    with mlflow.start_run(run_name="speed_vs_trl") as run:
        m = res["meta"]
        mlflow.log_params({"command": m["command"], "cpu": m["machine"]["cpu"], "torch_threads": m["machine"]["torch_threads"],
                           "repeats": m["repeats"], "steps_per_repeat": m["steps_per_repeat"], "git": m["git"],
                           **{f"version.{k}": v for k, v in m["versions"].items()},
                           **{f"seed.{k}": v for k, v in m["seeds"].items()},
                           "workload": json.dumps(m["workload"])[:6000]})
        for name, a in res["arms"].items():
            for k in ("min", "median", "max"):
                mlflow.log_metric(f"{name}.ratio_{k}", a["ratio"][k])
                mlflow.log_metric(f"{name}.cpu_ratio_{k}", a["cpu_ratio"][k])
            for side in ("ours", "other"):
                for k in ("samples_per_s", "tokens_per_s", "gen_s_per_step", "train_s_per_step", "cpu_s_per_step"):
                    mlflow.log_metric(f"{name}.{side}.{k}", a[side][k])
            for i, r in enumerate(a["repeats"]["ratio"]):
                mlflow.log_metric(f"{name}.ratio", r, step=i)
        for f in files.values():
            mlflow.log_artifact(str(f))
        mlflow.set_tag("s2d.bench", "speed_vs_trl")
        return run.info.run_id


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds of alternating arms (>= 5 for the report)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (or rollouts) per side per repeat")
    p.add_argument("--out", default="bench/results", help="folder for speed_vs_trl.{md,png,json}")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (see the module docstring)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded steps per side before the repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=40, help="completion length, both sides (tiny preset: 40)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--grpo-prompts", type=int, default=16)
    p.add_argument("--distill-prompts", type=int, default=64)
    p.add_argument("--arms", nargs="*", choices=ARMS, help="only these arms (default: all)")
    p.add_argument("--no-extra-engines", action="store_true", help="skip rollout engines other than HFSampler")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="after the timed repeats, profile one step per side (torch.profiler) into the results")
    p.add_argument("--notes", help="a markdown file appended to the results (profile findings)")
    p.add_argument("--no-mlflow", action="store_true")
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    return opts


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    opts = parse(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed: pip install -e '.[bench]' (or make bench-speed)", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    res = run_benchmark(opts, log=lambda s: print(s, flush=True))
    notes = Path(opts.notes).read_text() if opts.notes else ""
    files = write_outputs(res, Path(opts.out), notes)
    print(markdown(res).split("## Throughput", 1)[1])
    if not opts.no_mlflow:
        print(f"MLflow run {log_mlflow(res, files)} (experiment s2d-bench)")
    print("Wrote " + ", ".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
