"""Run in the vLLM venv (.venv-vllm) by tests/test_vllm_engine.py: ``sampling.engine: vllm`` for real.

1. A few GRPO steps (stage teacher_rl) on a tiny model with the colocated vLLM engine: the engine's
   sampled log-probs against the trainer's log-probs of the same tokens (``ratio_mean`` before each
   update, one minibatch and one epoch: exactly exp(logp_trainer - logp_engine) averaged).
2. The engine samples with the trainer's latest weights: change the weights, generate again, and the
   new log-probs are the changed model's (not the old one's).

    .venv-vllm/bin/python tests/vllm_checks/colocated_check.py OUT_DIR     -> OUT_DIR/result.json
"""

import copy
import json
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from stages.config import TinyArch, load_config
    from stages.engines.vllm_engine import VLLMSampler
    from stages.models import char_tokenizer, load, save, tiny_qwen3
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
        # the digit task (tests/digit_task.py) gives a random model reward signal at once, so every step
        # updates the weights, and a stale engine would show as a ratio away from 1 at the next step
        "task.kind=digit_task:make_task",
        "teacher_rl.steps=4", "teacher_rl.prompts_per_step=4", "teacher_rl.group_size=8", "teacher_rl.optim.lr=0.01",
        "eval.problems=4", "eval.samples=1", "eval.greedy=false",
        "sampling.engine=vllm", "sampling.max_new_tokens=4",
        "sampling.vllm={gpu_memory_utilization: 0.2, enable_sleep_mode: false, max_model_len: 128}",
    ])
    run = StageRun("teacher_rl", cfg, str(out / "root"), inputs={"policy": str(base)})
    manifest = grpo.main(run, str(base))
    hist = [json.loads(line) for line in (out / "root/teacher_rl/metrics.jsonl").read_text().splitlines()]
    result = {"grpo_ratio_mean": [h["ratio_mean"] for h in hist], "grpo_grad_norm": [h["grad_norm"] for h in hist],
              "grpo_reward": [h["reward"] for h in hist], "published": bool(manifest.get("files"))}

    # 2. weights: the sampler pushes the trainer's current weights before each generate
    model, _ = load(base)
    sampler = VLLMSampler(tok.eos_token_id, tok.pad_token_id, cfg.sampling.vllm)
    prompts = [[tok.bos_token_id] + tok(f"{a}+{a}=", add_special_tokens=False)["input_ids"] for a in range(10, 18)]
    kw = dict(temperature=1.0, max_new_tokens=12, seed=7)
    before = sampler.generate(model, prompts, **kw)
    old = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    after = sampler.generate(model, prompts, **kw)
    m = after.completion.bool()
    with torch.no_grad():
        new_lp, old_lp = token_logprobs(model, after), token_logprobs(old, after)
        again_old = token_logprobs(old, before)
    result |= {
        "before_vs_old_trainer_max_abs": float((again_old - before.logprobs)[before.completion.bool()].abs().max()),
        "after_vs_new_trainer_max_abs": float((new_lp - after.logprobs)[m].abs().max()),
        "after_vs_old_trainer_max_abs": float((old_lp - after.logprobs)[m].abs().max()),
        "tokens_changed": before.completion_ids() != after.completion_ids(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn processes: the entry point must be guarded
    main(Path(sys.argv[1]))
