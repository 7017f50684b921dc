"""Run in the vLLM venv (.venv-vllm) by tests/test_lora_vllm.py: LoRA through ``sampling.engine: vllm`` for real.

1. GRPO steps (stage teacher_rl) training a LoRA adapter with the colocated vLLM engine: vLLM holds the frozen
   base and samples through a ``LoRARequest``; between steps only the adapter is synced (its bytes recorded).
   Before each update the trainer's log-probs of the engine's tokens equal the engine's (ratio 1): the
   engine samples with the adapter's latest weights.
2. The published adapter as a frozen input (a LoRA teacher): the vLLM engine serves base + the published
   adapter, and its log-probs are those of the merged model the trainer holds.

    .venv-vllm/bin/python tests/vllm_checks/lora_check.py OUT_DIR     -> OUT_DIR/result.json
"""

import json
import sys
import time
from pathlib import Path

import torch


def main(out: Path) -> None:
    from stages.config import TinyArch, load_config
    from stages.engines.vllm_engine import VLLMSampler
    from stages.models import char_tokenizer, save, tiny_qwen3
    from stages.recipes import grpo
    from stages.rollout import token_logprobs
    from stages.runtime import StageRun

    tok = char_tokenizer()
    base = out / "base"
    # head_dim 64: the CPU build's attention supports only some head sizes
    save(tiny_qwen3(TinyArch(hidden_size=128, layers=2, heads=2, kv_heads=1, intermediate_size=256), tok, seed=0), tok, base)
    cfg = load_config("tiny", [
        "tracking.enabled=false", "torch_threads=1", "checkpoint_every=100",
        "task.sizes={bootstrap: 10, teacher_rl: 40, prompts: 10, student_rl: 10, validation: 10, eval: 8}",
        "task.kind=digit_task:make_task",
        "teacher_rl.steps=3", "teacher_rl.prompts_per_step=4", "teacher_rl.group_size=8", "teacher_rl.optim.lr=0.05",
        "models.teacher.lora={r: 8, alpha: 16}",
        "eval.problems=4", "eval.samples=1", "eval.greedy=false",
        "sampling.engine=vllm", "sampling.max_new_tokens=4",
        "sampling.vllm={gpu_memory_utilization: 0.2, enable_sleep_mode: false, max_model_len: 128}",
    ])
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
    full_bytes = (base / "model.safetensors").stat().st_size
    result = {"grpo_ratio_mean": [h["ratio_mean"] for h in hist], "grpo_grad_norm": [h["grad_norm"] for h in hist],
              "adapter_bytes": manifest["adapters"]["model"]["adapter_bytes"], "full_bytes": full_bytes,
              "sync_bytes": [b for b, _ in syncs], "sync_s": [s for _, s in syncs], "grpo_s": time.perf_counter() - t0}

    # 2. the published adapter as a frozen input: vLLM serves base + adapter = the merged model held here
    adapter = manifest["outputs"]["model"]
    frozen = StageRun("evaluate/lora", cfg, str(out / "root"))
    model, _ = frozen.load_model(adapter, "teacher")
    sampler = VLLMSampler(tok.eos_token_id, tok.pad_token_id, cfg.sampling.vllm)
    prompts = [[tok.bos_token_id] + tok(f"{a}+{a}=", add_special_tokens=False)["input_ids"] for a in range(10, 18)]
    ro = sampler.generate(model, prompts, temperature=1.0, max_new_tokens=8, seed=7)
    m = ro.completion.bool()
    with torch.no_grad():
        lp = token_logprobs(model, ro)
        base_model = type(model).from_pretrained(str(base))
        base_lp = token_logprobs(base_model, ro)
    result |= {"frozen_vs_merged_max_abs": float((lp - ro.logprobs)[m].abs().max()),
               "frozen_vs_base_max_abs": float((base_lp - ro.logprobs)[m].abs().max()),
               "frozen_sync_bytes": sampler.last_sync_bytes}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn processes: the entry point must be guarded
    main(Path(sys.argv[1]))
