"""Scoring a checkpoint: avg@k, unbiased pass@k, greedy accuracy, and the C2 diagnostic.

(``stages/recipes/evaluate.py`` is the stage command that scores any checkpoint; every stage scores its output
with :func:`eval_metrics` too.)"""

from __future__ import annotations

from math import comb

import torch

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


@torch.no_grad()
def eval_metrics(rollouts, model, tok, problems: list[Problem]) -> dict[str, float]:
    """Sampled avg@k / pass@k (k = eval.samples, at the sampling temperature) and greedy accuracy.

    ``rollouts`` is the stage's :class:`stages.runtime.RolloutMaker` (sampling, task, config)."""
    ecfg = rollouts.cfg.eval
    task = rollouts.task
    problems = problems[: ecfg.problems]
    k = ecfg.samples
    repeated = [p for p in problems for _ in range(k)]
    # the same draws for every evaluation: one checkpoint always gets the same numbers, wherever evaluated
    settings = {"temperature": ecfg.temperature, "max_new_tokens": ecfg.max_new_tokens}  # None: sampling's
    ro = rollouts.sample(model, tok, repeated, step=0, salt="eval", **settings)
    texts = decode(tok, ro)
    rewards = [task.reward(t, p) for t, p in zip(texts, repeated)]
    correct = [rewards[i * k : (i + 1) * k] for i in range(len(problems))]
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
    with autocast(rollouts.cfg, rollouts.device):
        return sequence_kl(student, teacher, ro, rollouts.cfg.logprob_chunk)


def sequence_kl(student, teacher, ro: Rollouts, chunk: int = 512) -> float:
    """Mean KL(student || teacher) per completion token of ``ro`` (full vocabulary, at its temperature)."""
    return float(vocab_kl("reverse", student, teacher, ro, "token-mean", chunk).loss)
