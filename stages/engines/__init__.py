"""Rollout engines behind the one :class:`stages.rollout.Sampler` interface.

- ``hf``: :class:`stages.engines.hf.HFSampler`, DynamicCache, any HF causal LM (the CPU default);
- ``static``: :class:`stages.engines.static.StaticSampler`, a static KV cache with a CUDA-graph-captured
  decode step on GPUs (eager on the CPU), the same tokens as ``hf`` for the same seed;
- ``vllm``: :class:`stages.engines.vllm_engine.VLLMSampler`, colocated vLLM (its own image: ``.[vllm]``).
"""

from __future__ import annotations

from ..rollout import Sampler
from .hf import HFSampler


def make_sampler(sampling, eos_id, pad_id: int, device: str = "cpu") -> Sampler:
    """The engine ``sampling.engine`` names, configured from the ``sampling`` config section; ``eos_id``: the
    stop id, or all of them (:func:`stages.models.stop_ids`)."""
    if sampling.engine == "hf":
        return HFSampler(eos_id, pad_id, sampling.batch_size)
    if sampling.engine == "static":
        from .static import StaticSampler

        return StaticSampler(eos_id, pad_id, sampling.batch_size, decode=sampling.decode,
                             stop_check_every=sampling.stop_check_every)
    if sampling.engine == "vllm":
        from .vllm_engine import VLLMSampler

        return VLLMSampler(eos_id, pad_id, sampling.vllm)
    raise ValueError(f"unknown sampling.engine '{sampling.engine}'")
