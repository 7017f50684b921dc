"""Rollouts: the batch layout every engine returns, the shared sampling rule, and log-probs / KLs
computed chunk by chunk over positions.

Layout of a :class:`Rollouts` batch (``P`` = longest prompt, ``N`` = longest completion)::

    input_ids   [B, P+N]  prompts left-padded to P, completions right-padded after EOS
    attention   [B, P+N]  1 on real prompt and completion tokens
    completion  [B, P+N]  1 on completion tokens (EOS included), 0 on prompt and padding
    logprobs    [B, P+N]  the sampler's log-prob of each completion token (0 elsewhere)

Log-probs are of ``softmax(logits / temperature)``; the batch carries the temperature it was sampled at
and every log-prob or KL of it is taken at that temperature, so trainer and sampler cannot disagree.

Sampling semantics, shared by every native engine (``stages/engines/hf.py`` and ``stages/engines/static.py``):
one uniform per (row, step) is drawn up front from a CPU generator seeded with ``seed`` (:func:`draw_uniforms`),
and each token is the inverse CDF of ``softmax(logits / T)`` at that uniform (:func:`sample_tokens`); greedy
is argmax. The draws do not depend on the device, the
batch size or how rows are split across sub-batches or processes, so the same seed gives the same tokens
on every engine up to float ties, and a CUDA-graph-captured decode step needs no host sync.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .losses import (
    Aggregation,
    KLDirection,
    aggregation_weights,
    at_least_f32,
    chunked_kl,
    chunked_logprobs,
    forward_kl,
    reverse_kl,
)


@dataclass
class Rollouts:
    input_ids: torch.Tensor
    attention: torch.Tensor
    completion: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor  # [B, P+N] per-token entropy of the sampling distribution
    prompt_len: int
    temperature: float  # the sampling temperature; log-probs of this batch are always taken at it

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def completion_ids(self) -> list[list[int]]:
        ids = self.input_ids[:, self.prompt_len :]
        mask = self.completion[:, self.prompt_len :].bool()
        return [row[m].tolist() for row, m in zip(ids, mask)]

    def select(self, idx: torch.Tensor | slice) -> "Rollouts":
        return Rollouts(self.input_ids[idx], self.attention[idx], self.completion[idx], self.logprobs[idx],
                        self.entropy[idx], self.prompt_len, self.temperature)

    def to(self, device) -> "Rollouts":
        return Rollouts(self.input_ids.to(device), self.attention.to(device), self.completion.to(device),
                        self.logprobs.to(device), self.entropy.to(device), self.prompt_len, self.temperature)

    def positions(self) -> torch.Tensor:
        return (self.attention.cumsum(-1) - 1).clamp(min=0)


def draw_uniforms(seed: int, rows: int, steps: int) -> torch.Tensor:
    """U[0, 1) draws [rows, steps] (float32, CPU) from a generator seeded with ``seed``: row i, step t is
    the draw for token t of completion i, whatever the batch layout."""
    return torch.rand((rows, steps), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, greedy: bool = False):
    """One token per row from ``softmax(logits / T)`` by inverse CDF at ``u`` [B] (argmax when greedy).

    x = min{ i : sum_{j<=i} p_j > u * sum_j p_j }   (so P(x = i) = p_i; zero-probability tokens never win)

    Returns (token [B] long, log p(token) [B] float32, entropy [B] float32), all of softmax(logits / T).
    No host synchronisation: safe inside a captured CUDA graph.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    if greedy:
        tok = logp.argmax(-1)
    else:
        cdf = p.cumsum(-1)
        target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    lp = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    ent = -(p * logp).nan_to_num(0.0).sum(-1)
    return tok, lp, ent


def cache_kwarg(model) -> str:
    """The name of the KV-cache argument of ``model``'s forward: transformers renamed ``past_key_values`` to
    ``cache`` after 5.17 (the GPU machine's version). Passing the wrong name is silently swallowed by
    ``**kwargs``: every decode step would see one token without its prefix."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def stop_tensor(eos) -> torch.Tensor:
    """The ids that end a completion (one id or several: an instruct model's end-of-turn and end-of-text) as a
    1-D long tensor for ``torch.isin``."""
    ids = [eos] if isinstance(eos, int) else list(eos)
    if not ids:
        raise ValueError("no EOS id: generation could not stop")
    return torch.tensor(ids, dtype=torch.long)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest: (ids [B, P], attention [B, P])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS included)")
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        attn[i, P - len(p) :] = 1
    return ids, attn


class Sampler(ABC):
    """What every rollout engine provides (``stages/engines/``): ``hf`` (any HF model, CPU-friendly), ``static``
    (static KV cache, CUDA graphs on GPUs) and ``vllm`` (colocated vLLM)."""

    @abstractmethod
    def generate(self, model, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                 greedy: bool = False, seed: int = 0, first_row: int = 0) -> Rollouts:
        """Sample one completion per prompt (token ids, BOS included); same seed, same tokens.

        ``first_row``: these prompts are rows ``first_row...`` of a larger batch split across processes;
        row i uses the draws of row ``first_row + i``, so the split does not change the tokens."""


def assemble(ids, attn, comp, lps, ents, temperature: float) -> Rollouts:
    """The :class:`Rollouts` layout from prompt ids [B, P], attention [B, P+N] and per-step outputs [B, N]."""
    B, P = ids.shape
    zeros = torch.zeros((B, P), device=ids.device)
    return Rollouts(
        input_ids=torch.cat([ids, comp], 1),
        attention=attn,
        completion=torch.cat([torch.zeros_like(ids), attn[:, P:]], 1),
        logprobs=torch.cat([zeros, lps.float()], 1),
        entropy=torch.cat([zeros, ents.float()], 1),
        prompt_len=P,
        temperature=temperature,
    )


def concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack batches with different prompt/completion lengths into one layout (one temperature)."""
    if len({r.temperature for r in parts}) > 1:
        raise ValueError("cannot concatenate rollouts sampled at different temperatures")
    P = max(r.prompt_len for r in parts)
    N = max(r.input_ids.shape[1] - r.prompt_len for r in parts)

    def fit(t, r, fill):
        left = P - r.prompt_len
        right = N - (t.shape[1] - r.prompt_len)
        return F.pad(t, (left, right), value=fill)

    return Rollouts(
        torch.cat([fit(r.input_ids, r, pad_id) for r in parts]),
        torch.cat([fit(r.attention, r, 0) for r in parts]),
        torch.cat([fit(r.completion, r, 0) for r in parts]),
        torch.cat([fit(r.logprobs, r, 0.0) for r in parts]),
        torch.cat([fit(r.entropy, r, 0.0) for r in parts]),
        P,
        parts[0].temperature,
    )


def hidden_states(model, batch: Rollouts) -> torch.Tensor:
    """Last hidden states [B, L, H] of the decoder (no logits materialised).

    A model being trained runs its top-level forward (so DDP / FSDP / DeepSpeed hooks see the call) with
    no logits kept; its per-layer states are the activations backward keeps anyway. A frozen model
    (no parameter requires grad: the teacher, a reference policy) runs its decoder under
    ``torch.inference_mode`` and returns an ordinary tensor (a clone), usable as a constant in autograd.
    """
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention, position_ids=batch.positions(), use_cache=False)
    if not any(p.requires_grad for p in model.parameters()):
        with torch.inference_mode():
            h = model.get_decoder()(**kw).last_hidden_state
        return h.clone()
    if not torch.is_grad_enabled():
        return model.get_decoder()(**kw).last_hidden_state
    none = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
    return model(**kw, logits_to_keep=none, output_hidden_states=True).hidden_states[-1]


def map_positions(fn, chunk: int, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to slices of ``tensors`` along dim 1 and concatenate.

    With gradients on, each slice is recomputed in backward (activation checkpointing), so only
    one slice's [B, chunk, vocab] logits exist at a time, in forward and in backward.
    """
    L = tensors[0].shape[1]
    outs = []
    for s in range(0, L, chunk):
        sl = [t[:, s : s + chunk] for t in tensors]
        if torch.is_grad_enabled() and any(t.requires_grad for t in sl):
            outs.append(checkpoint(fn, *sl, use_reentrant=False))
        else:
            outs.append(fn(*sl))
    return torch.cat(outs, 1)


def token_logprobs(model, batch: Rollouts, chunk: int = 512) -> torch.Tensor:
    """log softmax(logits/T)[x_t] for every completion token t, shape [B, L], 0 on prompt and padding; T is the
    batch's sampling temperature.

    Entry t scores token ``input_ids[:, t]`` from the prefix before it, aligned with ``batch.completion`` and
    ``batch.logprobs``. Only completion positions reach the output head (every caller masks the rest out), ``chunk``
    tokens of [tokens, V] logits at a time (:func:`chosen_logprobs`).
    """
    rows, B, L = _completion_rows(batch)
    h = hidden_states(model, batch)[:, :-1].reshape(B * (L - 1), -1)[rows]
    lp = chosen_logprobs(model.get_output_embeddings(), h, batch.input_ids[:, 1:].reshape(-1)[rows], batch.temperature, chunk)
    return _scatter(lp, rows, B, L)


def _completion_rows(batch: Rollouts) -> tuple[torch.Tensor, int, int]:
    """Indices into the flattened [B * (L - 1)] predicting positions whose next token is a completion token."""
    B, L = batch.input_ids.shape
    return batch.completion[:, 1:].reshape(-1).nonzero().squeeze(-1), B, L


def _scatter(v: torch.Tensor, rows: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Per-row values back into the [B, L] layout (entry t for the token at t; 0 elsewhere)."""
    full = torch.zeros(B * (L - 1), dtype=v.dtype, device=v.device)
    full = full.index_put((rows,), v)  # out of place: differentiable in v
    return F.pad(full.view(B, L - 1), (1, 0))


class VocabKL(NamedTuple):
    loss: torch.Tensor  # the aggregated KL (differentiable in the student)
    kl: torch.Tensor  # [B, L] per-token KL, detached; entry t is at the position predicting token t (0 off completion)
    teacher_logp: torch.Tensor  # [B, L] the teacher's log p(x_t) at the batch's temperature, detached (0 off completion)


def vocab_kl(direction: KLDirection, student, teacher, batch: Rollouts, aggregation: Aggregation = "token-mean",
             chunk: int = 512, max_len: int | None = None) -> VocabKL:
    """The full-vocabulary KL between student and teacher next-token distributions (both at the batch's
    temperature) on every completion token of ``batch``, aggregated like :func:`stages.losses.aggregate`.

    ``direction``: ``forward`` KL(p_T || p_S) (2a) or ``reverse`` KL(p_S || p_T) (2b, C2). Only completion positions
    are scored (prompt and padding never count), flattened into rows, ``chunk`` rows of [rows, V] logits at a time:
    :func:`stages.losses.chunked_kl` fuses both output heads with the KL and its gradient, so neither [B, L, V]
    tensor exists, in forward or backward. An output head that is not a plain bias-free ``nn.Linear`` (or a
    ZeRO-3-partitioned one) takes the unfused path: the same rows through the head modules, recomputed in backward.
    The teacher's log-probs of the batch's tokens come from the same logits (no second teacher head pass).
    """
    T = batch.temperature
    rows, B, L = _completion_rows(batch)
    acc = torch.promote_types(next(student.parameters()).dtype, torch.float32)  # float64 models: float64 weights
    w = aggregation_weights(batch.completion[:, 1:], aggregation, max_len, acc).reshape(-1)[rows]
    ht = hidden_states(teacher, batch)[:, :-1].reshape(B * (L - 1), -1)[rows]  # a frozen teacher: inference_mode
    hs = hidden_states(student, batch)[:, :-1].reshape(B * (L - 1), -1)[rows]
    targets = batch.input_ids[:, 1:].reshape(-1)[rows]
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    if _fusable(s_head) and _fusable(t_head):
        loss, kl, t_lp = chunked_kl(hs, s_head.weight, ht, t_head.weight, w, direction, T, chunk, targets)
    else:
        fn = forward_kl if direction == "forward" else reverse_kl

        def per_row(a, b, tgt):
            zt = t_head(b) / T
            return torch.stack([fn(s_head(a) / T, zt), F.log_softmax(zt.float(), -1).gather(-1, tgt[..., None])[..., 0]], -1)

        out = map_positions(per_row, chunk, hs[None], ht[None], targets[None])[0]
        kl, t_lp = out[:, 0], out[:, 1].detach()
        loss = (kl * w.to(kl.dtype)).sum()
        kl = kl.detach()
    return VocabKL(loss, _scatter(kl, rows, B, L), _scatter(t_lp, rows, B, L))


def _fusable(head) -> bool:
    """A head :func:`stages.losses.chunked_kl` can read directly: a bias-free Linear with its full weight here."""
    return type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id")


def chosen_logprobs(head, h: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """log softmax(head(h_t) / T)[targets_t] for hidden states ``h`` [..., H] already aligned with ``targets`` [...]
    (h_t predicts targets_t): positions flattened into rows, ``chunk`` rows of [rows, V] logits at a time, fused with
    the head (:func:`stages.losses.chunked_logprobs`) when it is a plain Linear, else through the head module with
    each chunk recomputed in backward."""
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if _fusable(head):
        return chunked_logprobs(flat_h, head.weight, flat_t, temperature, chunk).view(targets.shape)

    def fn(h_c, t_c):
        return F.log_softmax(at_least_f32(head(h_c)) / temperature, dim=-1).gather(-1, t_c.unsqueeze(-1)).squeeze(-1)

    return map_positions(fn, chunk, flat_h[None], flat_t[None])[0].view(targets.shape)


def decode(tok, rollouts: Rollouts) -> list[str]:
    return tok.batch_decode(rollouts.completion_ids(), skip_special_tokens=True)


def teacher_forced(tok, prompts: list[list[int]], completions: list[str], prompt_len: int | None = None) -> Rollouts:
    """A :class:`Rollouts` batch for given texts (completion + EOS), for supervised losses."""
    comp = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    P = prompt_len or max(len(p) for p in prompts)
    N = max(len(c) for c in comp)
    B = len(prompts)
    ids = torch.full((B, P + N), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((B, P + N), dtype=torch.long)
    cmask = torch.zeros((B, P + N), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comp)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(c)] = torch.tensor(c)
        attn[i, P - len(p) : P + len(c)] = 1
        cmask[i, P : P + len(c)] = 1
    zeros = torch.zeros((B, P + N))
    return Rollouts(ids, attn, cmask, zeros, zeros.clone(), P, temperature=1.0)
