"""Stage 2a: forward-KL warmup of the student towards the RL'd teacher on TEACHER rollouts.

    loss = mean over completion tokens of  KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))

``kl_warmup.form: seq_sft`` replaces the full-vocabulary KL with sequence-level distillation
(Kim & Rush 2016): cross-entropy on the tokens the teacher sampled, a Monte-Carlo estimate of the
same gradient that sees one token of the teacher's distribution per position. It is the benchmark's
"fine-tune on teacher samples" control.

Prompts only (no answers). It brings the student within a small KL of the teacher (the paper's
condition C2), measured as KL(student || teacher) on student rollouts before and after; it stops
early once that falls below ``kl_warmup.c2_target``.

    python -m stages kl_warmup --config tiny --root runs/demo \
        --teacher runs/demo/teacher_rl/model --student runs/demo/bootstrap/student
"""

from __future__ import annotations

import time

from . import teacher_data
from .losses import aggregate, forward_kl, sft_loss, topk_forward_kl
from .rollout import hidden_states, map_positions, token_logprobs, vocab_kl
from .runtime import StageRun, decode
from .scoring import score, student_teacher_kl
from .teacher import open_teacher, sampled_c2


def run(run: StageRun, teacher_uri: str, student_uri: str, teacher_data_uri: str | None = None) -> dict:
    cfg, w = run.cfg, run.cfg.kl_warmup
    prompts = run.task.problems("prompts")
    if w.form == "topk":  # trains from stage teacher_data's Parquet: the teacher is reached for C2 only
        student, tok = run.load_model(student_uri, "student")
        rows = teacher_data.load(teacher_data_uri)
        by_id = {p.id: p for p in prompts}
        served = {}

        def c2(label: str = "c2") -> float:  # the sampled-token estimate through the teacher engine
            if not served:
                served["teacher"] = open_teacher(run, teacher_uri, tok, student)[0]
            return sampled_c2(run.rollouts, student, tok, served["teacher"], prompts, label)
    else:
        teacher, student, tok = run.load_teacher_student(teacher_uri, student_uri)

        def c2(label: str = "c2") -> float:  # KL(student || teacher) on student rollouts
            return student_teacher_kl(run.rollouts, student, teacher, tok, prompts, label)
    trainer = run.trainer("student", student, w.optim, w.steps)  # restored from its last saved state, if any
    s_head = student.get_output_embeddings()

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        if w.form == "topk":
            # stored teacher rollouts and their top-k: forward KL over the top-k + a tail bucket; the
            # teacher side is [B, L, k], never [B, L, V]
            stored = run.batch_of(rows, w.prompts_per_step, step)
            batch = [by_id[r["problem_id"]] for r in stored]
            ro, ids, lp = teacher_data.batch_tensors(stored, tok.pad_token_id, cfg.sampling.temperature, run.device)
            P, T = ro.prompt_len, ro.temperature
            hs = hidden_states(student, ro)[:, P - 1 : -1]
            kl = map_positions(lambda h, i, lt: topk_forward_kl(s_head(h) / T, i, lt), cfg.logprob_chunk, hs,
                               ids[:, P:], lp[:, P:])
            loss = aggregate(kl, ro.completion[:, P:], "token-mean")
        else:
            batch = run.batch_of(prompts, w.prompts_per_step, step)
            ro = run.rollouts.sample(teacher, tok, batch, step)  # the teacher writes, the student learns to follow
            if w.form == "seq_sft":
                loss = sft_loss(token_logprobs(student, ro, cfg.logprob_chunk), ro.completion)
            else:
                kl, _ = vocab_kl(forward_kl, student, teacher, ro, cfg.logprob_chunk)
                loss = aggregate(kl, ro.completion[:, 1:], "token-mean")
        norm = trainer.update(loss)
        run.record_rollouts(step, batch, decode(tok, ro))
        out = {"loss": float(loss.detach()), ("teacher_nll" if w.form == "seq_sft" else "forward_kl"): float(loss.detach()), "grad_norm": norm,
               "completion_len": float(ro.completion.sum()) / len(ro), "samples_per_s": len(ro) / (time.perf_counter() - t0)}
        if (step + 1) % w.c2_every == 0:
            out["c2"] = c2(f"c2-{step}")
            out["stop"] = w.c2_target is not None and out["c2"] < w.c2_target
        return out

    with run.tracking(trainer, {"prompts": prompts}):
        if "c2_before" not in trainer.state:  # a resumed run keeps the value measured before any update
            trainer.state["c2_before"] = c2()
        history = trainer.fit(step_fn)
        metrics = {f"eval.{k}": v for k, v in score(run.rollouts, student, tok, run.task.problems("eval")).items()}
        metrics |= {"c2_before": trainer.state["c2_before"], "c2_after": c2()}
        extra = {"steps": trainer.step, "labeled_examples": 0, "student_steps": trainer.step,
                 "stopped_early": trainer.step < w.steps, "c2_estimator": "sampled" if w.form == "topk" else "full"}
        return run.publish({"model": student}, tok, metrics=metrics, extra=extra, history=history)
