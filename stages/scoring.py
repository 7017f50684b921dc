"""Scoring a checkpoint: avg@k, unbiased pass@k, greedy accuracy, per-problem scores and paired confidence
intervals between two checkpoints (the promotion gate), and the C2 diagnostic.

(``stages/recipes/evaluate.py`` is the stage command that scores any checkpoint; every stage scores its output
with :func:`eval_metrics` too.)"""

from __future__ import annotations

from math import comb

import torch

from . import cost
from .rollout import Rollouts, decode, vocab_kl
from .task_contract import Problem
from .trainer import autocast


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_metrics(correct: list[list[float]], k: int) -> dict[str, float]:
    """avg@k = mean over problems of (correct samples / k) = pass@1 averaged over k samples."""
    n_prob = len(correct)
    out = {f"avg@{k}": sum(sum(c) / len(c) for c in correct) / n_prob}
    if k > 1:
        out[f"pass@{k}"] = sum(pass_at_k(len(c), int(sum(c)), k) for c in correct) / n_prob
    return out


def _sampled(rollouts, model, tok, problems: list[Problem]):
    """The evaluation draws: k = eval.samples completions of each problem, their rewards per problem."""
    ecfg = rollouts.cfg.eval
    k = ecfg.samples
    repeated = [p for p in problems for _ in range(k)]
    # the same draws for every evaluation: one checkpoint always gets the same numbers, wherever evaluated
    settings = {"temperature": ecfg.temperature, "max_new_tokens": ecfg.max_new_tokens}  # None: sampling's
    ro = rollouts.sample(model, tok, repeated, step=0, salt="eval", **settings)
    rewards = [rollouts.task.reward(t, p) for t, p in zip(decode(tok, ro), repeated)]
    return [rewards[i * k : (i + 1) * k] for i in range(len(problems))], ro


@torch.no_grad()
def problem_scores(rollouts, model, tok, problems: list[Problem]) -> list[float]:
    """Each problem's share of correct samples among its k (its avg@k): the same draws as :func:`eval_metrics`,
    so two checkpoints scored here are paired problem by problem (and share their random numbers)."""
    correct, _ = _sampled(rollouts, model, tok, problems[: rollouts.cfg.eval.problems])
    return [sum(c) / len(c) for c in correct]


def paired_interval(new: list[float], old: list[float], confidence: float = 0.95, method: str = "bootstrap",
                    resamples: int = 10000, seed: int = 0) -> dict:
    """The mean of the paired differences ``new - old`` (one per problem) with a ``confidence`` interval:
    a percentile bootstrap over problems (seeded: the same inputs give the same interval) or a paired t
    interval. Returns ``diff``, ``lo``, ``hi``, ``n``, both means, ``confidence`` and ``method``."""
    import numpy as np

    a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired scores need the same problems: {a.shape} vs {b.shape}")
    d = a - b
    n, mean = len(d), float(d.mean())
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = np.concatenate([d[rng.integers(0, n, (min(1000, resamples - i), n))].mean(1)
                                for i in range(0, resamples, 1000)])
        lo, hi = (float(q) for q in np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2]))
    elif method == "t":
        sd = float(d.std(ddof=1)) if n > 1 else None
        if sd is None:  # one problem: no interval at all
            lo, hi = -1.0, 1.0
        elif sd == 0.0:  # every difference the same
            lo = hi = mean
        else:
            from scipy import stats  # an MLflow dependency

            half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / n**0.5
            lo, hi = mean - half, mean + half
    else:
        raise ValueError(f"method must be bootstrap or t, not {method!r}")
    return {"diff": mean, "lo": min(lo, mean), "hi": max(hi, mean), "n": n, "new": float(a.mean()), "old": float(b.mean()),
            "confidence": confidence, "method": method}


@torch.no_grad()
def eval_metrics(rollouts, model, tok, problems: list[Problem]) -> dict[str, float]:
    """Sampled avg@k / pass@k (k = eval.samples, at the sampling temperature) and greedy accuracy.

    ``rollouts`` is the stage's :class:`stages.runtime.RolloutMaker` (sampling, task, config)."""
    ecfg = rollouts.cfg.eval
    task = rollouts.task
    problems = problems[: ecfg.problems]
    k = ecfg.samples
    settings = {"temperature": ecfg.temperature, "max_new_tokens": ecfg.max_new_tokens}  # None: sampling's
    correct, ro = _sampled(rollouts, model, tok, problems)
    out = pass_metrics(correct, k)
    out["completion_len"] = float(ro.completion.sum()) / len(ro)
    if ecfg.greedy:
        g = rollouts.sample(model, tok, problems, step=0, salt="eval-greedy", greedy=True, **settings)
        out["greedy"] = sum(task.reward(t, p) for t, p in zip(decode(tok, g), problems)) / len(problems)
    return out


@torch.no_grad()
def student_teacher_kl(rollouts, student, teacher, tok, prompts: list[Problem], label: str = "c2") -> float:
    """C2: KL(student || teacher) per completion token, full vocabulary, on student rollouts."""
    prompts = prompts[: rollouts.cfg.eval.c2_prompts]
    ro = rollouts.sample(student, tok, prompts, step=0, salt=label)
    cost.teacher_scored(ro)
    with autocast(rollouts.cfg, rollouts.device):
        return sequence_kl(student, teacher, ro, rollouts.cfg.logprob_chunk)


def sequence_kl(student, teacher, ro: Rollouts, chunk: int = 512) -> float:
    """Mean KL(student || teacher) per completion token of ``ro`` (full vocabulary, at its temperature)."""
    return float(vocab_kl("reverse", student, teacher, ro, "token-mean", chunk).loss)
