"""The fast native rollout engine: a static KV cache and a decode step that is one CUDA graph replay.

HF ``generate`` decodes launch-bound on GPUs (hundreds of small kernels per token, each launched from
Python). Here the whole per-token step — model forward over a ``StaticCache``, sampling by inverse CDF at
the pre-drawn uniform, masking finished rows, writing the outputs, advancing position and step counters —
works in place on fixed buffers, with the step index kept on the device. So on CUDA it is captured once
per sub-batch as a CUDA graph and replayed; the host only checks every ``stop_check_every`` steps whether
every row has emitted EOS (the one sync). On the CPU the same step function runs eagerly, which is how
the tests check that it produces the same tokens as :class:`stages.engines.hf.HFSampler`.

    sampler = StaticSampler(eos_id, pad_id, batch_size=256)          # decode="auto": graphs on CUDA
    ro = sampler.generate(model, prompts, temperature=1.0, max_new_tokens=256, seed=0)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import StaticCache

from ..rollout import Rollouts, Sampler, assemble, cache_kwarg, concat, draw_uniforms, left_pad, sample_tokens, stop_tensor

log = logging.getLogger("stages")


@dataclass
class DecodeState:
    """Everything one decode step reads and writes, at fixed addresses (a CUDA graph replays on them)."""

    tok: torch.Tensor  # [B] the last sampled token (input of the next forward)
    pos: torch.Tensor  # [B] its position id (left padding: counted from each row's first real token)
    attn: torch.Tensor  # [B, P+N] 1 on real prompt tokens and on completion tokens sampled while live
    done: torch.Tensor  # [B] bool, EOS already emitted
    t: torch.Tensor  # [1] index of the token the next step samples
    u: torch.Tensor  # [B, N] the uniforms
    out_tok: torch.Tensor  # [B, N]
    out_lp: torch.Tensor  # [B, N]
    out_ent: torch.Tensor  # [B, N]


def decode_step(model, cache, s: DecodeState, prompt_len: int, temperature: float, greedy: bool,
                eos_id: int, pad_id: int, cache_kw: str = "cache") -> None:
    """Sample token ``t`` for every row, in place. No host sync, no data-dependent Python control flow.
    ``cache_kw``: the forward's name for the KV cache (:func:`stages.rollout.cache_kwarg`)."""
    B = s.tok.shape[0]
    logits = model(input_ids=s.tok[:, None], attention_mask=s.attn, position_ids=s.pos[:, None], **{cache_kw: cache},
                   use_cache=True).logits[:, -1]
    idx = s.t.expand(B).unsqueeze(1)
    tok, lp, ent = sample_tokens(logits, s.u.gather(1, idx).squeeze(1), temperature, greedy)
    _record(s, idx, tok, lp, ent, prompt_len, eos_id, pad_id)
    s.pos.add_(1)


def _record(s: DecodeState, idx, tok, lp, ent, prompt_len, eos_id, pad_id) -> None:
    live = ~s.done
    tok = torch.where(live, tok, pad_id)
    s.out_tok.scatter_(1, idx, tok[:, None])
    s.out_lp.scatter_(1, idx, torch.where(live, lp, 0.0)[:, None])
    s.out_ent.scatter_(1, idx, torch.where(live, ent, 0.0)[:, None])
    s.attn.scatter_(1, idx + prompt_len, live.to(s.attn.dtype)[:, None])
    s.done.logical_or_(torch.isin(tok, eos_id))  # eos_id: one id or a tensor of stop ids
    s.tok.copy_(tok)
    s.t.add_(1)


class StaticSampler(Sampler):
    """Static-cache engine. ``decode``: ``auto`` (CUDA graphs on CUDA, eager elsewhere), ``cuda_graph``,
    ``eager``. Same sampling semantics as :class:`stages.engines.hf.HFSampler` (shared uniforms, inverse CDF)."""

    def __init__(self, eos_id, pad_id: int, batch_size: int = 256, decode: str = "auto",
                 stop_check_every: int = 16):
        if decode not in ("auto", "cuda_graph", "eager"):
            raise ValueError(f"decode must be auto, cuda_graph or eager, got '{decode}'")
        if stop_check_every < 1:
            raise ValueError("stop_check_every must be >= 1")
        self.eos_ids, self.pad_id, self.batch_size = stop_tensor(eos_id), pad_id, batch_size
        self.decode, self.stop_check_every = decode, stop_check_every
        self.last_mode: str | None = None  # what the last generate used (for benchmarks and logs)

    def generate(self, model, prompts, *, temperature, max_new_tokens, greedy=False, seed=0, first_row=0) -> Rollouts:
        u = draw_uniforms(seed, first_row + len(prompts), max_new_tokens)[first_row:]
        parts = [self._generate(model, prompts[i : i + self.batch_size], u[i : i + self.batch_size], temperature,
                                greedy) for i in range(0, len(prompts), self.batch_size)]
        return parts[0] if len(parts) == 1 else concat(parts, self.pad_id)

    def _mode(self, device: torch.device) -> str:
        if self.decode == "auto":
            return "cuda_graph" if device.type == "cuda" else "eager"
        if self.decode == "cuda_graph" and device.type != "cuda":
            raise ValueError("sampling.decode=cuda_graph needs a CUDA device; use auto or eager")
        return self.decode

    @torch.no_grad()  # not inference_mode: rollouts feed autograd later
    def _generate(self, model, prompts, u, temperature, greedy) -> Rollouts:
        device = next(model.parameters()).device
        mode = self.last_mode = self._mode(device)
        ids, p_attn = left_pad(prompts, self.pad_id)
        eos = self.eos_ids.to(device)
        B, P = ids.shape
        N = u.shape[1]
        ids = ids.to(device)
        attn = torch.zeros((B, P + N), dtype=torch.long, device=device)
        attn[:, :P] = p_attn
        pos = (attn[:, :P].cumsum(-1) - 1).clamp(min=0)
        was_training = model.training
        model.eval()
        cache = StaticCache(config=model.config, max_cache_len=P + N)
        cache_kw = cache_kwarg(model)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, **{cache_kw: cache}, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        s = DecodeState(
            tok=torch.zeros(B, dtype=torch.long, device=device), pos=pos[:, -1] + 1, attn=attn,
            done=torch.zeros(B, dtype=torch.bool, device=device), t=torch.zeros(1, dtype=torch.long, device=device),
            u=u.to(device), out_tok=torch.full((B, N), self.pad_id, dtype=torch.long, device=device),
            out_lp=torch.zeros((B, N), device=device), out_ent=torch.zeros((B, N), device=device))
        idx = s.t.expand(B).unsqueeze(1)
        tok, lp, ent = sample_tokens(logits, s.u[:, 0], temperature, greedy)
        _record(s, idx, tok, lp, ent, P, eos, self.pad_id)

        def step():
            decode_step(model, cache, s, P, temperature, greedy, eos, self.pad_id, cache_kw)

        every = self.stop_check_every if mode == "cuda_graph" else 1
        t = 1
        if N > 1 and not bool(s.done.all()):
            if mode == "cuda_graph":
                # warm up on a side stream (lazy cuBLAS/attention init must not happen during capture),
                # as torch.cuda.graphs documents; the warm-up is the real step 1
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream(device).wait_stream(side)
                t = 2
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()  # recorded, not run
                run = graph.replay
            else:
                run = step
            while t < N:
                if t % every == 0 and bool(s.done.all()):
                    break
                run()
                t += 1
        model.train(was_training)
        live_cols = attn[:, P:].any(0)
        n = int(live_cols.nonzero().max()) + 1  # trailing steps where every row had finished: dropped
        return assemble(ids, attn[:, : P + n], s.out_tok[:, :n], s.out_lp[:, :n], s.out_ent[:, :n], temperature)
