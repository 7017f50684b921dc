"""Every loss and advantage function against float64 references computed independently (plain
Python loops over lists or hand-worked numbers), with masks and padding."""

import math

import pytest
import torch

from stages.losses import (
    aggregate,
    forward_kl,
    grpo_advantages,
    kl_k3,
    policy_loss,
    reverse_kl,
    reverse_kl_advantages,
    sft_loss,
)
from stages.scoring import pass_at_k, pass_metrics


def test_grpo_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    # group 1: mean 0.5, Bessel std = sqrt(((.5^2)*4)/3) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    expected = [[0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], [0.0] * 4]
    got = grpo_advantages(r, normalize_std=True, eps=0.0 + 1e-12)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    # Dr. GRPO: no std division; the all-equal group carries no signal either way
    assert grpo_advantages(r, normalize_std=False).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4]


def test_grpo_advantages_uniform_group_is_zero_with_eps():
    r = torch.zeros(3, 5, dtype=torch.float64)
    assert torch.equal(grpo_advantages(r), torch.zeros(3, 5, dtype=torch.float64))


L = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 7.0, 7.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # row 0: 3 tokens, row 1: 2 tokens, rest padding


def test_aggregate_modes_hand_computed():
    assert aggregate(L, M, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert aggregate(L, M, "seq-mean").item() == pytest.approx(((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2)
    assert aggregate(L, M, "dr_grpo").item() == pytest.approx(15 / (2 * 4))
    assert aggregate(L, M, "dr_grpo", max_len=10).item() == pytest.approx(15 / 20)
    with pytest.raises(ValueError):
        aggregate(L, M, "nope")


def test_aggregate_ignores_padding_values():
    garbage = L.clone()
    garbage[M == 0] = 1e6
    for mode in ("token-mean", "seq-mean", "dr_grpo"):
        assert aggregate(garbage, M, mode).item() == pytest.approx(aggregate(L, M, mode).item())


def _ref_policy_loss(logp, old, adv, mask, lo, hi, ref=None, beta=0.0):
    """Plain-Python float64 reference of the clipped objective, token-mean aggregation."""
    num, den = 0.0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            rho = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(rho, 1 - lo), 1 + hi)
            loss = -min(rho * a, clipped * a)
            if ref is not None:
                d = ref[b][t] - logp[b][t]
                loss += beta * (math.exp(d) - d - 1)
            num += loss
            den += 1
    return num / den


def test_policy_loss_matches_reference_with_clipping_and_padding():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    old = logp + (torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.5)  # ratios well outside the clip range
    adv = torch.tensor([[1.5], [-0.7], [0.3]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]])
    ref = logp - 0.1
    got, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean", ref, 0.05)
    want = _ref_policy_loss(logp.tolist(), old.tolist(), adv.squeeze(1).tolist(), mask.tolist(), 0.2, 0.28, ref.tolist(), 0.05)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert 0 < stats["clip_frac"] < 1


def test_policy_loss_gradient_is_advantage_weighted_when_on_policy():
    # rho = 1: d loss / d logp_t = -A / n_tokens for every unmasked token, 0 on padding
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, -1.0, 0.0]]


def test_policy_loss_per_token_advantages():
    logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp, logp, adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx((-1.0 + 3.0) / 2)


def test_clip_high_is_separate_from_clip_low():
    # positive advantage, ratio 1.5: clipped at 1 + clip_high; negative advantage, ratio 0.5: at 1 - clip_low
    logp = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    old = torch.zeros(1, 2, dtype=torch.float64)
    loss, _ = policy_loss(logp, old, torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.ones(1, 2), 0.1, 0.3, "seq-mean")
    assert loss.item() == pytest.approx((-1.3 + 0.9) / 2)


def test_k3_hand_computed():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert kl_k3(logp, ref).tolist() == pytest.approx(want)
    assert kl_k3(logp, logp).abs().max().item() == 0.0


def _ref_kl(p_logits, q_logits):
    """KL(p || q) in plain float64 Python."""
    def softmax(x):
        m = max(x)
        e = [math.exp(v - m) for v in x]
        s = sum(e)
        return [v / s for v in e]
    p, q = softmax(p_logits), softmax(q_logits)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_forward_and_reverse_kl_full_vocab():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    fwd, rev = forward_kl(s, t), reverse_kl(s, t)
    for b in range(2):
        for i in range(3):
            assert fwd[b, i].item() == pytest.approx(_ref_kl(t[b, i].tolist(), s[b, i].tolist()), rel=1e-6)
            assert rev[b, i].item() == pytest.approx(_ref_kl(s[b, i].tolist(), t[b, i].tolist()), rel=1e-6)
    assert forward_kl(s, s).abs().max().item() < 1e-6
    # masked aggregation of a per-position KL ignores padded positions entirely
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(fwd, mask, "token-mean").item() == pytest.approx((fwd[0, 0] + fwd[0, 1] + fwd[1, 0]).item() / 3)


def test_reverse_kl_gradient_matches_finite_differences():
    s = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 5, dtype=torch.float64)
    reverse_kl(s, t).sum().backward()
    eps = 1e-6
    for v in range(5):
        plus, minus = s.detach().clone(), s.detach().clone()
        plus[0, v] += eps
        minus[0, v] -= eps
        fd = (_ref_kl(plus[0].tolist(), t[0].tolist()) - _ref_kl(minus[0].tolist(), t[0].tolist())) / (2 * eps)
        assert s.grad[0, v].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_reverse_kl_advantages_per_token_and_discounted():
    t_lp = torch.tensor([[-1.0, -2.0, -0.5, -9.0]], dtype=torch.float64)
    s_lp = torch.tensor([[-1.5, -1.0, -0.5, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    d = [0.5, -1.0, 0.0, 0.0]
    assert reverse_kl_advantages(t_lp, s_lp, mask).tolist() == [d]
    # kl_coef scales the student's term only
    assert reverse_kl_advantages(t_lp, s_lp, mask, kl_coef=0.5).tolist() == [[-1.0 + 0.75, -2.0 + 0.5, -0.5 + 0.25, 0.0]]
    # discounted sum of future d's, gamma = 0.5; padding contributes nothing
    got = reverse_kl_advantages(t_lp, s_lp, mask, discount=0.5).tolist()[0]
    assert got == pytest.approx([0.5 + 0.5 * -1.0 + 0.25 * 0.0, -1.0 + 0.0, 0.0, 0.0])


def test_reverse_kl_advantage_expectation_is_minus_reverse_kl():
    # E_{x~p_S}[log p_T(x) - log p_S(x)] = -KL(p_S || p_T), exactly, by enumeration
    s_logits, t_logits = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)
    s_lp, t_lp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    adv = reverse_kl_advantages(t_lp[None], s_lp[None], torch.ones(1, 3))[0]
    expectation = (s_lp.exp() * adv).sum().item()
    assert expectation == pytest.approx(-reverse_kl(s_logits, t_logits).item())


def test_sft_loss_is_masked_nll():
    lp = torch.tensor([[-1.0, -3.0, -100.0]], dtype=torch.float64)
    assert sft_loss(lp, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # = 0.5
    assert pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_avg_at_k_is_mean_pass_at_1():
    s = pass_metrics([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], 4)
    assert s["avg@4"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------ top-k losses (served / stored teacher)
from stages.losses import sampled_reverse_kl, topk_forward_kl, topk_logprobs  # noqa: E402


def _ref_topk_kl(s_logits: list[float], t_logits: list[float], k: int, tail: bool) -> float:
    """Plain-Python float64 reference: softmax both, take the teacher's k most likely ids, KL over them
    (+ one bucket with the rest of each distribution)."""
    def softmax(z):
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(t_logits), softmax(s_logits)
    top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
    kl = sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in top)
    if tail:
        pr, qr = 1 - sum(p[i] for i in top), 1 - sum(q[i] for i in top)
        if pr > 1e-12:
            kl += pr * (math.log(pr) - math.log(qr))
    return kl


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_forward_kl_matches_float64_reference(k, tail):
    g = torch.Generator().manual_seed(k)
    s = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2
    ids, lp = topk_logprobs(t, k)
    got = topk_forward_kl(s, ids, lp, tail=tail)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    for b in range(2):
        for j in range(3):
            ref = _ref_topk_kl(s[b, j].tolist(), t[b, j].tolist(), k, tail)
            assert got[b, j].item() == pytest.approx(ref, abs=1e-12)


def test_topk_forward_kl_equals_full_vocab_at_k_equals_v_and_is_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    V = 50
    s = torch.randn(4, 6, V, generator=g, dtype=torch.float64)
    t = torch.randn(4, 6, V, generator=g, dtype=torch.float64) * 3
    full = forward_kl(s, t).double()  # forward_kl works in float32
    ids, lp = topk_logprobs(t, V)
    assert torch.allclose(topk_forward_kl(s, ids, lp), full, atol=1e-5)
    assert torch.allclose(topk_forward_kl(s, ids, lp, tail=False), full, atol=1e-5)
    # float32 student logits (the trainer's case): still equal at k = V, no inf from a rounded-away tail
    ids32, lp32 = topk_logprobs(t.float(), V)
    assert torch.allclose(topk_forward_kl(s.float(), ids32, lp32).double(), full, atol=1e-4)
    # the tail bucket coarsens the distribution: KL can only go down (data processing inequality)
    for k in (1, 5, 20):
        ids, lp = topk_logprobs(t, k)
        assert (topk_forward_kl(s, ids, lp) <= full + 1e-9).all()


def test_topk_forward_kl_close_to_full_for_large_k_on_peaked_teacher():
    """A peaked teacher (what an RL'd teacher is) over a 1000-entry vocabulary: k = 64 is within 1% of
    the full-vocabulary KL."""
    g = torch.Generator().manual_seed(1)
    V = 1000
    t = torch.randn(8, 16, V, generator=g, dtype=torch.float64) * 6  # peaked: most mass in a few tokens
    s = t + torch.randn(8, 16, V, generator=g, dtype=torch.float64) * 0.5  # a student near the teacher
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    full = (lt.exp() * (lt - ls)).sum(-1).mean()  # float64 full-vocabulary reference
    ids, lp = topk_logprobs(t, 64)
    assert (1 - lp.exp().sum(-1)).mean() > 1e-4  # the tail is not empty: the test is not k = V in disguise
    assert topk_forward_kl(s, ids, lp).mean().item() == pytest.approx(full.item(), rel=0.01)
    assert topk_forward_kl(s, ids, lp, tail=False).mean().item() == pytest.approx(full.item(), rel=0.05)


def test_topk_forward_kl_gradient_matches_full_vocab_at_k_equals_v_and_ignores_padding():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 9, generator=g, dtype=torch.float64)
    ids, lp = topk_logprobs(t, 9)
    (gk,) = torch.autograd.grad(topk_forward_kl(s, ids, lp).sum(), s)
    (gf,) = torch.autograd.grad(forward_kl(s, t).sum(), s)
    assert torch.allclose(gk, gf.double(), atol=1e-5)
    # a payload with fewer than k entries is padded with id -1 / log-prob -inf: same value as unpadded
    ids4, lp4 = topk_logprobs(t, 4)
    pad_ids = torch.cat([ids4, torch.full((3, 2), -1)], -1)
    pad_lp = torch.cat([lp4, torch.full((3, 2), -math.inf, dtype=torch.float64)], -1)
    assert torch.allclose(topk_forward_kl(s, pad_ids, pad_lp), topk_forward_kl(s, ids4, lp4), atol=1e-12)
    assert torch.isfinite(torch.autograd.grad(topk_forward_kl(s, pad_ids, pad_lp).sum(), s)[0]).all()


def test_sampled_reverse_kl_expectation_is_full_reverse_kl():
    """E_{x ~ p_S}[log p_S(x) - log p_T(x)], enumerated exactly in float64, is the full reverse KL."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    expectation = (ls.exp() * sampled_reverse_kl(ls, lt)).sum(-1)
    assert torch.allclose(expectation, reverse_kl(s, t).double(), atol=1e-6)
    # and it is minus the advantage of the sampled-token on-policy loss (kl_coef = 1)
    m = torch.ones(5, 7)
    assert torch.allclose(sampled_reverse_kl(ls, lt), -reverse_kl_advantages(lt, ls, m))


def test_topk_logprobs_ranks_and_temperature():
    z = torch.tensor([[0.0, 2.0, 1.0, -1.0]], dtype=torch.float64)
    ids, lp = topk_logprobs(z, 2, temperature=2.0)
    assert ids.tolist() == [[1, 2]]
    ref = [v / 2 for v in z[0].tolist()]
    lse = math.log(sum(math.exp(v) for v in ref))
    assert lp[0].tolist() == pytest.approx([ref[1] - lse, ref[2] - lse], abs=1e-12)


# ------------------------------------------------------------------ issue 23 item 12: the tail bucket, exactly


def _tail_case(mass: float, V: int = 64, k: int = 8, seed: int = 0):
    """A broad teacher (most of its mass outside its top-k) and a peaked student whose mass outside the
    teacher's top-k is exactly ``mass`` (float64 logits)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(3, V, generator=g, dtype=torch.float64) * 0.5
    ids, lp = topk_logprobs(t, k)
    s = torch.randn(3, V, generator=g, dtype=torch.float64)
    inside = torch.zeros(3, V, dtype=torch.bool).scatter(-1, ids, True)
    # shift the complement's logits so that its share of the student's mass is `mass`
    lse_in = torch.logsumexp(s.masked_fill(~inside, -math.inf), -1, keepdim=True)
    lse_out = torch.logsumexp(s.masked_fill(inside, -math.inf), -1, keepdim=True)
    s = torch.where(inside, s, s - lse_out + lse_in + math.log(mass / (1 - mass)))
    return s, ids, lp


def _ref_tail_kl(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """float64 reference: the coarsened KL with each tail SUMMED over the complement of the teacher's ids
    (never 1 - sum of the top-k), so it is exact at any tail mass."""
    q = torch.softmax(s, -1)
    p = lp.exp()
    inside = torch.zeros_like(s, dtype=torch.bool).scatter(-1, ids, True)
    q_tail = (q * ~inside).sum(-1)
    p_tail = 1 - p.sum(-1)
    return (p * (lp - torch.log(q.gather(-1, ids)))).sum(-1) + p_tail * (torch.log(p_tail) - torch.log(q_tail))


@pytest.mark.parametrize("mass", [1e-3, 1e-5, 1e-7, 1e-9, 1e-12])
def test_topk_tail_value_and_gradient_match_float64_at_tiny_student_tail_mass(mass):
    """float32 student logits, as the trainer has them: the tail bucket's value AND gradient stay those of
    the float64 reference when the student's tail mass is far below float32's resolution of 1 - sum(q)."""
    s64, ids, lp64 = _tail_case(mass)
    assert torch.softmax(s64, -1).mul(torch.ones_like(s64).scatter(-1, ids, 0)).sum(-1).allclose(
        torch.full((3,), mass, dtype=torch.float64), rtol=1e-6)
    ref_s = s64.clone().requires_grad_(True)
    ref = _ref_tail_kl(ref_s, ids, lp64)
    (ref_g,) = torch.autograd.grad(ref.sum(), ref_s)
    s32 = s64.float().requires_grad_(True)
    got = topk_forward_kl(s32, ids, lp64.float())
    (got_g,) = torch.autograd.grad(got.sum(), s32)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref.detach(), rtol=1e-5, atol=1e-5), (got, ref)
    # the tail's gradient pulls mass back into the complement (the old form's gradient there was 0)
    outside = torch.ones_like(s64, dtype=torch.bool).scatter(-1, ids, False)
    assert (ref_g[outside] < 0).all()
    assert torch.allclose(got_g.double(), ref_g, rtol=1e-4, atol=1e-6 * ref_g.abs().max().item())


def test_topk_tail_keeps_growing_as_the_student_tail_vanishes():
    """No plateau: the loss is p_tail * log(1 / q_tail) + const, so each decade of student tail mass adds
    p_tail * log(10) (the fp32 1 - sum form jumped to a constant below ~2e-7)."""
    vals = []
    for mass in (1e-6, 1e-8, 1e-10, 1e-12):
        s, ids, lp = _tail_case(mass)
        vals.append(topk_forward_kl(s.float(), ids, lp.float()).double())
    p_tail = 1 - lp.exp().sum(-1)
    for a, b in zip(vals, vals[1:]):
        assert torch.allclose(b - a, p_tail * 2 * math.log(10), rtol=1e-4)


def test_topk_tail_padding_never_unsets_a_real_id_0():
    """A padded entry's id -1 is clamped to 0 for the gather; the complement must still exclude a real id 0."""
    s = torch.randn(1, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lp = torch.log(torch.tensor([[0.5, 0.2]], dtype=torch.float64))
    ids = torch.tensor([[0, 3]])
    padded_ids, padded_lp = torch.cat([ids, torch.tensor([[-1, -1]])], -1), torch.cat([lp, torch.full((1, 2), -math.inf)], -1)
    ref = _ref_tail_kl(s, ids, lp)
    assert torch.allclose(topk_forward_kl(s, padded_ids, padded_lp), ref, atol=1e-12)
    assert torch.allclose(topk_forward_kl(s, ids, lp), ref, atol=1e-12)


# ------------------------------------------------------------------ issue 23 item 13: -inf / -9999 teacher log-probs
from stages.losses import TEACHER_LOGP_FLOOR, floor_teacher_logp  # noqa: E402


@pytest.mark.parametrize("bad", [-math.inf, -9999.0, math.nan])
def test_a_non_finite_or_sentinel_teacher_logprob_is_floored_relative_to_the_student(bad):
    """Decision: log p_T(x_t) is raised to log p_S(x_t) + log(1e-8): d_t = -18.42 at kl_coef 1, finite and
    bounded; the other positions, the loss and its gradient are those of the same batch without it."""
    g = torch.Generator().manual_seed(7)
    s_lp = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    t_lp = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)
    hurt = t_lp.clone()
    hurt[0, 2] = bad
    hurt[1, 0] = -math.inf  # a masked (prompt) position: 0 whatever it holds, never NaN from -inf * 0
    adv = reverse_kl_advantages(hurt, s_lp, mask)
    assert torch.isfinite(adv).all()
    assert TEACHER_LOGP_FLOOR == pytest.approx(math.log(1e-8))
    assert adv[0, 2].item() == pytest.approx(TEACHER_LOGP_FLOOR, abs=1e-12)
    assert adv[1, 0].item() == 0.0
    keep = torch.ones_like(mask, dtype=torch.bool)
    keep[0, 2] = False
    assert torch.equal(adv[keep], reverse_kl_advantages(t_lp, s_lp, mask)[keep])
    floored, low = floor_teacher_logp(hurt, s_lp)
    assert low.tolist() == [[False, False, True, False, False], [True, False, False, False, False]]
    # through the policy loss: finite value and gradient, the floored token bounded like any other
    logp = s_lp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, s_lp, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    assert grad.abs().max().item() <= -TEACHER_LOGP_FLOOR / mask.sum().item() + 1e-9
    # with discount: the floored value propagates as a number, not as inf
    assert torch.isfinite(reverse_kl_advantages(hurt, s_lp, mask, discount=0.9)).all()


def test_a_teacher_logprob_above_the_floor_is_left_alone():
    s_lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    t_lp = torch.tensor([[-1.0 + TEACHER_LOGP_FLOOR + 1e-9, -30.0]], dtype=torch.float64)
    floored, low = floor_teacher_logp(t_lp, s_lp)
    assert low.tolist() == [[False, True]] and floored[0, 0] == t_lp[0, 0]
    assert floored[0, 1].item() == pytest.approx(-2.0 + math.log(1e-8))


# ------------------------------------------------------------------ fused, chunked full-vocabulary KL (2a, 2b full, C2)
from bench._common import peak_alloc_bytes  # noqa: E402
from stages.losses import aggregation_weights, chunked_kl  # noqa: E402


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean", "dr_grpo"])
def test_aggregation_weights_reproduce_aggregate(mode):
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        per_token = torch.randn(2, 4, generator=g, dtype=torch.float64)
        w = aggregation_weights(M, mode, max_len=6, dtype=torch.float64)
        assert (w * per_token).sum().item() == pytest.approx(aggregate(per_token, M, mode, max_len=6).item(), rel=1e-12)
    with pytest.raises(ValueError):
        aggregation_weights(M, "nope")


def _kl_case(seed: int, n: int = 7, hidden: int = 5, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    h_s, w_s = torch.randn(n, hidden, **f64), torch.randn(vocab, hidden, **f64)
    h_t, w_t = torch.randn(n, hidden, **f64), torch.randn(vocab, hidden, **f64) * 1.5
    weights = torch.rand(n, **f64) * (torch.arange(n) % 3 != 1)  # some rows weigh 0
    targets = torch.randint(0, vocab, (n,), generator=g)
    return h_s, w_s, h_t, w_t, weights, targets


def _logits(h, w, T):
    return [[sum(a * b for a, b in zip(hr, wr)) / T for wr in w] for hr in h]


def _ref_chunked(h_s, w_s, h_t, w_t, weights, direction, T):
    """Plain-Python float64: the logits by hand, then the KL of each row by :func:`_ref_kl`, weighted."""
    zs, zt = _logits(h_s.tolist(), w_s.tolist(), T), _logits(h_t.tolist(), w_t.tolist(), T)
    rows = [_ref_kl(t, s) if direction == "forward" else _ref_kl(s, t) for s, t in zip(zs, zt)]
    return sum(w * r for w, r in zip(weights.tolist(), rows)), rows, zt


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_chunked_kl_values_match_float64_reference(direction, chunk, T):
    h_s, w_s, h_t, w_t, weights, targets = _kl_case(5)
    loss, kl, t_lp = chunked_kl(h_s, w_s, h_t, w_t, weights, direction, T, chunk, targets)
    want, rows, zt = _ref_chunked(h_s, w_s, h_t, w_t, weights, direction, T)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert kl.tolist() == pytest.approx(rows, rel=1e-10, abs=1e-14)
    for r, z in enumerate(zt):  # the teacher's log-prob of each row's target token
        lse = max(z) + math.log(sum(math.exp(v - max(z)) for v in z))
        assert t_lp[r].item() == pytest.approx(z[targets[r]] - lse, rel=1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_kl_gradients_match_float64_autograd_and_finite_differences(direction, chunk):
    h_s, w_s, h_t, w_t, weights, _ = _kl_case(6)
    T = 0.8
    a_h, a_w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    b_h, b_w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss, _, _ = chunked_kl(a_h, a_w, h_t, w_t, weights, direction, T, chunk)
    (loss * 2.5).backward()  # an upstream gradient other than 1 scales both
    # reference: float64 autograd through the unfused formula (log_softmax over explicit logits)
    ls, lt = torch.log_softmax(b_h @ b_w.T / T, -1), torch.log_softmax(h_t @ w_t.T / T, -1)
    rows = (lt.exp() * (lt - ls)).sum(-1) if direction == "forward" else (ls.exp() * (ls - lt)).sum(-1)
    ((rows * weights).sum() * 2.5).backward()
    assert torch.allclose(a_h.grad, b_h.grad, rtol=1e-10, atol=1e-13)
    assert torch.allclose(a_w.grad, b_w.grad, rtol=1e-10, atol=1e-13)
    # and one entry of each against central differences of the plain-Python reference
    eps = 1e-6
    for param, grad, idx in ((h_s, a_h.grad, (2, 3)), (w_s, a_w.grad, (4, 1))):
        plus, minus = param.clone(), param.clone()
        plus[idx] += eps
        minus[idx] -= eps
        args = lambda p: (p, w_s, h_t, w_t) if param is h_s else (h_s, p, h_t, w_t)  # noqa: E731
        fd = (_ref_chunked(*args(plus), weights, direction, T)[0] - _ref_chunked(*args(minus), weights, direction, T)[0]) / (
            2 * eps
        )
        assert grad[idx].item() == pytest.approx(2.5 * fd, rel=1e-5, abs=1e-9)


def test_chunked_kl_without_gradients_and_without_rows():
    h_s, w_s, h_t, w_t, weights, _ = _kl_case(7)
    with torch.no_grad():
        loss, kl, t_lp = chunked_kl(h_s.requires_grad_(), w_s, h_t, w_t, weights, "reverse", 1.0, 2)
    assert t_lp is None and not loss.requires_grad
    assert loss.item() == pytest.approx(_ref_chunked(h_s.detach(), w_s, h_t, w_t, weights, "reverse", 1.0)[0], rel=1e-12)
    empty = chunked_kl(h_s[:0].detach().requires_grad_(), w_s.requires_grad_(), h_t[:0], w_t, weights[:0], "forward")[0]
    empty.backward()
    assert empty.item() == 0.0 and (w_s.grad == 0).all()


def test_chunked_kl_peak_memory_grows_with_the_chunk_not_with_rows_x_vocab():
    """Forward + backward: the allocator's peak is set by chunk x V (plus the head's [V, H] gradient), whatever
    the number of rows; the unfused loss would hold several [rows, V] tensors."""
    V, H = 8192, 16

    def peak(rows: int, chunk: int, fused: bool = True) -> int:
        g = torch.Generator().manual_seed(rows)
        h_s = torch.randn(rows, H, generator=g).requires_grad_()
        w_s = torch.randn(V, H, generator=g).requires_grad_()
        h_t, w_t = torch.randn(rows, H, generator=g), torch.randn(V, H, generator=g)
        weights = torch.full((rows,), 1.0 / rows)

        def step():
            if fused:
                chunked_kl(h_s, w_s, h_t, w_t, weights, "reverse", 1.0, chunk)[0].backward()
            else:
                ((reverse_kl(h_s @ w_s.T, h_t @ w_t.T)) * weights).sum().backward()
        return peak_alloc_bytes(step)[0]

    cv = 32 * V * 4  # one [32, V] float32 tensor: 1 MiB
    small, large = peak(256, 32), peak(2048, 32)
    assert large - small < cv  # 8x the rows: the [rows, H] and [rows] tensors only (~0.25 MiB here)
    assert peak(256, 128) - small > 2 * 3 * cv  # 4x the chunk: at least two more [chunk, V] tensors' worth
    assert large < 2048 * V * 4  # below ONE [rows, V] logits tensor
    assert peak(2048, 32, fused=False) > 4 * large  # the unfused loss on the same rows


from stages.losses import chunked_logprobs  # noqa: E402


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_chunked_logprobs_values_and_gradients_match_float64_references(chunk, T):
    h, w, _, _, weights, targets = _kl_case(8)
    a_h, a_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = chunked_logprobs(a_h, a_w, targets, T, chunk)
    for r, z in enumerate(_logits(h.tolist(), w.tolist(), T)):  # plain Python: z[x] - logsumexp(z)
        lse = max(z) + math.log(sum(math.exp(v - max(z)) for v in z))
        assert got[r].item() == pytest.approx(z[targets[r]] - lse, rel=1e-12)
    # gradients of a non-linear function of the log-probs (what a clipped policy loss is) against autograd
    (torch.exp(got) * weights).sum().backward()
    b_h, b_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.log_softmax(b_h @ b_w.T / T, -1).gather(-1, targets[:, None])[:, 0]
    (torch.exp(ref) * weights).sum().backward()
    assert torch.allclose(a_h.grad, b_h.grad, rtol=1e-10, atol=1e-13)
    assert torch.allclose(a_w.grad, b_w.grad, rtol=1e-10, atol=1e-13)


def test_chunked_logprobs_peak_memory_grows_with_the_chunk():
    V, H = 8192, 16

    def peak(rows: int, chunk: int) -> int:
        g = torch.Generator().manual_seed(rows)
        h = torch.randn(rows, H, generator=g).requires_grad_()
        w = torch.randn(V, H, generator=g).requires_grad_()
        t = torch.randint(0, V, (rows,), generator=g)
        return peak_alloc_bytes(lambda: chunked_logprobs(h, w, t, 1.0, chunk).exp().sum().backward())[0]

    cv = 32 * V * 4
    small = peak(256, 32)
    assert peak(2048, 32) - small < cv
    assert peak(256, 128) - small >= 2 * 3 * cv  # 4x the chunk: two [chunk, V] tensors (logits, then their gradient)
    assert peak(2048, 32) < 2048 * V * 4
