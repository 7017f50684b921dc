"""Colocated vLLM rollouts for production GPU images (``pip install '.[vllm]'`` in its own image).

vLLM pins its own torch and transformers (vllm 0.33.0: torch 2.14.0, transformers<5.21), so it cannot run
in the stage environment of these machines. What runs here (tests/test_gpu_path.py) is the pure part:
request building and the conversion of vLLM ``RequestOutput`` objects into :class:`Rollouts`, checked
against fake outputs shaped like vLLM's. The engine calls themselves follow vLLM's documented API and
TRL's colocate mode and have NOT been exercised (see README, "GPU path").

- One ``vllm.LLM`` per sampled model, created on first use from the model's checkpoint folder
  (``model.name_or_path``), in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate
  mode sets it), with ``logprobs_mode="processed_logprobs"`` so the returned log-probs are of
  softmax(logits / T) like the native engines' (vLLM's default reports the raw, untempered ones).
- Before each generate the trainer's current weights are pushed into the engine:
  ``llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights(state_dict.items())``,
  the path TRL's ``GRPOTrainer._move_model_to_vllm`` (vllm_mode="colocate") and verl's sharding manager
  use; if that attribute path moves, ``LLM.collective_rpc`` with a callable taking the worker is the
  documented fallback and is tried next.
- With ``enable_sleep_mode`` the KV cache is released (``llm.sleep(level=1)``) after each generate and
  re-allocated (``llm.wake_up()``) before the next, so training gets the memory back.
- Seeds: each request gets ``SamplingParams(seed=hash(seed, row))``; vLLM's tokens are reproducible run to
  run but are NOT the native engines' tokens for the same seed (different sampler). Entropy is not
  reported by vLLM: the Rollouts' entropy is 0 for this engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from ..rollout import Rollouts, Sampler

log = logging.getLogger("stages")


def request_seed(seed: int, row: int) -> int:
    """A per-request 31-bit seed: the same rollout row always gets the same vLLM stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:4], "big") >> 1


def build_requests(prompts: list[list[int]], *, temperature: float, max_new_tokens: int, greedy: bool, seed: int,
                   eos_id, sampling_params_cls, first_row: int = 0) -> tuple[list[dict], list]:
    """vLLM prompts (``{"prompt_token_ids": ...}``, TokensPrompt's shape) and one ``SamplingParams`` per row.

    ``n=1`` per request, ``logprobs=0`` (the sampled token's log-prob only), no top-k/top-p, stop at the
    stop ids only (``eos_id``: the tokenizer's EOS and the generation config's; ``ignore_eos=False``,
    ``stop_token_ids``), the stop token kept in the output. Negative ids never stop a row (none left:
    ``ignore_eos=True``), as they never match a token in the native engines: every completion is then
    ``max_new_tokens`` long (the benchmarks' equal-work setting).
    """
    reqs = [{"prompt_token_ids": list(p)} for p in prompts]
    stop = [i for i in ([eos_id] if isinstance(eos_id, int) else eos_id) if i >= 0]
    params = [sampling_params_cls(n=1, temperature=0.0 if greedy else temperature, top_p=1.0, top_k=-1,
                                  max_tokens=max_new_tokens, seed=request_seed(seed, first_row + i), logprobs=0,
                                  stop_token_ids=stop, ignore_eos=not stop,
                                  skip_special_tokens=False, detokenize=False)
              for i in range(len(prompts))]
    return reqs, params


def _token_logprob(entry, token: int) -> float:
    """One position of ``CompletionOutput.logprobs``: a dict token id -> Logprob(logprob=...) (or a float)."""
    lp = entry[token]
    return float(getattr(lp, "logprob", lp))


def outputs_to_rollouts(prompts: list[list[int]], outputs, eos_id: int, pad_id: int, temperature: float = 1.0) -> Rollouts:
    """vLLM ``RequestOutput`` list (same order as ``prompts``) -> :class:`Rollouts` in the native layout:
    prompts left-padded to P, completions right-padded to the longest, EOS included, log-probs of the
    sampled tokens from ``outputs[i].outputs[0].logprobs``."""
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    comps, lps = [], []
    for p, out in zip(prompts, outputs):
        if list(out.prompt_token_ids) != list(p):
            raise ValueError("vLLM output order does not match the prompts")
        c = out.outputs[0]
        toks = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(toks):
            raise ValueError("vLLM output has no per-token logprobs: SamplingParams(logprobs=0) is required")
        comps.append(toks)
        lps.append([_token_logprob(e, t) for e, t in zip(c.logprobs, toks)])
    B, P = len(prompts), max(len(p) for p in prompts)
    N = max(1, max(len(c) for c in comps))
    ids = torch.full((B, P + N), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + N), dtype=torch.long)
    comp = torch.zeros((B, P + N), dtype=torch.long)
    logp = torch.zeros((B, P + N))
    for i, (p, c, lp) in enumerate(zip(prompts, comps, lps)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        attn[i, P - len(p) : P + len(c)] = 1
        if c:
            ids[i, P : P + len(c)] = torch.tensor(c)
            comp[i, P : P + len(c)] = 1
            logp[i, P : P + len(c)] = torch.tensor(lp)
    return Rollouts(ids, attn, comp, logp, torch.zeros((B, P + N)), P, temperature)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def lora_rank_bucket(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    for b in VLLM_LORA_RANKS:
        if r <= b:
            return b
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


class VLLMSampler(Sampler):
    """Colocated vLLM engine; see the module docstring for what is and is not exercised.

    LoRA (``models.<role>.lora``, stages/lora.py): the engine loads the frozen base once with
    ``enable_lora`` and samples through a ``LoRARequest``. A model training an adapter syncs only the
    adapter between steps: its weights are written to a scratch folder (a few MB) and loaded under a new
    LoRA id, the previous id removed (vLLM caches adapters by id); the base weights never move. A frozen
    model loaded as base + adapter (a LoRA teacher) is served as that base + that published adapter."""

    def __init__(self, eos_id, pad_id: int, options):
        self.eos_id, self.pad_id, self.opt = [eos_id] if isinstance(eos_id, int) else list(eos_id), pad_id, options
        self._llms: dict[int, object] = {}
        self._lora: dict[int, object] = {}  # model -> its current LoRARequest
        self._scratch: Path | None = None
        self.last_sync_s: float | None = None  # seconds the last weight sync took (bench/lora.py reads it)
        self.last_sync_bytes: int | None = None

    def _lora_source(self, model) -> tuple[str, int] | None:
        """(base folder, rank) when ``model`` is served as base + LoRA adapter, else None."""
        from .. import lora

        a = lora.adapter_of(model)
        if a is not None:
            if a.base_path is None:
                raise ValueError("sampling.engine vllm: the adapter's base has no folder to load (a base merged in memory "
                                 "when the stage did not know it would sample with vLLM)")
            return a.base_path, a.spec.r
        src = lora.source_of(model)
        return (src["base"], src["r"]) if src else None

    def _llm(self, model):
        key = id(model)
        if key not in self._llms:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process (colocate)
            from vllm import LLM

            path = getattr(model, "name_or_path", None) or model.config._name_or_path
            lora_kw = {}
            source = self._lora_source(model)
            if source is not None:
                path = source[0]
                lora_kw = {"enable_lora": True, "max_lora_rank": lora_rank_bucket(source[1]), "max_loras": 1}
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            self._llms[key] = LLM(model=path, dtype=dtype, gpu_memory_utilization=self.opt.gpu_memory_utilization,
                                  enable_sleep_mode=self.opt.enable_sleep_mode, logprobs_mode="processed_logprobs",
                                  max_model_len=self.opt.max_model_len, seed=0, enable_prefix_caching=True, **lora_kw)
        return self._llms[key]

    def _lora_request(self, llm, model):
        """The LoRARequest to sample ``model`` with (None without LoRA), after syncing a training adapter."""
        from vllm.lora.request import LoRARequest

        from .. import lora

        key = id(model)
        a = lora.adapter_of(model)
        if a is None:
            src = lora.source_of(model)
            if src and key not in self._lora:  # a frozen base + adapter: its published folder, once
                self._lora[key] = LoRARequest(src["name"], 1, src["adapter"])
            return self._lora.get(key)
        import time

        t0 = time.perf_counter()
        old = self._lora.get(key)
        n = (old.lora_int_id + 1) if old else 1
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="s2d-vllm-lora-"))
            weakref.finalize(self, shutil.rmtree, str(self._scratch), True)
        folder = self._scratch / f"{key}-v{n}"
        self.last_sync_bytes = lora.save_adapter(model, None, folder)
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)  # vLLM caches adapters by id: the old weights must go
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self._lora[key] = LoRARequest(f"policy-v{n}", n, str(folder))
        self.last_sync_s = time.perf_counter() - t0
        return self._lora[key]

    def _push_weights(self, llm, model) -> None:
        """Load the trainer's current weights into the engine (see module docstring)."""
        state = list(model.state_dict().items())
        try:
            # vLLM's in-place reload: runs the model's own post-load processing (the CPU build repacks
            # linear weights after loading; a raw ``model.load_weights`` into a processed model fails with
            # "'Parameter' object has no attribute 'weight_loader'")
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state})
        except AttributeError:  # a vLLM without Worker.reload_weights: TRL colocate mode's path
            runner_model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            runner_model.load_weights(state)
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()  # cached KV of the old weights must not be reused

    @torch.no_grad()
    def generate(self, model, prompts, *, temperature, max_new_tokens, greedy=False, seed=0, first_row=0) -> Rollouts:
        from vllm import SamplingParams

        llm = self._llm(model)
        if self.opt.enable_sleep_mode:
            llm.wake_up()
        lora_request = None
        if self._lora_source(model) is not None:  # LoRA: only the adapter moves (see the class docstring)
            lora_request = self._lora_request(llm, model)
        elif any(p.requires_grad for p in model.parameters()):  # a frozen teacher never changes
            import time

            t0 = time.perf_counter()
            self._push_weights(llm, model)
            self.last_sync_s = time.perf_counter() - t0
            self.last_sync_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        reqs, params = build_requests(prompts, temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy,
                                      seed=seed, eos_id=self.eos_id, sampling_params_cls=SamplingParams,
                                      first_row=first_row)
        outputs = llm.generate(reqs, params, use_tqdm=False, lora_request=lora_request)
        if self.opt.enable_sleep_mode:
            llm.sleep(level=1)
        device = next(model.parameters()).device
        return outputs_to_rollouts(prompts, outputs, self.eos_id, self.pad_id, temperature).to(device)
