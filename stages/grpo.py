"""GRPO with a sparse verifier reward. One implementation, three uses:

- stage 1 ``teacher_rl``: the base teacher on the ``teacher_rl`` labeled split (C1 = its reward lift);
- stage 3 ``student_rl``: the distilled student on the held-out ``student_rl`` split;
- baseline ``direct_grpo``: the base student on both labeled splits, with the workflow's student steps.

    python -m stages teacher_rl --config tiny --root runs/demo
    python -m stages student_rl --config tiny --root runs/demo --student runs/demo/onpolicy_distill/model
"""

from __future__ import annotations

import copy
import time

import torch

from .evaluation import evaluate
from .losses import grpo_advantages, policy_loss
from .rollout import token_logprobs
from .runtime import StageRun, decode, seed_for

SPLITS = {"teacher_rl": ["teacher_rl"], "student_rl": ["student_rl"], "direct_grpo": ["teacher_rl", "student_rl"]}
ROLE = {"teacher_rl": "teacher", "student_rl": "student", "direct_grpo": "student"}


def run(run: StageRun, policy_uri: str, steps: int | None = None) -> dict:
    cfg, stage = run.cfg, run.stage
    g = getattr(cfg, stage)
    steps = steps if steps is not None else (g.steps if g.steps is not None else cfg.student_step_budget())
    problems = [p for split in SPLITS[stage] for p in run.task.problems(split)]
    model, tok = run.load_model(policy_uri, ROLE[stage])
    ref = copy.deepcopy(model).requires_grad_(False) if g.kl_coef > 0 else None
    eval_set = run.task.problems("eval")
    trainer = run.trainer("policy", model, g.optim, steps, {s: run.task.problems(s) for s in SPLITS[stage]})
    if stage == "teacher_rl":  # C1: the teacher's reward lift from RL
        if "before" not in trainer.state:  # a resumed run keeps the value measured before any update
            trainer.state["before"] = evaluate(run, model, tok, eval_set)
    T, n_prompts, G = cfg.sampling.temperature, g.prompts_per_step, g.group_size

    def step_fn(step: int) -> dict:
        batch = run.batch_of(problems, n_prompts, step)
        group = [p for p in batch for _ in range(G)]
        t0 = time.perf_counter()
        ro = run.sample(model, tok, group, step)
        gen_s = time.perf_counter() - t0
        texts = decode(tok, ro)
        rewards = torch.tensor([run.task.reward(t, p) for t, p in zip(texts, group)]).view(n_prompts, G)
        adv = grpo_advantages(rewards, g.normalize_std).view(-1, 1)
        run.record_rollouts(step, group, texts, rewards.view(-1).tolist())
        ref_lp = None
        if ref is not None:
            with torch.no_grad():
                ref_lp = token_logprobs(ref, ro, T, cfg.logprob_chunk)
        losses, stats, norms = [], {}, []
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, stage, "minibatch", step))
        for _ in range(g.epochs):
            order = torch.randperm(len(ro), generator=gen) if g.minibatches > 1 else torch.arange(len(ro))
            for idx in order.chunk(g.minibatches):
                sub = ro.select(idx)
                logp = token_logprobs(model, sub, T, cfg.logprob_chunk)
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

    with run.tracker.running():
        history = trainer.fit(step_fn)
        run.metrics = {f"eval.{k}": v for k, v in evaluate(run, model, tok, eval_set).items()}
        if "before" in trainer.state:
            run.metrics |= {f"eval_before.{k}": v for k, v in trainer.state["before"].items()}
            run.metrics["c1_reward_lift"] = run.metrics["eval.avg@%d" % cfg.eval.samples] - trainer.state["before"]["avg@%d" % cfg.eval.samples]
        used = {p.id for s in range(trainer.step) for p in run.batch_of(problems, n_prompts, s)}
        run.extra = {"steps": trainer.step, "labeled_examples": len(used),
                     "student_steps": trainer.step if ROLE[stage] == "student" else 0}
        run.metrics["train.reward_last"] = history[-1]["reward"] if history else float("nan")
        return run.publish({"model": model}, tok, history=history)
