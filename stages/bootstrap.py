"""Embedded default only: make the tiny base teacher and base student.

Both are random-init Qwen3-architecture models trained briefly on worked arithmetic traces, a
fraction of them corrupted (``bootstrap.noise``), so they start like pretrained models do: able to
solve many problems, not reliably. The teacher is bigger and trained longer than the student.

    python -m stages bootstrap --config tiny --root runs/demo
"""

from __future__ import annotations

import random

from .losses import sft_loss
from .models import char_tokenizer, tiny_qwen3
from .rollout import token_logprobs
from .runtime import StageRun, seed_for, teacher_forced
from .scoring import score
from .tasks import ArithmeticTask


def run(run: StageRun) -> dict:
    cfg, b = run.cfg, run.cfg.bootstrap
    if not isinstance(run.task, ArithmeticTask):
        raise ValueError("bootstrap makes tiny models for the built-in arithmetic task only; "
                         "other tasks start from real checkpoints (models.*.source)")
    tok = char_tokenizer()
    data = run.task.problems("bootstrap")
    eval_set = run.task.problems("eval")
    out, metrics = {}, {}
    with run.tracking(datasets={"bootstrap": data}):
        plan = (("teacher", b.teacher_steps, b.teacher_optim, b.batch_size),
                ("student", b.student_steps, b.student_optim, b.student_batch_size or b.batch_size))
        for role, steps, optim, batch_size in plan:
            spec = getattr(cfg.models, role)
            model = tiny_qwen3(spec.arch, tok, seed_for(cfg.seed, "init", role)).to(cfg.device)
            trainer = run.trainer(role, model, optim, steps, metric_prefix=f"{role}/")

            def step_fn(step: int, role=role, model=model, trainer=trainer, batch_size=batch_size) -> dict:
                batch = run.batch_of(data, batch_size, step, salt=role)
                rng = random.Random(seed_for(cfg.seed, "noise", role, step))
                texts = [run.task.solution(p, rng, b.noise) for p in batch]
                tf = teacher_forced(tok, run.rollouts.encode(tok, batch), texts)
                loss = sft_loss(token_logprobs(model, tf, cfg.logprob_chunk), tf.completion)
                return {"loss": float(loss.detach()), "grad_norm": trainer.update(loss)}

            trainer.fit(step_fn)
            out[role] = model
            n_params = sum(p.numel() for p in model.parameters())
            metrics |= {f"{role}.params": n_params} | {f"{role}.eval.{k}": v for k, v in score(run.rollouts, model, tok, eval_set).items()}
        return run.publish(out, tok, metrics=metrics, extra={"labeled_examples": 0, "student_steps": 0})
