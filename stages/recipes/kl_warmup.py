"""Stage 2a: forward-KL warmup of the student towards the RL'd teacher on TEACHER rollouts.

    loss = mean over completion tokens of  KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))

Prompts only (no answers). It brings the student within a small KL of the teacher (the paper's
condition C2), measured as KL(student || teacher) on student rollouts before and after and every
``kl_warmup.c2_every`` steps. ``kl_warmup.steps`` is the most it runs: it stops early once C2 falls below
``kl_warmup.c2_target``, or (``kl_warmup.c2_patience``) once C2 has stopped improving (:func:`c2_stop`);
stage 2b can take the steps it left unused (``onpolicy_distill.take_unused_warmup``).

``kl_warmup.form`` picks how the teacher's distribution reaches the loss, one function each (:data:`FORMS`):

- ``token_kl`` (default): the teacher samples, the full-vocabulary KL above on its tokens;
- ``seq_sft``: sequence-level distillation (Kim & Rush 2016): cross-entropy on the tokens the teacher
  sampled, a Monte-Carlo estimate of the same gradient that sees one token of the teacher's distribution
  per position (the benchmark's "fine-tune on teacher samples" control);
- ``topk``: stored teacher rollouts with their top-k log-probs (stage ``teacher_data``'s Parquet): forward
  KL over the top-k plus a tail bucket; the teacher side is [B, L, k], never [B, L, V], and the teacher is
  reached only to measure C2.

    python -m stages kl_warmup --config tiny --root runs/demo \
        --teacher runs/demo/teacher_rl/model --student runs/demo/bootstrap/student
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

from .. import cost
from ..losses import aggregate, sft_loss, topk_forward_kl
from ..rollout import Rollouts, decode, hidden_states, map_positions, token_logprobs, vocab_kl
from ..runtime import StageRun
from ..scoring import eval_metrics, student_teacher_kl
from ..teacher import open_teacher, sampled_c2
from . import teacher_data


class Form(NamedTuple):
    student: object
    tok: object
    c2: Callable[[str], float]  # KL(student || teacher) on student rollouts, labelled for the seeds
    loss: Callable[[int], tuple]  # step -> (loss, the rollouts it was computed on, their problems)
    metric: str  # what the loss is called in the metrics
    c2_estimator: str


def main(run: StageRun, teacher_uri: str, student_uri: str, teacher_data_uri: str | None = None) -> dict:
    w = run.cfg.kl_warmup
    form = FORMS[w.form](run, teacher_uri, student_uri, teacher_data_uri)
    student, tok = form.student, form.tok
    trainer = run.trainer("student", student, w.optim, w.steps)  # restored from its last saved state, if any

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        loss, ro, batch = form.loss(step)
        norm = trainer.update(loss)
        run.record_rollouts(step, batch, decode(tok, ro))
        out = {"loss": float(loss.detach()), form.metric: float(loss.detach()), "grad_norm": norm,
               "completion_len": float(ro.completion.sum()) / len(ro), "samples_per_s": len(ro) / (time.perf_counter() - t0)}
        if (step + 1) % w.c2_every == 0:
            out["c2"] = form.c2(f"c2-{step}")
            # the best C2 and the count of measurements without improvement live in the trainer's state:
            # a resumed run decides as the uninterrupted one would
            reason = c2_stop(trainer.state, out["c2"], w.c2_target, w.c2_patience, w.c2_min_delta)
            out["stop"] = reason is not None
            if reason:
                trainer.state["stop_reason"] = reason
        return out

    with run.tracking(trainer, {"prompts": run.task.problems("prompts")}):
        if "c2_before" not in trainer.state:  # a resumed run keeps the value measured before any update
            trainer.state["c2_before"] = form.c2("c2")
            trainer.state["c2_best"], trainer.state["c2_stale"] = trainer.state["c2_before"], 0
        history = trainer.fit(step_fn)
        metrics = {f"eval.{k}": v for k, v in eval_metrics(run.rollout_maker, student, tok, run.task.problems("eval")).items()}
        metrics |= {"c2_before": trainer.state["c2_before"], "c2_after": form.c2("c2")}
        stopped = trainer.step < w.steps
        # max_steps: what onpolicy_distill.take_unused_warmup adds to stage 2b is max_steps - steps
        extra = {"steps": trainer.step, "labeled_examples": 0, "student_steps": trainer.step, "max_steps": w.steps,
                 "stopped_early": stopped, "stop_reason": trainer.state.get("stop_reason") if stopped else None,
                 "c2_estimator": form.c2_estimator}
        return run.publish({"model": student}, tok, metrics=metrics, extra=extra, history=history)


def c2_stop(state: dict, c2: float, target: float | None, patience: int | None, min_delta: float) -> str | None:
    """Record one C2 measurement in ``state`` and say whether stage 2a stops: ``"c2_target"`` (C2 fell below
    ``target``), ``"c2_plateau"`` (``patience`` measurements in a row without improving on the best by more
    than ``min_delta``, relative), or None. ``state`` holds ``c2_best`` and ``c2_stale`` (JSON, kept in the
    trainer's resume state); the caller seeds ``c2_best`` with the value before training.

    The best moves only on an improvement: a slow steady decline, each step below ``min_delta``, still
    resets the count once it adds up to more than ``min_delta`` below the best."""
    best = state.get("c2_best")
    if best is None or c2 < best - min_delta * abs(best):
        state["c2_best"], state["c2_stale"] = c2, 0
    else:
        state["c2_stale"] = state.get("c2_stale", 0) + 1
    if target is not None and c2 < target:
        return "c2_target"
    if patience is not None and state["c2_stale"] >= patience:
        return "c2_plateau"
    return None


def token_kl(run: StageRun, teacher_uri: str, student_uri: str, _data_uri: str | None = None) -> Form:
    """Full-vocabulary forward KL on the teacher's own rollouts (both models in this process)."""
    cfg = run.cfg
    teacher, student, tok = run.load_teacher_student(teacher_uri, student_uri)

    def loss(step: int):
        batch, ro = _teacher_rollouts(run, teacher, tok, step)
        cost.teacher_scored(ro)  # the teacher's full distribution at every token it wrote
        return vocab_kl("forward", student, teacher, ro, "token-mean", cfg.logprob_chunk).loss, ro, batch

    return Form(student, tok, _exact_c2(run, student, teacher, tok), loss, "forward_kl", "full")


def seq_sft(run: StageRun, teacher_uri: str, student_uri: str, _data_uri: str | None = None) -> Form:
    """Cross-entropy of the student on the tokens the teacher sampled (the teacher's NLL under the student)."""
    cfg = run.cfg
    teacher, student, tok = run.load_teacher_student(teacher_uri, student_uri)

    def loss(step: int):
        batch, ro = _teacher_rollouts(run, teacher, tok, step)
        return sft_loss(token_logprobs(student, ro, cfg.logprob_chunk), ro.completion), ro, batch

    return Form(student, tok, _exact_c2(run, student, teacher, tok), loss, "teacher_nll", "full")


def topk(run: StageRun, teacher_uri: str, student_uri: str, data_uri: str | None = None) -> Form:
    """Forward KL over the teacher's stored top-k + a tail bucket, from stage teacher_data's Parquet."""
    cfg, w = run.cfg, run.cfg.kl_warmup
    student, tok = run.load_model(student_uri, "student")
    rows = teacher_data.load(data_uri)
    prompts = run.task.problems("prompts")
    by_id = {p.id: p for p in prompts}
    s_head = student.get_output_embeddings()
    served = {}

    def c2(label: str) -> float:  # the sampled-token estimate through the teacher engine, opened on first use
        if not served:
            served["teacher"] = open_teacher(run, teacher_uri, tok, student)[0]
        return sampled_c2(run.rollout_maker, student, tok, served["teacher"], prompts, label)

    def loss(step: int):
        stored = run.batch_of(rows, w.prompts_per_step, step)
        ro, ids, lp = teacher_data.batch_tensors(stored, tok.pad_token_id, cfg.sampling.temperature, run.device)
        P, T = ro.prompt_len, ro.temperature
        hs = hidden_states(student, ro)[:, P - 1 : -1]
        kl = map_positions(lambda h, i, lt: topk_forward_kl(s_head(h) / T, i, lt), cfg.logprob_chunk, hs,
                           ids[:, P:], lp[:, P:])
        return aggregate(kl, ro.completion[:, P:], "token-mean"), ro, [by_id[r["problem_id"]] for r in stored]

    return Form(student, tok, c2, loss, "forward_kl", "sampled")


FORMS: dict[str, Callable[..., Form]] = {"token_kl": token_kl, "seq_sft": seq_sft, "topk": topk}


def _teacher_rollouts(run: StageRun, teacher, tok, step: int) -> tuple[list, Rollouts]:
    """The step's prompts and the teacher's completions of them: the teacher writes, the student learns to follow."""
    batch = run.batch_of(run.task.problems("prompts"), run.cfg.kl_warmup.prompts_per_step, step)
    return batch, run.rollout_maker.sample(teacher, tok, batch, step)


def _exact_c2(run: StageRun, student, teacher, tok) -> Callable[[str], float]:
    prompts = run.task.problems("prompts")
    return lambda label: student_teacher_kl(run.rollout_maker, student, teacher, tok, prompts, label)
