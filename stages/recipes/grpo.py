"""GRPO with a sparse verifier reward. One implementation, three uses:

- stage 1 ``teacher_rl``: the base teacher on the ``teacher_rl`` labeled split (C1 = its reward lift);
- stage 3 ``student_rl``: the distilled student on the held-out ``student_rl`` split;
- baseline ``direct_grpo``: the base student on both labeled splits, with the workflow's student steps.

    python -m stages teacher_rl --config tiny --root runs/demo
    python -m stages student_rl --config tiny --root runs/demo --student runs/demo/onpolicy_distill/model
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from .. import lora
from ..losses import grpo_advantages, policy_loss
from ..registry import STAGES
from ..rollout import decode, token_logprobs
from ..runtime import StageRun, seed_for
from ..scoring import eval_metrics


def main(run: StageRun, policy_uri: str, steps: int | None = None) -> dict:
    cfg, stage, spec = run.cfg, run.stage, STAGES[run.stage]
    g = getattr(cfg, stage)
    steps = cfg.steps(stage) if steps is None else steps
    datasets = {split: run.task.problems(split) for split in spec.splits}
    problems = [p for split in spec.splits for p in datasets[split]]
    model, tok = run.load_model(policy_uri, spec.trains)
    ref = None
    if g.kl_coef > 0:  # the initial policy; with LoRA the adapter's initial weights swapped in (no second base)
        ref = (
            lora.Reference(model)
            if lora.adapter_of(model)
            else contextlib.nullcontext(copy.deepcopy(model).requires_grad_(False))
        )
    eval_set = run.task.problems("eval")
    trainer = run.trainer("policy", model, g.optim, steps)  # restored from its last saved state, if any
    n_prompts, G = g.prompts_per_step, g.group_size

    def step_fn(step: int) -> dict:
        batch = run.batch_of(problems, n_prompts, step)
        group = [p for p in batch for _ in range(G)]
        t0 = time.perf_counter()
        ro = run.rollout_maker.sample(model, tok, group, step)
        gen_s = time.perf_counter() - t0
        texts = decode(tok, ro)
        rewards = torch.tensor([run.task.reward(t, p) for t, p in zip(texts, group)]).view(n_prompts, G)
        adv = grpo_advantages(rewards, g.normalize_std).view(-1, 1)
        run.record_rollouts(step, group, texts, rewards.view(-1).tolist())
        ref_lp = None
        if ref is not None:
            with torch.no_grad(), ref as ref_model:
                ref_lp = token_logprobs(ref_model, ro, cfg.logprob_chunk)
        losses, stats, norms = [], {}, []
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, stage, "minibatch", step))
        for _ in range(g.epochs):
            order = torch.randperm(len(ro), generator=gen) if g.minibatches > 1 else torch.arange(len(ro))
            for idx in order.chunk(g.minibatches):
                sub = ro.select(idx)
                logp = token_logprobs(model, sub, cfg.logprob_chunk)
                loss, stats = policy_loss(logp, sub.logprobs, adv[idx], sub.completion, g.clip_low, g.clip_high,
                                          g.aggregation, None if ref_lp is None else ref_lp[idx], g.kl_coef,
                                          max_len=cfg.sampling.max_new_tokens)
                norms.append(trainer.update(loss))
                losses.append(float(loss.detach()))
        n_tok = float(ro.completion.sum())
        return {
            "reward": float(rewards.mean()),
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            "entropy": float((ro.entropy * ro.completion).sum()) / n_tok,
            "completion_len": n_tok / len(ro),
            "groups_with_signal": float((rewards.std(1) > 0).float().mean()),
            "gen_tokens_per_s": n_tok / gen_s,
            "samples_per_s": len(ro) / (time.perf_counter() - t0),
            **stats,
        }

    with run.tracking(trainer, datasets):
        if spec.trains == "teacher" and "before" not in trainer.state:  # C1: the teacher's reward lift
            trainer.state["before"] = eval_metrics(run.rollout_maker, model, tok, eval_set)  # kept across a resume
        history = trainer.fit(step_fn)
        metrics = {f"eval.{k}": v for k, v in eval_metrics(run.rollout_maker, model, tok, eval_set).items()}
        if "before" in trainer.state:
            avg = f"avg@{cfg.eval.samples}"
            metrics |= {f"eval_before.{k}": v for k, v in trainer.state["before"].items()}
            metrics["c1_reward_lift"] = metrics[f"eval.{avg}"] - trainer.state["before"][avg]
        metrics["train.reward_last"] = history[-1]["reward"] if history else float("nan")
        used = {p.id for s in range(trainer.step) for p in run.batch_of(problems, n_prompts, s)}
        extra = {"steps": trainer.step, "labeled_examples": len(used),
                 "student_steps": trainer.step if spec.trains == "student" else 0}
        return run.publish({"model": model}, tok, metrics=metrics, extra=extra, history=history)
