"""Stage prune: the base student derived from the base teacher, as the paper's students are smaller
models of the teacher's family, with the same tokenizer and chat template.

1. Cut: keep ``prune.layers`` of the teacher's decoder layers (or all but ``prune.drop``, or every ``prune.every``-th
   and the last),
   ``stages/pruning.py``: a fresh model of the teacher's class with the cut config, so layer indices,
   the layer count and tied embeddings are right for any architecture.
2. Heal: a cut model has lost the thread (it rambles, it does not stop); ``prune.heal.steps`` steps on text
   that is NOT the task bring it back to a working, weaker model: the teacher's own greedy answers,
   through the chat template, to generic everyday prompts (no arithmetic), with the per-token forward
   KL(teacher || student) over the full vocabulary (``heal.loss: forward_kl``) or cross-entropy on the
   answers' tokens (``sft``). A student that never answers would give direct GRPO no signal at all.
3. Score the student on the eval split (the summary's "base student" row) and publish it at
   ``<root>/prune/student`` with lineage to the teacher it was cut from.

    python -m stages prune --config smollm2-cpu --root runs/smollm2 --teacher runs/smollm2/import/teacher
"""

from __future__ import annotations

import logging
import time

from ..losses import sft_loss
from ..pruning import GENERIC_PROMPTS, cut_layers, kept_layers, n_params
from ..rollout import decode, token_logprobs, vocab_kl
from ..runtime import StageRun
from ..scoring import eval_metrics
from ..task_contract import Problem

log = logging.getLogger(__name__)


def main(run: StageRun, teacher_uri: str) -> dict:
    cfg, p, h = run.cfg, run.cfg.prune, run.cfg.prune.heal
    teacher, tok = run.load_model(teacher_uri, "teacher")
    teacher.requires_grad_(False).eval()
    n = teacher.config.num_hidden_layers
    keep = kept_layers(p, n)
    student = cut_layers(teacher, keep).to(run.device)
    student.requires_grad_(True)
    log.info("prune: %d of %d layers kept (%s): %d -> %d parameters", len(keep), n, keep, n_params(teacher), n_params(student))
    # the healing text: the teacher's greedy answers to generic prompts (generated again on a resume: greedy)
    generic = [Problem(f"generic-{i}", GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)], None) for i in range(h.prompts)]
    trainer = run.trainer("student", student, h.optim, h.steps)  # restored from its last saved state, if any
    chunk = cfg.logprob_chunk
    with run.tracking(trainer, {"generic_prompts": generic}, context="healing"):
        t0 = time.perf_counter()
        answers = run.rollout_maker.sample(teacher, tok, generic, step=0, salt="heal", greedy=True,
                                           max_new_tokens=h.max_new_tokens) if h.steps else None
        gen_s = time.perf_counter() - t0
        if answers is not None and trainer.step == 0:
            run.record_rollouts(0, generic, decode(tok, answers))

        def step_fn(step: int) -> dict:
            t1 = time.perf_counter()
            rows = run.batch_of(list(range(len(generic))), h.batch_size, step)
            batch = answers.select(rows)
            if h.loss == "forward_kl":  # per-token KL(teacher || student) on the answers' tokens, token-mean
                loss = vocab_kl("forward", student, teacher, batch, "token-mean", chunk).loss
            else:
                loss = sft_loss(token_logprobs(student, batch, chunk), batch.completion)
            return {"loss": float(loss.detach()), "grad_norm": trainer.update(loss),
                    "samples_per_s": len(rows) / (time.perf_counter() - t1)}

        history = trainer.fit(step_fn)
        metrics = {"teacher.params": n_params(teacher), "student.params": n_params(student), "student.layers": len(keep),
                   "heal.teacher_answer_s": round(gen_s, 1)}
        if history:
            metrics |= {"heal.loss_first": history[0]["loss"], "heal.loss_last": history[-1]["loss"]}
        metrics |= {f"student.eval.{k}": v for k, v in eval_metrics(run.rollout_maker, student, tok,
                                                                    run.task.problems("eval")).items()}
        extra = {"layers_kept": list(keep), "teacher_layers": n, "heal_steps": trainer.step, "labeled_examples": 0,
                 "student_steps": 0}
        return run.publish({"student": student}, tok, metrics=metrics, extra=extra, history=history)
