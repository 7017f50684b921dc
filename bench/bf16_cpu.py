"""fp32 against bf16 on this CPU (avx512_bf16 / AMX), on the real models (issue 25 item 2): training steps and
generation of SmolLM2-135M-Instruct (teacher) and its 10-layer student, and how far bf16 moves the distillation loss.

    python bench/bf16_cpu.py --repeats 3 --out bench/results          # models from bench/real_models.py (cached)

Modes, interleaved within every repeat (order rotated) so a loaded machine slows all alike:

- ``fp32``: float32 weights and compute (the ``dtype: float32`` default);
- ``autocast``: float32 weights (the optimizer's master copy), matmuls under ``torch.autocast("cpu", bfloat16)``,
  log-softmax and losses in float32 (what ``precision: bf16-autocast`` runs);
- ``bf16``: bfloat16 weights, compute and AdamW state (``dtype: bfloat16``): the fastest, and the one that loses
  small updates (a bf16 weight has 8 bits of mantissa).

Train step: the stages' own forward (``token_logprobs``, chunked head), an NLL loss on the completion half,
backward, AdamW. Generation: the ``hf`` engine (KV cache), every row exactly ``--new-tokens`` tokens.
Agreement: the fused reverse KL of stage 2b (student vs teacher on the student's rollouts) and its gradient in
each mode against fp32. Writes ``<out>/bf16_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench import real_models  # noqa: E402
from bench._common import machine  # noqa: E402
from stages.engines.hf import HFSampler  # noqa: E402
from stages.losses import sft_loss  # noqa: E402
from stages.rollout import Rollouts, token_logprobs, vocab_kl  # noqa: E402

MODES = ("fp32", "autocast", "bf16")


def autocast(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")


def load(path: Path, mode: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def token_batch(B: int, L: int, vocab: int, seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (B, L), generator=g)
    comp = torch.zeros(B, L, dtype=torch.long)
    comp[:, L // 2 :] = 1
    z = torch.zeros(B, L)
    return Rollouts(ids, torch.ones(B, L, dtype=torch.long), comp, z, z.clone(), L // 2, 1.0)


def prompts(tok, n: int) -> list[list[int]]:
    from stages.config import TaskConfig
    from stages.tasks import make_task

    task = make_task(TaskConfig())
    probs = task.problems("eval")[:n]
    return [tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for p in probs]


def train_step_s(model, opt, batch, mode: str, chunk: int) -> tuple[float, float]:
    """(wall s, this process's CPU s) of one step."""
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast(mode):
        loss = sft_loss(token_logprobs(model, batch, chunk), batch.completion)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def gen_s(model, sampler, ps, mode: str, n: int, seed: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast(mode):
        sampler.generate(model, ps, temperature=1.0, max_new_tokens=n, seed=seed)
    return time.perf_counter() - t0, time.process_time() - c0


def agreement(root: Path, tok, ps, n_new: int, chunk: int) -> dict:
    """2b's full-vocabulary reverse KL and the student's gradient, each mode against fp32, on one batch of
    student rollouts (sampled in fp32, so every mode scores the same tokens)."""
    out, ref = {}, None
    ro = None
    for mode in MODES:
        s, t = load(root / "student", mode), load(root / "teacher", mode).requires_grad_(False)
        if ro is None:
            ro = HFSampler(-1, tok.pad_token_id, 64).generate(s, ps, temperature=1.0, max_new_tokens=n_new, seed=1)
        with autocast(mode):
            res = vocab_kl("reverse", s, t, ro, "token-mean", chunk)
        res.loss.backward()
        grad = torch.cat([p.grad.double().reshape(-1) for p in s.parameters() if p.grad is not None])
        loss = float(res.loss)
        if ref is None:
            ref = (loss, grad)
        cos = float(torch.nn.functional.cosine_similarity(grad, ref[1], dim=0))
        out[mode] = {"loss": loss, "loss_rel_diff": abs(loss - ref[0]) / abs(ref[0]), "grad_cosine": cos,
                     "grad_norm_ratio": float(grad.norm() / ref[1].norm())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=real_models.DEFAULT_DIR)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="sequences per train step and per generate call")
    p.add_argument("--length", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per generated sequence")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--roles", nargs="*", default=["student", "teacher"])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = opts.models
    real_models.student(root)
    tok = AutoTokenizer.from_pretrained(str(root / "teacher"))
    ps = prompts(tok, opts.batch)
    load_before = os.getloadavg()
    t_start = time.time()
    res = {"train": {}, "generate": {}}
    for role in opts.roles:
        models = {m: load(root / role, m) for m in MODES}
        opts_ = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-6) for m in MODES}
        batch = token_batch(opts.batch, opts.length, models["fp32"].config.vocab_size)
        sampler = HFSampler(-1, tok.pad_token_id, 64)  # EOS -1: every row runs to --new-tokens
        for m in MODES:  # warm-up: oneDNN primitives, allocator
            train_step_s(models[m], opts_[m], batch, m, opts.chunk)
            gen_s(models[m], sampler, ps[:2], m, 4, 0)
        tr = {m: [] for m in MODES}
        ge = {m: [] for m in MODES}
        for r in range(opts.repeats):
            order = MODES[r % 3 :] + MODES[: r % 3]
            for m in order:
                tr[m].append(train_step_s(models[m], opts_[m], batch, m, opts.chunk))
                ge[m].append(gen_s(models[m], sampler, ps, m, opts.new_tokens, r))
            print(role, r, {m: (round(tr[m][-1][0], 2), round(ge[m][-1][0], 2)) for m in MODES}, os.getloadavg()[0], flush=True)
        for kind, d in (("train", tr), ("generate", ge)):
            res[kind][role] = {m: summary(d[m], d["fp32"]) for m in MODES}
        del models, opts_
    res["agreement"] = agreement(root, tok, ps, opts.new_tokens, opts.chunk)
    res["meta"] = {"command": "python bench/bf16_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "machine": machine(), "threads": opts.threads, "load_avg_before": load_before,
                   "load_avg_after": os.getloadavg(), "wall_s": round(time.time() - t_start, 1),
                   "work": {"batch": opts.batch, "length": opts.length, "new_tokens": opts.new_tokens,
                            "prompt_tokens": [len(x) for x in ps]}}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "bf16_cpu.json").write_text(json.dumps(res, indent=1))
    (opts.out / "bf16_cpu.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def summary(runs: list[tuple[float, float]], fp32: list[tuple[float, float]]) -> dict:
    """Medians and per-repeat speed-ups over fp32, in wall time and in CPU time."""
    wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
    return {"wall_s": wall, "cpu_s": cpu, "median_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu),
            "speedup_vs_fp32": [f[0] / x for f, x in zip(fp32, wall)],
            "cpu_speedup_vs_fp32": [f[1] / x for f, x in zip(fp32, cpu)]}


def markdown(res: dict) -> str:
    m = res["meta"]
    w = m["work"]
    lines = ["# fp32 vs bf16 on the CPU, real models", "",
             f"Command: `{m['command']}`  ",
             f"Machine: {m['machine']['cpu']} ({m['machine']['cpu_capability']}), torch {m['machine']['torch']}, "
             f"{m['threads']} torch thread(s); git {m['machine']['git']}  ",
             f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in m['load_avg_before'])}, after: "
             f"{' / '.join(f'{x:.1f}' for x in m['load_avg_after'])} on 2 cores shared with other jobs: absolute "
             "seconds are inflated; the ratios compare modes run back to back.  ",
             f"Work: train step = {w['batch']} x {w['length']} tokens (NLL on the last half), fwd + bwd + AdamW; "
             f"generate = {w['batch']} prompts ({min(w['prompt_tokens'])}-{max(w['prompt_tokens'])} tokens, chat "
             f"template) x {w['new_tokens']} new tokens, hf engine (KV cache).", "",
             "Speed-ups are fp32 time / mode time per repeat (min / median / max), in wall time and in this process's CPU "
             "time (less disturbed by the other jobs' load).", "",
             "| model | work | fp32 s (CPU s) | autocast bf16 s (CPU s) | bf16 weights s (CPU s) | autocast speed-up, wall | "
             "autocast speed-up, CPU | bf16 speed-up, wall | bf16 speed-up, CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("train", "generate"):
        for role, d in res[kind].items():
            def sp(mode, key):
                s = d[mode][key]
                return f"{min(s):.2f} / **{statistics.median(s):.2f}** / {max(s):.2f}"
            cells = [f"{d[m]['median_s']:.2f} ({d[m]['median_cpu_s']:.2f})" for m in MODES]
            lines.append(f"| {role} | {kind} | " + " | ".join(cells) + " | " + " | ".join(
                sp(m, k) for m in ("autocast", "bf16") for k in ("speedup_vs_fp32", "cpu_speedup_vs_fp32")) + " |")
    lines += [
        "",
        "Distillation loss in each mode against fp32 (2b's fused reverse KL on one batch of student rollouts, "
        "the student's full gradient):",
        "",
        "| mode | loss | relative difference | gradient cosine | gradient norm ratio |",
        "|---|---|---|---|---|",
    ]
    for mode, a in res["agreement"].items():
        lines.append(
            f"| {mode} | {a['loss']:.5f} | {a['loss_rel_diff']:.2e} | {a['grad_cosine']:.5f} | {a['grad_norm_ratio']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
