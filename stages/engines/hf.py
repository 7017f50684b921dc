"""The ``hf`` rollout engine: batched sampling with a ``DynamicCache`` over any HF causal LM (the CPU default).

One Python-launched forward per token; the sampling rule is the one all native engines share
(:func:`stages.rollout.sample_tokens` at uniforms from :func:`stages.rollout.draw_uniforms`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..rollout import Rollouts, Sampler, assemble, cache_kwarg, concat, draw_uniforms, left_pad, sample_tokens, stop_tensor


class HFSampler(Sampler):
    """Batched sampling with a KV cache over any HF causal LM; stops each row at EOS."""

    def __init__(self, eos_id, pad_id: int, batch_size: int = 256):
        self.eos_ids, self.pad_id, self.batch_size = stop_tensor(eos_id), pad_id, batch_size

    def generate(self, model, prompts, *, temperature, max_new_tokens, greedy=False, seed=0, first_row=0) -> Rollouts:
        u = draw_uniforms(seed, first_row + len(prompts), max_new_tokens)[first_row:]
        parts = [self._generate(model, prompts[i : i + self.batch_size], temperature, max_new_tokens, greedy,
                                u[i : i + self.batch_size])
                 for i in range(0, len(prompts), self.batch_size)]
        return parts[0] if len(parts) == 1 else concat(parts, self.pad_id)

    @torch.no_grad()  # not inference_mode: rollouts feed autograd later (embedding saves its indices)
    def _generate(self, model, prompts, temperature, max_new_tokens, greedy, u) -> Rollouts:
        device = next(model.parameters()).device
        ids, attn = left_pad(prompts, self.pad_id)
        B, P = ids.shape
        ids, attn, u = ids.to(device), attn.to(device), u.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = {cache_kwarg(model): DynamicCache()}
        was_training = model.training
        model.eval()
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, **cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        next_pos = pos[:, -1:] + 1
        toks, lps, ents = [], [], []
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tok, lp, ent = sample_tokens(logits, u[:, t], temperature, greedy)
            live = ~done
            tok = torch.where(live, tok, self.pad_id)
            toks.append(tok)
            lps.append(torch.where(live, lp, 0.0))
            ents.append(torch.where(live, ent, 0.0))
            attn = torch.cat([attn, live.long()[:, None]], dim=1)
            done = done | torch.isin(tok, self.eos_ids.to(device))
            if done.all():
                break
            logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, **cache,
                           use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        model.train(was_training)
        return assemble(ids, attn, torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(ents, 1), temperature)
