"""Stage 2b: on-policy distillation. The student samples; the teacher scores every token.

Sampled-token form (default; tinker-cookbook / verl policy-gradient style):
    d_t = log p_T(x_t) - kl_coef * log p_S(x_t),  x ~ p_S       (dense per-token reward)
    loss = clipped importance-sampled policy gradient with advantage A_t = d_t
Full-vocabulary form (``onpolicy_distill.form: full``; TRL GKD beta=1):
    loss = mean over completion tokens of KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))

Prompts only (no answers): the reward is the teacher, not a verifier.

``onpolicy_distill.take_unused_warmup``: when the student input is a kl_warmup output that stopped early
(C2 reached its target or stopped improving), this stage runs ``steps`` plus the steps the warmup left
unused (:func:`unused_warmup_steps`), so the student's total, and the equal-budget comparison with direct
GRPO, stays what the config plans.

    python -m stages onpolicy_distill --config tiny --root runs/demo \
        --teacher runs/demo/teacher_rl/model --student runs/demo/kl_warmup/model
"""

from __future__ import annotations

import logging
import time

from .. import artifacts, cost, storage
from ..losses import floor_teacher_logp, policy_loss, reverse_kl_advantages
from ..rollout import decode, token_logprobs, vocab_kl
from ..runtime import StageRun
from ..scoring import eval_metrics, student_teacher_kl
from ..teacher import open_teacher, sampled_c2

log = logging.getLogger("stages")


def main(run: StageRun, teacher_uri: str, student_uri: str) -> dict:
    cfg, d = run.cfg, run.cfg.onpolicy_distill
    student, tok = run.load_model(student_uri, "student")
    # teacher.engine local: the model in this process; server: log-probs served by vLLM (never loaded here)
    scorer, teacher = open_teacher(run, teacher_uri, tok, student)
    prompts = run.task.problems("prompts")
    taken = unused_warmup_steps(student_uri, cfg.kl_warmup.steps) if d.take_unused_warmup else 0
    if taken:
        log.info("onpolicy_distill: %d steps + %d left unused by kl_warmup", d.steps, taken)
    # the whole count from the start: the LR schedule and a resumed run see the same number
    trainer = run.trainer("student", student, d.optim, d.steps + taken)  # restored from its last saved state, if any
    chunk = cfg.logprob_chunk

    def c2(label: str = "c2") -> float:  # KL(student || teacher) on student rollouts
        if teacher is None:  # served: the sampled-token estimate (no full vocabulary over HTTP)
            return sampled_c2(run.rollout_maker, student, tok, scorer, prompts, label)
        return student_teacher_kl(run.rollout_maker, student, teacher, tok, prompts, label)

    def step_fn(step: int) -> dict:
        batch = run.batch_of(prompts, d.prompts_per_step, step)
        t0 = time.perf_counter()
        ro = run.rollout_maker.sample(student, tok, batch, step)
        mask = ro.completion
        if d.form == "sampled":
            t_lp = scorer.logprobs(ro)  # one log-prob per position: prompt_logprobs=0 when served
            adv = reverse_kl_advantages(t_lp, ro.logprobs, mask, d.kl_coef, d.discount)
            # -inf / vLLM's -9999 / NaN: floored (losses.floor_teacher_logp), counted, never fatal
            t_lp, low = floor_teacher_logp(t_lp, ro.logprobs)
            floored = int((low & mask.bool()).sum())
            trainer.state["teacher_floored"] = trainer.state.get("teacher_floored", 0) + floored
            logp = token_logprobs(student, ro, chunk)
            loss, stats = policy_loss(logp, ro.logprobs, adv, mask, d.clip_low, d.clip_high, d.aggregation,
                                      max_len=cfg.sampling.max_new_tokens)
        else:
            floored = 0
            # Completion positions only, chunk by chunk, both output heads fused with the KL (no [B, L, V] logits);
            # the teacher's log-probs of the sampled tokens come from the same teacher logits, for the metrics below.
            cost.teacher_scored(ro)
            kl = vocab_kl("reverse", student, teacher, ro, d.aggregation, chunk, cfg.sampling.max_new_tokens)
            loss, t_lp, stats = kl.loss, kl.teacher_logp, {}
        norm = trainer.update(loss)
        run.record_rollouts(step, batch, decode(tok, ro))
        n_tok = mask.sum().clamp(min=1)
        return {
            "loss": float(loss.detach()),
            "grad_norm": norm,
            # Monte-Carlo estimate of KL(p_S || p_T) per token on the student's own samples
            "kl": float(((ro.logprobs - t_lp) * mask).sum() / n_tok),
            "teacher_logp": float((t_lp * mask).sum() / n_tok),
            "entropy": float((ro.entropy * mask).sum() / n_tok),
            "teacher_floored": floored,
            "completion_len": float(n_tok) / len(ro),
            "samples_per_s": len(ro) / (time.perf_counter() - t0),
            **stats,
        }

    with run.tracking(trainer, {"prompts": prompts}):
        if "c2_before" not in trainer.state:  # a resumed run keeps the value measured before any update
            trainer.state["c2_before"] = c2()
        history = trainer.fit(step_fn)
        metrics = {f"eval.{k}": v for k, v in eval_metrics(run.rollout_maker, student, tok, run.task.problems("eval")).items()}
        metrics |= {"c2_before": trainer.state["c2_before"], "c2_after": c2()}
        extra = {"steps": trainer.step, "labeled_examples": 0, "student_steps": trainer.step,
                 "teacher_engine": scorer.engine, "c2_estimator": "full" if teacher is not None else "sampled",
                 "teacher_logp_floored": trainer.state.get("teacher_floored", 0), "unused_warmup_steps": taken}
        return run.publish({"model": student}, tok, metrics=metrics, extra=extra, history=history)


def unused_warmup_steps(student_uri: str, configured: int) -> int:
    """The steps stage 2a left unused when ``student_uri`` is its published output: its most (``max_steps``
    in its manifest; ``configured``, this config's ``kl_warmup.steps``, for a manifest written before that
    was recorded) minus the steps it did. 0 when the input is not a kl_warmup output (no warmup planned, an
    explicit checkpoint) or the warmup ran to the end. The input digest in the stage hash covers the manifest,
    so a 2a that ends differently re-runs 2b."""
    if storage.uri_kind(student_uri) not in ("local", "s3"):  # a hub id or registry version: no manifest of 2a
        return 0
    found = artifacts.find_manifest(student_uri)
    if found is None or found[1].get("stage") != "kl_warmup" or not found[1].get("stopped_early"):
        return 0
    m = found[1]
    return max(0, int(m.get("max_steps", configured)) - int(m.get("student_steps", m.get("steps", 0))))
