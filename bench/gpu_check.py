"""The GPU check: one command, <= 8 minutes on one H100, a short table on stdout and a JSON report.

    python bench/gpu_check.py --out $OUT/gpu_check.json          # on the GPU machine
    python bench/gpu_check.py --smoke --out /tmp/gpu_check.json  # tiny shapes on the CPU, < 60 s (tests run this)

1. stages: teacher_rl, kl_warmup, onpolicy_distill, student_rl, a few steps each, on random-init
   Qwen3-architecture models (bf16, static rollout engine, gradient checkpointing) through the real stage code;
2. rollouts: new tokens/s of the static engine (CUDA-graph decode) vs HF ``generate``, Qwen3-1.7B shape,
   batch 256, 128-token prompts, 256 new tokens, same process;
3. training: one optimizer step on a batch of 8 x 2048 tokens, ours (bf16, chunked log-probs, fused AdamW)
   vs plain HF (``model(input_ids, labels=...)``): Qwen3-0.6B shape (peak memory) and 1.7B shape with
   gradient checkpointing (tokens/s, MFU against 989 TFLOP/s dense bf16);
4. DeepSpeed ZeRO-3 through ``accelerate launch`` (infra/accelerate/deepspeed_zero3.yaml), one process:
   a stage runs and publishes.

Targets: rollouts >= 3x HF generate and >= 10k new tok/s; 0.6B peak <= 40 GB; 1.7B >= 45% MFU; ZeRO-3 stage runs.
On the GPU machine's own stack (no network, Python 3.12, torch 2.11, transformers 5.17) run it through
``bench/gpu_run.sh``, which installs the carried wheels first (``make gpu-wheels``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.config import TinyArch, load_config  # noqa: E402
from stages.engines.static import StaticSampler  # noqa: E402
from stages.models import char_tokenizer, save, tiny_qwen3  # noqa: E402
from stages.rollout import Rollouts, token_logprobs  # noqa: E402

H100_BF16_PEAK = 989e12
SHAPES = {  # Qwen3 shapes: hidden, layers, heads, kv_heads, intermediate (head_dim 128, vocab 151,936, tied)
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=3072, head_dim=128, vocab_size=151936),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=6144, head_dim=128, vocab_size=151936),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, head_dim=16, vocab_size=512),
}


def qwen3(shape: str, device, dtype=torch.bfloat16):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    return model


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- 1. the four stages
def run_stages(args, device) -> dict:
    from stages import workflow
    from stages.runtime import StageRun  # noqa: F401  (imported for its side effects on logging)

    tok = char_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="s2d-gpucheck-"))
    if args.smoke:
        t_arch, s_arch = (TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64),) * 2
    else:  # big enough that the GPU, not Python, sets the pace; char vocabulary so the task is the built-in one
        t_arch = TinyArch(hidden_size=1024, layers=12, heads=16, kv_heads=8, intermediate_size=3072)
        s_arch = TinyArch(hidden_size=512, layers=8, heads=8, kv_heads=4, intermediate_size=1536)
    for role, arch in (("teacher", t_arch), ("student", s_arch)):
        save(tiny_qwen3(arch, tok, seed=1), tok, work / role)
    n = 1 if args.smoke else 3
    sets = [
        f"device={'cpu' if device == 'cpu' else 'cuda'}", f"dtype={'float32' if device == 'cpu' else 'bfloat16'}",
        "tracking.enabled=false", "sampling.engine=static", f"sampling.max_new_tokens={8 if args.smoke else 48}",
        f"train.gradient_checkpointing={'false' if args.smoke else 'true'}",
        f"models.teacher.source={work / 'teacher'}", f"models.student.source={work / 'student'}",
        "task.sizes={bootstrap: 0, teacher_rl: 200, prompts: 400, student_rl: 200, eval: 64}",
        f"teacher_rl.steps={n}", f"student_rl.steps={n}", f"kl_warmup.steps={n}", f"onpolicy_distill.steps={n}",
        f"teacher_rl.prompts_per_step={2 if args.smoke else 32}", "teacher_rl.group_size=4",
        f"student_rl.prompts_per_step={2 if args.smoke else 32}", "student_rl.group_size=4",
        f"kl_warmup.prompts_per_step={4 if args.smoke else 64}", "kl_warmup.c2_every=100",
        f"onpolicy_distill.prompts_per_step={4 if args.smoke else 64}",
        f"eval.problems={4 if args.smoke else 64}", "eval.samples=2", f"eval.c2_prompts={4 if args.smoke else 64}",
        f"eval.greedy={'false' if args.smoke else 'true'}", "torch_threads=1" if args.smoke else "torch_threads=null",
        "checkpoint_every=100", "workflow.baseline=false",
    ]
    cfg = load_config("tiny", sets)
    root = str(work / "root")
    out = {}
    for step in workflow.plan(cfg, root):
        t0 = time.perf_counter()
        try:
            manifest, _ = workflow.run_stage(cfg, root, step["stage"], step["inputs"])
            out[step["stage"]] = {"ok": True, "s": round(time.perf_counter() - t0, 1),
                                  "avg@2": manifest["metrics"].get("eval.avg@2")}
        except Exception as e:  # noqa: BLE001 - reported, the other checks still run
            traceback.print_exc()
            out[step["stage"]] = {"ok": False, "s": round(time.perf_counter() - t0, 1), "error": repr(e)[:300]}
            break
    out["_root"] = root
    out["_sets"] = sets
    return out


# ---------------------------------------------------------------- 2. rollouts
def bench_rollouts(args, device) -> dict:
    shape, B, P, N = ("smoke", 8, 16, 16) if args.smoke else ("1.7b", 256, 128, 256)
    model = qwen3(shape, device, torch.float32 if device == "cpu" else torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPES[shape]["vocab_size"], (B, P), generator=g)
    prompts = [[1] + row.tolist()[1:] for row in ids]
    res = {"shape": shape, "batch": B, "prompt_len": P, "new_tokens": N}
    # HF generate, sampling, no EOS so every row makes N tokens (same work for both engines)
    x = torch.tensor(prompts, device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N, **kw)
        sync(device)
    hf_s = time.perf_counter() - t0
    res["hf_generate"] = {"s": round(hf_s, 3), "new_tok_per_s": round(B * (out.shape[1] - P) / hf_s, 1)}
    del out
    free()
    eng = StaticSampler(eos_id=-1, pad_id=0, batch_size=B)  # eos -1: never stops early, N tokens per row
    eng.generate(model, prompts[:8], temperature=1.0, max_new_tokens=4, seed=1)  # warm-up (kernels, cuBLAS)
    sync(device)
    t0 = time.perf_counter()
    ro = eng.generate(model, prompts, temperature=1.0, max_new_tokens=N, seed=0)
    sync(device)
    st_s = time.perf_counter() - t0
    n_new = int(ro.completion.sum())
    res["static"] = {"s": round(st_s, 3), "new_tok_per_s": round(n_new / st_s, 1), "decode": eng.last_mode,
                     "graph_capture_included": eng.last_mode == "cuda_graph"}
    res["speedup"] = round(res["static"]["new_tok_per_s"] / res["hf_generate"]["new_tok_per_s"], 2)
    del model
    free()
    return res


# ---------------------------------------------------------------- 3. training steps
def _batch(B, T, vocab, device) -> Rollouts:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, T), generator=g).to(device)
    ones = torch.ones_like(ids)
    comp = ones.clone()
    comp[:, :1] = 0
    z = torch.zeros(B, T, device=device)
    return Rollouts(ids, ones, comp, z, z, 1, 1.0)


def flops_per_token(shape: str, T: int) -> float:
    """Model FLOPs per trained token: 6 N (matmul weights incl. the output head) + 12 L H T (attention,
    full square, as PaLM's MFU counts)."""
    s = SHAPES[shape]
    h, L, I, V = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["vocab_size"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    n = L * (h * q + 2 * h * kv + q * h + 3 * h * I) + h * V
    return 6 * n + 12 * L * q * T


def train_step_bench(shape, B, T, device, ours: bool, checkpointing: bool, steps: int, chunk: int) -> dict:
    free()
    model = qwen3(shape, device, torch.float32 if device == "cpu" else torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.device(device).type == "cuda" or None)
    batch = _batch(B, T, SHAPES[shape]["vocab_size"], device)

    def step():
        if ours:
            lp = token_logprobs(model, batch, chunk)
            m = batch.completion.to(lp.dtype)
            loss = -(lp * m).sum() / m.sum()
        else:
            loss = model(input_ids=batch.input_ids, labels=batch.input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()  # warm-up (allocations, kernels); optimizer state created
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        dt = (time.perf_counter() - t0) / steps
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.device(device).type == "cuda" else None
        tok_s = B * T / dt
        mfu = tok_s * flops_per_token(shape, T) / H100_BF16_PEAK
        return {"ok": True, "s_per_step": round(dt, 4), "tok_per_s": round(tok_s, 1), "peak_gb": peak,
                "mfu": round(mfu, 4), "hw_mfu_with_recompute": round(mfu * (8 / 6 if checkpointing else 1), 4)}
    except torch.OutOfMemoryError as e:
        return {"ok": False, "error": f"OOM: {str(e)[:200]}"}
    finally:
        del model, opt, batch
        free()


def bench_training(args, device) -> dict:
    if args.smoke:
        return {"smoke_ours": train_step_bench("smoke", 2, 64, device, True, True, 1, 16),
                "smoke_hf": train_step_bench("smoke", 2, 64, device, False, True, 1, 16)}
    return {
        "0.6b_ours": train_step_bench("0.6b", 8, 2048, device, ours=True, checkpointing=False, steps=3, chunk=1024),
        "0.6b_hf": train_step_bench("0.6b", 8, 2048, device, ours=False, checkpointing=False, steps=3, chunk=0),
        "1.7b_ours_ckpt": train_step_bench("1.7b", 8, 2048, device, ours=True, checkpointing=True, steps=3, chunk=1024),
        "1.7b_hf_ckpt": train_step_bench("1.7b", 8, 2048, device, ours=False, checkpointing=True, steps=3, chunk=0),
    }


# ---------------------------------------------------------------- 4. DeepSpeed ZeRO-3
def run_deepspeed(args, stages_report) -> dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"ok": False, "skipped": "deepspeed is not installed (pip install '.[gpu]')"}
    root = stages_report.get("_root")
    if not root:
        return {"ok": False, "skipped": "no stage root"}
    sets = [a for o in stages_report["_sets"] + ["student_rl.steps=2"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "infra/accelerate/deepspeed_zero3.yaml"), "--num_processes", "1", "-m", "stages", "student_rl",
           "--config", "tiny", "--root", root + "-zero3", "--student", f"{root}/onpolicy_distill/model", *sets]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    ok = p.returncode == 0 and (Path(root + "-zero3") / "student_rl" / "manifest.json").exists()
    return {"ok": ok, "s": round(time.perf_counter() - t0, 1), **({} if ok else {"stderr_tail": p.stderr[-1500:]})}


# ---------------------------------------------------------------- main
def table(report: dict) -> str:
    rows = ["| check | result | target |", "|---|---|---|"]
    for name, s in report["stages"].items():
        if not name.startswith("_"):
            rows.append(f"| stage {name} | {'ok' if s['ok'] else 'FAILED'} in {s['s']} s | runs |")
    r = report["rollout"]
    rows.append(f"| rollouts {r['shape']} b{r['batch']} ({r['static']['decode']}) | static {r['static']['new_tok_per_s']:.0f} vs "
                f"HF generate {r['hf_generate']['new_tok_per_s']:.0f} new tok/s = {r['speedup']}x | >= 3x HF; >= 10k new tok/s |")
    for name, t in report["train"].items():
        if t.get("ok"):
            rows.append(f"| train {name} | {t['tok_per_s']:.0f} tok/s, peak {t['peak_gb']} GB, MFU {t['mfu']:.1%} "
                        f"(hw {t['hw_mfu_with_recompute']:.1%}) | 0.6b peak <= 40 GB; 1.7b MFU >= 45% |")
        else:
            rows.append(f"| train {name} | {t.get('error')} | |")
    d = report.get("deepspeed_zero3", {})
    rows.append(f"| DeepSpeed ZeRO-3, 1 GPU | {'ok' if d.get('ok') else d.get('skipped') or 'FAILED'} | a stage runs |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (< 60 s): the script's own test")
    p.add_argument("--out", default=None, help="JSON report path (default: $OUT/gpu_check.json or ./gpu_check.json)")
    p.add_argument("--skip", action="append", default=[], choices=["stages", "rollout", "train", "deepspeed"])
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device != "cuda":
        print("error: no CUDA device; use --smoke on the CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": args.smoke,
              "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
              "targets": {"rollout_speedup_vs_hf": 3.0, "rollout_new_tok_per_s": 10000, "peak_gb_0.6b": 40,
                          "mfu_1.7b": 0.45, "deepspeed_zero3": "a stage runs and publishes"}}
    t0 = time.perf_counter()
    report["stages"] = run_stages(args, device) if "stages" not in args.skip else {}
    report["rollout"] = bench_rollouts(args, device) if "rollout" not in args.skip else {}
    report["train"] = bench_training(args, device) if "train" not in args.skip else {}
    report["deepspeed_zero3"] = (run_deepspeed(args, report["stages"]) if "deepspeed" not in args.skip and not args.smoke
                                 else {"ok": False, "skipped": "smoke mode" if args.smoke else "--skip"})
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if report["rollout"] and report["stages"]:
        print(table(report))
    print(f"wall {report['wall_s']} s; report: {out}")
    return 0 if all(s["ok"] for k, s in report["stages"].items() if not k.startswith("_")) else 1


if __name__ == "__main__":
    sys.exit(main())
