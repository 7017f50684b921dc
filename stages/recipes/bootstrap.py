"""Make the tiny base teacher and base student (``models.*.source: bootstrap``), for any task that can write
worked solutions (``solution(problem, rng, noise)``: the built-in arithmetic task, ``examples/reverse_task.py``).

Both are random-init Qwen3-architecture models trained briefly on worked solutions (arithmetic traces), a
fraction of them corrupted (``bootstrap.noise``), so they start like pretrained models do: able to
solve many problems, not reliably. The teacher is bigger and trained longer than the student.

Everything downstream presumes the teacher is the better model (C1: stage 1 sharpens it, stages 2a/2b
move the student towards it), so the stage checks that the teacher beats the student on the
``validation`` split and fails, publishing nothing, when it does not.

    python -m stages bootstrap --config tiny --root runs/demo
"""

from __future__ import annotations

import logging
import random

from ..losses import sft_loss
from ..models import char_tokenizer, tiny_qwen3
from ..rollout import teacher_forced, token_logprobs
from ..runtime import StageRun, seed_for
from ..scoring import eval_metrics

log = logging.getLogger(__name__)


class TeacherNotBetter(RuntimeError):
    """The bootstrapped teacher does not beat the bootstrapped student on the validation split."""


def check_teacher_beats_student(teacher: dict, student: dict, k: int) -> None:
    """Fail unless the teacher's validation avg@k is above the student's. Two models that solve nothing
    (test-sized bootstraps of a few steps) carry no ordering to check: a warning, not a failure."""
    t, s = teacher[f"avg@{k}"], student[f"avg@{k}"]
    if t > s:
        return
    if t == s == 0:
        log.warning("bootstrap: neither base model solves a validation problem; the teacher-beats-student check is vacuous")
        return
    raise TeacherNotBetter(
        f"bootstrap: the teacher (validation avg@{k} {t:.3f}) does not beat the student ({s:.3f}); the workflow would "
        "distill from a worse model. Train the teacher longer or better (bootstrap.teacher_steps, bootstrap.teacher_optim.lr) "
        "or the student less (bootstrap.student_steps), or use another seed")


def main(run: StageRun) -> dict:
    cfg, b = run.cfg, run.cfg.bootstrap
    if not callable(getattr(run.task, "solution", None)):  # validate says so before anything runs
        raise ValueError(f"bootstrap trains the tiny base models on worked solutions, but task '{cfg.task.kind}' has "
                         "no solution(problem, rng, noise); start from checkpoints (models.*.source)")
    tok = char_tokenizer()
    data = run.task.problems("bootstrap")
    eval_set = run.task.problems("eval")
    try:  # optional: a data task may have no validation split
        val_set = run.task.problems("validation")
    except KeyError:
        val_set = []
    out, metrics, val = {}, {}, {}
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
                tf = teacher_forced(tok, run.rollout_maker.encode(tok, batch), texts)
                loss = sft_loss(token_logprobs(model, tf, cfg.logprob_chunk), tf.completion)
                return {"loss": float(loss.detach()), "grad_norm": trainer.update(loss)}

            trainer.fit(step_fn)
            out[role] = model
            n_params = sum(p.numel() for p in model.parameters())
            metrics |= {f"{role}.params": n_params} | {
                f"{role}.eval.{k}": v for k, v in eval_metrics(run.rollout_maker, model, tok, eval_set).items()
            }
            if val_set:
                val[role] = eval_metrics(run.rollout_maker, model, tok, val_set)
                metrics |= {f"{role}.validation.{k}": v for k, v in val[role].items()}
        if val_set:
            check_teacher_beats_student(val["teacher"], val["student"], cfg.eval.samples)
        else:
            log.warning("bootstrap: no validation split (task.sizes.validation): the teacher-beats-student check is skipped")
        return run.publish(out, tok, metrics=metrics, extra={"labeled_examples": 0, "student_steps": 0})
