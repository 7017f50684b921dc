"""Evaluation metrics: avg@k, unbiased pass@k, greedy accuracy, and the C2 diagnostic."""

from __future__ import annotations

from math import comb

import torch

from .losses import reverse_kl
from .rollout import hidden_states, map_positions
from .tasks import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(correct: list[list[float]], k: int) -> dict[str, float]:
    """avg@k = mean over problems of (correct samples / k) = pass@1 averaged over k samples."""
    n_prob = len(correct)
    out = {f"avg@{k}": sum(sum(c) / len(c) for c in correct) / n_prob}
    if k > 1:
        out[f"pass@{k}"] = sum(pass_at_k(len(c), int(sum(c)), k) for c in correct) / n_prob
    return out


@torch.no_grad()
def evaluate(run, model, tok, problems: list[Problem]) -> dict[str, float]:
    """Sampled avg@k / pass@k (k = eval.samples, at the sampling temperature) and greedy accuracy."""
    ecfg = run.cfg.eval
    problems = problems[: ecfg.problems]
    k = ecfg.samples
    from .runtime import decode  # runtime imports this module

    repeated = [p for p in problems for _ in range(k)]
    # the same draws for every evaluation: one checkpoint always gets the same numbers, wherever evaluated
    settings = {"temperature": ecfg.temperature, "max_new_tokens": ecfg.max_new_tokens}  # None: sampling's
    ro = run.sample(model, tok, repeated, step=0, salt="eval", **settings)
    texts = decode(tok, ro)
    rewards = [run.task.reward(t, p) for t, p in zip(texts, repeated)]
    correct = [rewards[i * k : (i + 1) * k] for i in range(len(problems))]
    out = summarize(correct, k)
    out["completion_len"] = float(ro.completion.sum()) / len(ro)
    if ecfg.greedy:
        g = run.sample(model, tok, problems, step=0, salt="eval-greedy", greedy=True, **settings)
        out["greedy"] = sum(run.task.reward(t, p) for t, p in zip(decode(tok, g), problems)) / len(problems)
    return out


@torch.no_grad()
def student_teacher_kl(run, student, teacher, tok, prompts: list[Problem], label: str = "c2") -> float:
    """C2: KL(student || teacher) per completion token, full vocabulary, on student rollouts."""
    prompts = prompts[: run.cfg.eval.c2_prompts]
    ro = run.sample(student, tok, prompts, step=0, salt=label)
    return sequence_kl(run, student, teacher, ro)


def sequence_kl(run, student, teacher, ro) -> float:
    T = run.cfg.sampling.temperature
    hs, ht = hidden_states(student, ro)[:, :-1], hidden_states(teacher, ro)[:, :-1]
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    kl = map_positions(lambda a, b: reverse_kl(s_head(a) / T, t_head(b) / T), run.cfg.logprob_chunk, hs, ht)
    mask = ro.completion[:, 1:].to(kl.dtype)
    return float((kl * mask).sum() / mask.sum().clamp(min=1))
