"""Run in the vLLM venv (.venv-vllm) by tests/test_lora_vllm.py (a tiny random model) and tests/test_real_model.py
(the real checkpoint's 2-layer cut): LoRA through ``sampling.engine: vllm`` for real.

1. GRPO steps (stage teacher_rl) training a LoRA adapter with the colocated vLLM engine: vLLM holds the frozen
   base and samples through a ``LoRARequest``; between steps only the adapter is synced (its bytes recorded).
   Before each update the trainer's log-probs of the engine's tokens equal the engine's (ratio 1): the
   engine samples with the adapter's latest weights.
2. The published adapter as a frozen input (a LoRA teacher): the vLLM engine serves base + the published
   adapter, and its log-probs are those of the merged model the trainer holds, not the base's.

The model: without MODEL_DIR a tiny random Qwen3 with the character tokenizer, saved here (the digit task);
with MODEL_DIR that Hugging Face folder (the imported SmolLM2 cut: BPE tokenizer, chat template, its EOS), on
the arithmetic questions with few-shot chat turns. Prompts go through the stages' own encoding
(``stages.prompting``: the chat template when the tokenizer has one, raw text after BOS otherwise).

    .venv-vllm/bin/python tests/vllm_checks/lora_check.py OUT_DIR [MODEL_DIR]     -> OUT_DIR/result.json

The tests call :func:`run` (the subprocess) and :func:`check` (what the result must show).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

COMMON = [
    "tracking.enabled=false", "checkpoint_every=100",
    "models.teacher.lora={r: 8, alpha: 16}",
    "eval.samples=1", "eval.greedy=false",
    "sampling.engine=vllm",
]
TINY = COMMON + [
    "torch_threads=1",
    "task.sizes={bootstrap: 10, teacher_rl: 40, prompts: 10, student_rl: 10, validation: 10, eval: 8}",
    "task.kind=digit_task:make_task",
    "teacher_rl.steps=3", "teacher_rl.prompts_per_step=4", "teacher_rl.group_size=8", "teacher_rl.optim.lr=0.05",
    "eval.problems=4", "sampling.max_new_tokens=4",
    "sampling.vllm={gpu_memory_utilization: 0.2, enable_sleep_mode: false, max_model_len: 128}",
]
# the real cut: the chat questions with two solved turns (as tests/test_real_model.py's SMOKE), a dense reward
# (tests/digit_task.py: the exact answer never comes from a 2-layer cut, so the verifier alone gives no gradient)
REAL = COMMON + [
    "torch_threads=2", "logprob_chunk=64",
    "task.kind=digit_task:make_shaped_task", "task.style=question", "task.options={few_shot: 2}", "task.min_digits=1",
    "task.max_digits=2", "task.sizes={teacher_rl: 8, prompts: 4, student_rl: 4, validation: 2, eval: 8}",
    "teacher_rl.steps=3", "teacher_rl.prompts_per_step=2", "teacher_rl.group_size=4", "teacher_rl.optim.lr=0.002",
    "eval.problems=2", "sampling.max_new_tokens=8",
    "sampling.vllm={gpu_memory_utilization: 0.2, enable_sleep_mode: false, max_model_len: 512}",
]


def base_model(out: Path, model_dir: Path | None) -> tuple[Path, list[str]]:
    """(the base folder, the config overrides): the tiny random model saved under ``out``, or ``model_dir``."""
    if model_dir is None:
        from stages.config import TinyArch
        from stages.models import char_tokenizer, save, tiny_qwen3

        tok = char_tokenizer()
        base = out / "base"
        # head_dim 64: the CPU build's attention supports only some head sizes
        save(tiny_qwen3(TinyArch(hidden_size=128, layers=2, heads=2, kv_heads=1, intermediate_size=256), tok, seed=0), tok, base)
        return base, TINY
    return model_dir, REAL + [f"models.teacher.source={model_dir}", f"models.student.source={model_dir}"]


def main(out: Path, model_dir: Path | None = None) -> None:
    from stages.config import load_config
    from stages.engines.vllm_engine import VLLMSampler
    from stages.models import stop_ids
    from stages.recipes import grpo
    from stages.rollout import token_logprobs
    from stages.runtime import StageRun

    base, overrides = base_model(out, model_dir)
    cfg = load_config("tiny", overrides)
    run = StageRun("teacher_rl", cfg, str(out / "root"), inputs={"policy": str(base)})
    syncs = []
    real = VLLMSampler.generate

    def spy(self, *a, **k):
        r = real(self, *a, **k)
        syncs.append((self.last_sync_bytes, self.last_sync_s))
        return r

    VLLMSampler.generate = spy
    t0 = time.perf_counter()
    manifest = grpo.main(run, str(base))
    hist = [json.loads(line) for line in (out / "root/teacher_rl/metrics.jsonl").read_text().splitlines()]
    full_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    entry = manifest["adapters"]["model"]
    result = {"grpo_ratio_mean": [h["ratio_mean"] for h in hist], "grpo_grad_norm": [h["grad_norm"] for h in hist],
              "grpo_reward": [h["reward"] for h in hist], "adapter_bytes": entry["adapter_bytes"],
              "trainable_params": entry["trainable_params"], "full_bytes": full_bytes,
              "sync_bytes": [b for b, _ in syncs], "sync_s": [s for _, s in syncs], "grpo_s": time.perf_counter() - t0}

    # 2. the published adapter as a frozen input: vLLM serves base + adapter = the merged model held here
    adapter = manifest["outputs"]["model"]
    frozen = StageRun("evaluate/lora", cfg, str(out / "root"))
    model, tok = frozen.load_model(adapter, "teacher")
    sampler = VLLMSampler(stop_ids(tok, model), tok.pad_token_id, cfg.sampling.vllm)
    prompts = frozen.rollout_maker.encode(tok, frozen.task.problems("eval")[:8])  # the chat template when there is one
    ro = sampler.generate(model, prompts, temperature=1.0, max_new_tokens=8, seed=7)
    m = ro.completion.bool()
    with torch.no_grad():
        lp = token_logprobs(model, ro, cfg.logprob_chunk)
        base_lp = token_logprobs(type(model).from_pretrained(str(base)), ro, cfg.logprob_chunk)
    result |= {"frozen_vs_merged_max_abs": float((lp - ro.logprobs)[m].abs().max()),
               "frozen_vs_base_max_abs": float((base_lp - ro.logprobs)[m].abs().max()),
               "frozen_sync_bytes": sampler.last_sync_bytes, "frozen_tokens": int(m.sum()),
               "prompt_tokens": [len(p) for p in prompts], "frozen_text": tok.batch_decode(ro.completion_ids()[:2])}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def run(out: Path, model_dir: Path | None = None, threads: int = 1) -> dict:
    """This check in the vLLM venv (from a test in the main one); its result."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # a fixed 1 GiB KV cache (see test_vllm_engine.py)
    cmd = [str(REPO / ".venv-vllm/bin/python"), __file__, str(out)] + ([str(model_dir)] if model_dir else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def check(r: dict, max_adapter_fraction: float, ratio_tol: float = 1e-3, frozen_tol: float = 1e-4) -> None:
    """What the result must show, for either model."""
    # every step moved the adapter, and the engine sampled with its latest weights: ratio 1 before each update
    assert r["grpo_grad_norm"] and all(g > 0 for g in r["grpo_grad_norm"]), r
    assert all(abs(x - 1) < ratio_tol for x in r["grpo_ratio_mean"]), r
    # only the adapter crossed into vLLM between steps, every step (one sync per generate: steps + 2 evaluations)
    assert len(r["sync_bytes"]) >= len(r["grpo_ratio_mean"]), r
    assert all(b == r["adapter_bytes"] < r["full_bytes"] * max_adapter_fraction for b in r["sync_bytes"]), r
    # a published adapter as a frozen input: vLLM's base + adapter = the merged model, not the base
    assert r["frozen_tokens"] > 0
    assert r["frozen_vs_merged_max_abs"] < frozen_tol, r
    assert r["frozen_vs_base_max_abs"] > 1e-3, r
    assert r["frozen_sync_bytes"] is None  # nothing pushed for a frozen model


if __name__ == "__main__":  # vLLM may spawn processes: the entry point must be guarded
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
