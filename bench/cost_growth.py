"""How a training step's cost grows with sequence length and batch on the real student (issue 25 item 5): time and
peak tensor memory per step of 2b ``full`` (fused full-vocabulary reverse KL against the teacher), 2b ``sampled``
(sampled-token policy gradient, the teacher's log-prob of each token) and GRPO (policy gradient, verifier rewards),
each forward + backward + AdamW, generation excluded.

    python bench/cost_growth.py --out bench/results            # plot: bench/results/cost_growth.png

Sequences are synthetic token ids: a 32-token prompt and ``L - 32`` completion tokens; one axis varies at a time
(``--lengths`` at batch ``--batch``, ``--batches`` at length ``--length``). Time: median of ``--repeats`` steps after a
warm-up step, wall and this process's CPU time. Memory: the allocator's peak during one forward + backward above what
was allocated before it (weights, AdamW state; the AdamW step's own peak is measured once, it does not grow), from
torch's own allocation records (bench/_common.peak_alloc_bytes),
so the [tokens x vocabulary] logits show exactly. ``unfused full`` is the same 2b loss with both models' full
[B, L, V] logits and autograd (what the stages did before chunking), measured for memory up to ``--unfused-max``
tokens (time too). Writes ``<out>/cost_growth.{md,json,png}``.
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

import torch  # noqa: E402

from bench import real_models  # noqa: E402
from bench._common import machine, peak_alloc_bytes  # noqa: E402
from stages.losses import aggregate, policy_loss, reverse_kl, reverse_kl_advantages  # noqa: E402
from stages.rollout import Rollouts, token_logprobs, vocab_kl  # noqa: E402

PROMPT = 32
FORMS = ("2b full", "2b sampled", "grpo", "unfused full")


def batch_of(B: int, L: int, vocab: int, seed: int) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (B, L), generator=g)
    comp = torch.zeros(B, L, dtype=torch.long)
    comp[:, PROMPT:] = 1
    lp = -torch.rand(B, L, generator=g) * 3 * comp  # "sampler" log-probs: ratios away from 1, as after an update
    return Rollouts(ids, torch.ones(B, L, dtype=torch.long), comp, lp, torch.zeros(B, L), PROMPT, 1.0)


def loss_fn(form: str, student, teacher, ro: Rollouts, chunk: int):
    if form == "2b full":
        return vocab_kl("reverse", student, teacher, ro, "token-mean", chunk).loss
    if form == "unfused full":
        kw = dict(input_ids=ro.input_ids, attention_mask=ro.attention, use_cache=False)
        with torch.no_grad():
            zt = teacher(**kw).logits[:, :-1]
        return aggregate(reverse_kl(student(**kw).logits[:, :-1], zt), ro.completion[:, 1:], "token-mean")
    logp = token_logprobs(student, ro, chunk)
    if form == "2b sampled":
        with torch.no_grad():
            t_lp = token_logprobs(teacher, ro, chunk)
        adv = reverse_kl_advantages(t_lp, ro.logprobs, ro.completion)
    else:
        adv = torch.where(torch.arange(len(ro)) % 2 == 0, 1.0, -1.0).view(-1, 1)  # group-normalised rewards: +-1
    return policy_loss(logp, ro.logprobs, adv, ro.completion)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=real_models.DEFAULT_DIR)
    p.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256, 512])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--autocast", choices=["none", "bfloat16"], default="bfloat16")
    p.add_argument("--unfused-max", type=int, default=2048, help="largest B x L for the unfused reference")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    student_path = real_models.student(opts.models)
    student = AutoModelForCausalLM.from_pretrained(str(student_path), dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(str(opts.models / "teacher"), dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7)
    V = student.config.vocab_size
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=opts.autocast == "bfloat16")

    def fwd_bwd(form, ro):
        with torch.autocast(**amp):
            loss = loss_fn(form, student, teacher, ro, opts.chunk)
        loss.backward()

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(form, ro):
        fwd_bwd(form, ro)
        opt_step()

    points = [("length", L, opts.batch, L) for L in opts.lengths] + [("batch", B, B, opts.length) for B in opts.batches]
    rows = []
    load0, t_start = os.getloadavg(), time.time()
    step("grpo", batch_of(1, 64, V, 0))  # AdamW state exists before any measurement
    fwd_bwd("grpo", batch_of(1, 64, V, 0))
    opt_peak_mb = peak_alloc_bytes(opt_step)[0] / 2**20  # the same at every point: the parameters' size
    for axis, x, B, L in points:
        ro = batch_of(B, L, V, seed=x)
        for form in opts.forms:
            if form == "unfused full" and B * L > opts.unfused_max:
                continue
            row = {"axis": axis, "x": x, "batch": B, "length": L, "tokens": B * L, "form": form}
            row["peak_mb"] = peak_alloc_bytes(lambda: fwd_bwd(form, ro))[0] / 2**20  # forward + backward
            opt_step()
            wall, cpu = [], []
            for _ in range(opts.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                step(form, ro)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            row |= {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "walls": wall, "cpus": cpu}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("walls", "cpus")}), f"load {os.getloadavg()[0]:.1f}",
                  flush=True)
    res = {
        "rows": rows,
        "meta": {
            "command": "python bench/cost_growth.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(),
            "threads": opts.threads,
            "autocast": opts.autocast,
            "optimizer_step_peak_mb": opt_peak_mb,
            "chunk": opts.chunk,
            "prompt_tokens": PROMPT,
            "vocab": V,
            "load_avg_before": load0,
            "load_avg_after": os.getloadavg(),
            "wall_s": round(time.time() - t_start),
        },
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "cost_growth.json").write_text(json.dumps(res, indent=1))
    (opts.out / "cost_growth.md").write_text(markdown(res))
    plot(res, opts.out / "cost_growth.png")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    m = res["meta"]
    mm = m["machine"]
    lines = ["# Cost growth of a training step on the real student", "",
             f"Command: `{m['command']}`  ",
             f"Machine: {mm['cpu']} ({mm['cpu_capability']}), torch {mm['torch']}, {m['threads']} torch thread(s); "
             f"git {mm['git']}; autocast {m['autocast']}, logprob_chunk {m['chunk']}; wall {m['wall_s']} s  ",
             f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in m['load_avg_before'])}, after: "
             f"{' / '.join(f'{x:.1f}' for x in m['load_avg_after'])} on 2 shared cores: wall times are inflated by "
             "other jobs; CPU time is this process's.  ",
             f"Work: student (10 layers, vocabulary {m['vocab']:,}) forward + backward + AdamW on B sequences of L tokens "
             f"({m['prompt_tokens']} prompt + L - {m['prompt_tokens']} completion); 2b forms also run the teacher's forward. "
             "Peak memory: tensors allocated during forward + backward above the weights and AdamW state (gradients "
             f"included); the AdamW step itself peaks at {m['optimizer_step_peak_mb']:.0f} MB above its inputs at every "
             "point.", "",
             "| axis | B | L | form | wall s | CPU s | peak MB |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['axis']} | {r['batch']} | {r['length']} | {r['form']} | {r.get('wall_s', float('nan')):.2f} | "
                     f"{r.get('cpu_s', float('nan')):.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, axis in enumerate(("length", "batch")):
        for form in FORMS:
            rs = [r for r in res["rows"] if r["axis"] == axis and r["form"] == form]
            if not rs:
                continue
            xs = [r["x"] for r in rs]
            style = dict(marker="o", ls="--" if form == "unfused full" else "-", label=form)
            axes[0, col].plot(xs, [r["cpu_s"] for r in rs], **style)
            axes[1, col].plot(xs, [r["peak_mb"] for r in rs], **style)
        fixed = f"batch {rs[0]['batch']}" if axis == "length" else f"length {rs[0]['length']}"
        for row, what in ((0, "CPU s per step"), (1, "peak tensor MB per step")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"sequence {axis} ({fixed})" if axis == "length" else f"batch ({fixed})")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    m = res["meta"]
    fig.suptitle(f"Real student (SmolLM2 cut, vocab {m['vocab']:,}): cost per training step; autocast {m['autocast']}, "
                 f"chunk {m['chunk']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
