"""Loss and advantage functions: pure tensor functions, the math next to the code.

Shapes: ``[B, T]`` per-token tensors, ``mask`` is 1 on tokens that count (completion tokens) and 0 on
prompt and padding. Log-probs are natural-log probabilities of the chosen tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["token-mean", "seq-mean", "dr_grpo"]


def grpo_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages. ``rewards`` is [groups, group_size].

    A_ij = r_ij - mean_j(r_i)                                  (Dr. GRPO: ``normalize_std=False``)
    A_ij = (r_ij - mean_j(r_i)) / (std_j(r_i) + eps)           (GRPO; std with Bessel's correction)

    A group whose rewards are all equal gets A = 0: it carries no signal.
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation, max_len: int | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: sum_bt l*m / sum_bt m                  (DAPO; TRL's and verl's default; ours)
    seq-mean:   mean_b( sum_t l*m / sum_t m )           (original GRPO; rows with no token count 0)
    dr_grpo:    sum_bt l*m / (B * max_len)              (Dr. GRPO; max_len defaults to T)
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if mode == "token-mean":
        return total / mask.sum().clamp(min=1.0)
    if mode == "seq-mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return per_seq.mean()
    if mode == "dr_grpo":
        return total / (per_token.shape[0] * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown aggregation '{mode}'")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) on tokens sampled from pi:
    k3 = exp(ref - logp) - (ref - logp) - 1  (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: Aggregation = "token-mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped importance-sampled policy-gradient loss (PPO/GRPO form).

    rho_t = exp(logp_t - old_logp_t)           (old = the sampler's log-probs: importance correction)
    l_t   = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t) [+ kl_coef * k3_t]

    ``advantages`` is [B, 1] (one per sequence, GRPO) or [B, T] (per token, on-policy distillation).
    Returns the aggregated loss and diagnostics (clip fraction, mean ratio, KL).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.expand_as(logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    stats = {}
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    if ref_logp is not None and kl_coef > 0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["kl_ref"] = float((kl * m).sum() / n)
    with torch.no_grad():
        stats["clip_frac"] = float(((clipped < unclipped).to(m.dtype) * m).sum() / n)
        stats["ratio_mean"] = float((ratio * m).sum() / n)
    return aggregate(per_token, mask, aggregation, max_len), stats


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position forward KL over the full vocabulary, [..., V] -> [...]:

    KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))

    Used by the warmup on teacher-generated sequences (mode-covering).
    """
    t_logp = F.log_softmax(at_least_f32(teacher_logits), dim=-1)
    s_logp = F.log_softmax(at_least_f32(student_logits), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position reverse KL over the full vocabulary, [..., V] -> [...]:

    KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))

    Back-propagated directly (analytic on-policy distillation), and the C2 diagnostic.
    """
    t_logp = F.log_softmax(at_least_f32(teacher_logits), dim=-1)
    s_logp = F.log_softmax(at_least_f32(student_logits), dim=-1)
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


# A teacher log-prob may be -inf (a token the teacher's processed distribution excludes), vLLM's -9999
# sentinel for it (JSON has no -inf), or NaN from a broken server. Decision (issue 23, item 13): such a value
# is FLOORED, never trusted and never fatal: log p_T(x_t) >= log p_S(x_t) + log(1e-8). The teacher then says
# "1e8 times less likely than the student thinks", a per-token penalty of at most log(1e8) = 18.4 nats at
# kl_coef = 1: the strongest signal a finite teacher gives, but bounded, so one such token cannot dominate the
# batch's advantages (-9999 would) or make the loss inf (-inf would, and the Divergence check would then fail
# the stage on every retry: the rollouts replay the same draws). Floored positions are counted
# (``teacher_floored`` in the stage's metrics) so a server that sends many of them is visible.
TEACHER_LOGP_FLOOR = math.log(1e-8)  # relative to the student's log-prob of the same token


def floor_teacher_logp(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher log-probs with every value below ``student_logp + log(1e-8)`` raised to it, the bool mask of
    the raised positions). -inf, the -9999 sentinel and NaN are all raised (NaN compares false)."""
    floor = student_logp.detach() + TEACHER_LOGP_FLOOR
    low = ~(teacher_logp >= floor)
    return torch.where(low, floor, teacher_logp), low


def aggregation_weights(mask: torch.Tensor, mode: Aggregation, max_len: int | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights w [B, T] with sum_bt w * l = :func:`aggregate` (l, mask, mode) for every l: each mode is
    a weighted sum of the masked per-token losses (what the fused :func:`chunked_kl` needs up front).

    token-mean: w = m / sum_bt m;   seq-mean: w = m / (B * sum_t m);   dr_grpo: w = m / (B * max_len)
    """
    m = mask.to(dtype)
    if mode == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if mode == "seq-mean":
        return m / (m.sum(1, keepdim=True).clamp(min=1.0) * m.shape[0])
    if mode == "dr_grpo":
        return m / (m.shape[0] * (max_len or m.shape[1]))
    raise ValueError(f"unknown aggregation '{mode}'")


KLDirection = Literal["forward", "reverse"]


def chunked_kl(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, weights: torch.Tensor,
               direction: KLDirection, temperature: float = 1.0, chunk: int = 512,
               targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weighted full-vocabulary KL between student and teacher next-token distributions, from hidden states and
    output-head weights, with at most ``chunk`` rows of [rows, V] logits in existence at a time (fused linear + KL).

    Rows r are token positions (flattened, only those that count). With u = h_S W_S^T / T and z = h_T W_T^T / T,
    p_S = softmax(u), p_T = softmax(z) over the V entries:

        forward  (2a):  KL_r = sum_v p_T (log p_T - log p_S),    dKL_r/du = p_S - p_T
        reverse  (2b):  KL_r = sum_v p_S (log p_S - log p_T),    dKL_r/du = p_S (log p_S - log p_T - KL_r)
        loss = sum_r weights_r KL_r                              (weights: :func:`aggregation_weights`)
        dloss/dh_S = G W_S,   dloss/dW_S = G^T h_S,   G_r = weights_r dKL_r/du / T      ([rows, V], one chunk at a time)

    Because the loss is a weighted sum with known weights, the gradients are accumulated chunk by chunk during the
    forward pass and only scaled by the incoming gradient in backward: no logits are recomputed or kept, and the peak
    grows with ``chunk`` x V (plus W_S's gradient), not with rows x V. The teacher side is a constant.
    Returns (loss, KL_r [rows] detached, log p_T(targets_r) [rows] detached or None when no targets).

    Logits are taken in the weights' dtype (bf16 under ``torch.autocast``) and softmaxed in at least float32.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"unknown KL direction '{direction}'")
    return _ChunkedKL.apply(h_s, w_s, h_t, w_t, weights, targets, direction, float(temperature), int(chunk))


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, weights, targets, direction, T, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(w_s.dtype, torch.float32)  # the softmax's dtype: float32, or float64 in the tests
        n = h_s.shape[0]
        kl = torch.zeros(n, dtype=acc, device=h_s.device)
        t_chosen = None if targets is None else torch.zeros(n, dtype=acc, device=h_s.device)
        grad_h = torch.zeros_like(h_s) if want_h else None
        grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if want_w else None
        for s in range(0, n, chunk):
            hs_c, ht_c = h_s[s : s + chunk].to(w_s.dtype), h_t[s : s + chunk].to(w_t.dtype)
            ls = F.linear(hs_c, w_s).to(acc).div_(T).log_softmax(-1)
            lt = F.linear(ht_c, w_t).to(acc).div_(T).log_softmax(-1)
            if t_chosen is not None:
                t_chosen[s : s + chunk] = lt.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            if direction == "forward":
                p = lt.exp()  # p_T
                kl[s : s + chunk] = lt.sub_(ls).mul_(p).sum(-1)  # in place: three [chunk, V] tensors at most
                del lt
                g = ls.exp_().sub_(p)  # p_S - p_T
            else:
                g = ls.sub(lt)  # log p_S - log p_T
                del lt
                p = ls.exp_()  # p_S
                k = (p * g).sum(-1)
                kl[s : s + chunk] = k
                g.sub_(k[:, None]).mul_(p)
            del p
            if not (want_h or want_w):
                continue
            g.mul_((weights[s : s + chunk].to(acc) / T)[:, None])
            if want_h:
                grad_h[s : s + chunk] = torch.matmul(g.to(w_s.dtype), w_s).to(grad_h.dtype)
            if want_w and grad_w.dtype == w_s.dtype and not torch.is_autocast_enabled(w_s.device.type):
                grad_w.addmm_(g.t(), hs_c)  # no [V, H] temporary per chunk
            elif want_w:
                grad_w += torch.matmul(g.t().to(w_s.dtype), hs_c)
            del g
        loss = (kl * weights.to(acc)).sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(kl) if t_chosen is None else ctx.mark_non_differentiable(kl, t_chosen)
        return loss, kl, t_chosen

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_t):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss.to(grad_w.dtype)).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None, None


def chunked_logprobs(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     chunk: int = 512) -> torch.Tensor:
    """log softmax(h_r W^T / T)[targets_r] per row r, [rows, H] x [V, H] -> [rows] (fused linear + log-softmax + gather),
    with at most ``chunk`` rows of [rows, V] logits in existence at a time, in forward and backward.

        z = h W^T / T,   logp_r = z_r[x_r] - logsumexp_v z_rv
        d logp_r / d z_r = onehot(x_r) - softmax(z_r)      -> dh = (g (onehot - p) / T) W,  dW = (g (onehot - p) / T)^T h

    Forward keeps only logsumexp per row; backward recomputes one chunk's logits at a time (the incoming gradient g
    of a policy loss is known only then). Logits in the weights' dtype (bf16 under autocast), softmax in >= float32.
    """
    return _ChunkedLogprobs.apply(h, w, targets, float(temperature), int(chunk))


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, T, chunk):
        acc = torch.promote_types(w.dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk):
            z = F.linear(h[s : s + chunk].to(w.dtype), w).to(acc).div_(T)
            lse[s : s + chunk] = torch.logsumexp(z, -1)
            out[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
        ctx.save_for_backward(h, w, targets, lse)
        dev = w.device.type
        ctx.T, ctx.chunk = T, chunk
        ctx.amp = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))  # backward recomputes alike
        return out

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse = ctx.saved_tensors
        with torch.autocast(ctx.amp[0], dtype=ctx.amp[1], enabled=ctx.amp[2]):
            return _ChunkedLogprobs._backward(ctx, h, w, targets, lse, grad)

    @staticmethod
    def _backward(ctx, h, w, targets, lse, grad):
        T, chunk = ctx.T, ctx.chunk
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=lse.dtype, device=w.device) if want_w else None
        for s in range(0, h.shape[0], chunk):
            h_c = h[s : s + chunk].to(w.dtype)
            g = F.linear(h_c, w).to(lse.dtype).div_(T).sub_(lse[s : s + chunk, None]).exp_()  # p
            g.neg_().scatter_add_(-1, targets[s : s + chunk, None], torch.ones_like(g[:, :1]))  # onehot - p
            g.mul_((grad[s : s + chunk].to(g.dtype) / T)[:, None])
            if want_h:
                grad_h[s : s + chunk] = torch.matmul(g.to(w.dtype), w).to(grad_h.dtype)
            if want_w and grad_w.dtype == w.dtype and not torch.is_autocast_enabled(w.device.type):
                grad_w.addmm_(g.t(), h_c)
            elif want_w:
                grad_w += torch.matmul(g.t().to(w.dtype), h_c)
        return grad_h, None if grad_w is None else grad_w.to(w.dtype), None, None, None


def reverse_kl_advantages(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 1.0,
    discount: float = 0.0,
) -> torch.Tensor:
    """Dense per-token reward of sampled-token on-policy distillation, used as the advantage.

    d_t = log p_T(x_t) - kl_coef * log p_S(x_t)        (x_t sampled from the student)
    A_t = d_t                                          (discount = 0, the default)
    A_t = sum_{s >= t} discount^(s-t) d_s              (discount > 0; masked positions contribute 0)

    E_{x~p_S}[-d] with kl_coef = 1 is the reverse KL, so maximising A lowers KL(p_S || p_T).
    Inputs are detached: the gradient flows through the importance ratio in :func:`policy_loss`.

    A teacher log-prob of -inf, vLLM's -9999 sentinel or NaN is floored at ``log p_S(x_t) + log(1e-8)``
    (:func:`floor_teacher_logp`): d_t >= -18.4 - (kl_coef - 1) log p_S(x_t), finite, never the whole batch's
    signal, never an inf loss that fails every retry. Masked positions are exactly 0 whatever they hold.
    """
    m = mask.to(teacher_logp.dtype)
    t_lp, _ = floor_teacher_logp(teacher_logp.detach(), student_logp.detach())
    d = torch.where(m > 0, t_lp - kl_coef * student_logp.detach(), torch.zeros_like(t_lp))
    if discount == 0.0:
        return d
    out = torch.zeros_like(d)
    running = torch.zeros_like(d[:, 0])
    for t in range(d.shape[1] - 1, -1, -1):
        running = d[:, t] + discount * running
        out[:, t] = running
    return out * m


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per target token: -sum_t m_t log p(x_t) / sum_t m_t."""
    return aggregate(-logp, mask, "token-mean")


# --------------------------------------------------------------------------- served / stored teacher signal
# The teacher side of these losses is what a served or stored teacher provides: its top-k token ids and
# log-probs per position ([..., k]), or the log-prob of one token per position. No [B, L, V] teacher tensor.


def topk_forward_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                    tail: bool = True) -> torch.Tensor:
    """Per-position forward KL against the teacher's top-k, [..., V] x [..., k] -> [...]:

    tail=True (the default; NeMo-RL / verl ``forward_kl_topk_tail``): the top-k plus one bucket holding
    the remaining mass of each distribution,
        KL = sum_{i<=k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
        p_tail = 1 - sum_{i<=k} p_i,   q_tail = 1 - sum_{i<=k} q_i        (q: student, at the same ids)
    This is the exact KL between the two distributions coarsened to k+1 outcomes: >= 0, equal to the
    full-vocabulary :func:`forward_kl` when k = V, and a lower bound of it otherwise (close when the
    teacher's tail mass is small).
    tail=False (verl ``forward_kl_topk``): the top-k terms only, sum_{i<=k} p_i (log p_i - log q_i).

    The student's tail is computed exactly in log space: ``log q_tail`` is the logsumexp of the student's
    log-probs over the COMPLEMENT of the teacher's ids (never ``log(1 - sum q_i)``, which in float32 rounds
    to a constant once q_tail < ~1e-7 and has no gradient there: an absorbing state for a peaked student
    under a broad teacher). Value and gradient match a float64 reference down to q_tail = 1e-12
    (tests/test_losses.py). The teacher's tail comes from its served top-k log-probs,
    ``log(-expm1(logsumexp(l)))``; a teacher tail below the rounding error of a k-term sum (k = V) is 0.

    ``teacher_logp`` are normalised log-probs (log softmax over the full vocabulary, as served); padded
    entries (fewer than k served) carry ``-inf`` and contribute 0.
    """
    s_logp = F.log_softmax(at_least_f32(student_logits), dim=-1)
    t_logp = teacher_logp.to(s_logp.dtype)
    s_k = s_logp.gather(-1, teacher_ids.clamp(min=0))
    p = t_logp.exp()
    kl = torch.where(p > 0, p * (t_logp - s_k), torch.zeros_like(p)).sum(-1)
    if not tail:
        return kl
    floor = 4 * t_logp.shape[-1] * torch.finfo(s_logp.dtype).eps
    t_rest = _log1m_sum_exp(t_logp)
    s_rest = _logsumexp_outside(s_logp, teacher_ids, (teacher_ids >= 0) & (p > 0))
    p_rest = t_rest.exp()
    return kl + torch.where(p_rest > floor, p_rest * (t_rest - s_rest), torch.zeros_like(p_rest))


def _logsumexp_outside(logp: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(sum_{v not in ids} exp(logp_v)) over the last dim, exactly: the complement's entries are summed,
    never subtracted from 1. An empty complement (k = V) gives a huge negative finite number (not -inf, so
    no NaN reaches the gradient; its term is weighted by a teacher tail of 0)."""
    # scatter_add, not scatter: a padded entry (id -1 -> 0, not valid) must not unset a real id 0
    member = torch.zeros_like(logp).scatter_add(-1, ids.clamp(min=0), valid.to(logp.dtype)) > 0
    return torch.logsumexp(logp.masked_fill(member, torch.finfo(logp.dtype).min), dim=-1)


def _log1m_sum_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_i exp(logp_i)) over the last dim, floored at log(tiny) when the mass is (numerically) all there."""
    lse = torch.logsumexp(logp, dim=-1).clamp(max=0.0)
    # clamped before the log: a finite gradient (0) where the remaining mass rounds to 0
    return torch.log((-torch.expm1(lse)).clamp(min=torch.finfo(logp.dtype).tiny))


def sampled_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(p_S || p_T) on tokens x_t sampled from the student:

        k1_t = log p_S(x_t) - log p_T(x_t),      E_{x ~ p_S}[k1] = KL(p_S || p_T)

    Fed by one served log-prob per position (``prompt_logprobs=0``). It is ``-d_t`` of
    :func:`reverse_kl_advantages` with kl_coef = 1: the on-policy stage's reward and its KL metric.
    """
    return student_logp - teacher_logp


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs) of the k most likely tokens of softmax(logits / T), [..., V] -> 2 x [..., k],
    most likely first (what vLLM's ``prompt_logprobs=k`` returns per position, ranks 1..k)."""
    logp = F.log_softmax(at_least_f32(logits) / temperature, dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    return ids, lp


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
