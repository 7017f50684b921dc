"""Run in the vLLM venv (.venv-vllm) by tests/test_real_model.py: ``sampling.engine: vllm`` on the real
checkpoint (a cut of SmolLM2-135M-Instruct published by stage import): its BPE tokenizer, chat template,
49,152-token vocabulary and EOS.

1. Two GRPO steps (stage teacher_rl) on the chat arithmetic task with the colocated vLLM engine: before each
   update the trainer's log-probs of the engine's tokens equal the engine's (``ratio_mean`` 1).
2. Greedy rollouts of the same prompts from vLLM and from the native ``hf`` engine: the same tokens, each
   completion ending at the generation config's EOS (or at the length limit).

    .venv-vllm/bin/python tests/vllm_checks/real_model_check.py MODEL_DIR OUT_DIR     -> OUT_DIR/result.json
"""

import json
import sys
from pathlib import Path


def main(model_dir: Path, out: Path) -> None:
    from stages.config import load_config
    from stages.engines.hf import HFSampler
    from stages.engines.vllm_engine import VLLMSampler
    from stages.models import load, stop_ids
    from stages.recipes import grpo
    from stages.runtime import StageRun
    from stages.tasks import make_task

    cfg = load_config("tiny", [
        "tracking.enabled=false", "torch_threads=2", "checkpoint_every=100", "logprob_chunk=64",
        "task.style=question", "task.few_shot=2", "task.min_digits=1", "task.max_digits=2",
        "task.sizes={teacher_rl: 8, prompts: 4, student_rl: 4, validation: 2, eval: 2}",
        f"models.teacher.source={model_dir}", f"models.student.source={model_dir}",
        "teacher_rl.steps=2", "teacher_rl.prompts_per_step=2", "teacher_rl.group_size=4", "teacher_rl.optim.lr=0.0001",
        "eval.problems=2", "eval.samples=1", "eval.greedy=false",
        "sampling.engine=vllm", "sampling.max_new_tokens=12",
        "sampling.vllm={gpu_memory_utilization: 0.2, enable_sleep_mode: false, max_model_len: 512}",
    ])
    run = StageRun("teacher_rl", cfg, str(out / "root"), inputs={"policy": str(model_dir)})
    manifest = grpo.main(run, str(model_dir))
    hist = [json.loads(line) for line in (out / "root/teacher_rl/metrics.jsonl").read_text().splitlines()]
    result = {"published": bool(manifest.get("files")), "grpo_ratio_mean": [h["ratio_mean"] for h in hist],
              "grpo_completion_len": [h["completion_len"] for h in hist]}

    model, tok = load(model_dir)
    stops = stop_ids(tok, model)
    prompts = run.rollout_maker.encode(tok, make_task(cfg.task).problems("teacher_rl")[:4])
    kw = dict(temperature=1.0, max_new_tokens=12, greedy=True)
    via_vllm = VLLMSampler(stops, tok.pad_token_id, cfg.sampling.vllm).generate(model, prompts, **kw)
    native = HFSampler(stops, tok.pad_token_id).generate(model, prompts, **kw)
    v, n = via_vllm.completion_ids(), native.completion_ids()
    result |= {"stop_ids": list(stops), "vllm_tokens": v, "hf_tokens": n,
               "ended_at_eos_or_limit": all((c and c[-1] in stops) or len(c) == 12 for c in v),
               "vllm_text": tok.batch_decode(v, skip_special_tokens=True)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn processes: the entry point must be guarded
    main(Path(sys.argv[1]), Path(sys.argv[2]))
