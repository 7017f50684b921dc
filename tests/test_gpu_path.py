"""The GPU path, checked on the CPU: shared sampling semantics (inverse CDF against a float64
reference), the static-cache engine against the HF sampler token for token, the static decode step traced
whole by dynamo (what CUDA-graph capture needs: no host sync), vLLM's pure parts against fake outputs
shaped like vLLM's (vLLM itself cannot run here), the accelerate relaunch, a stage under
``accelerate launch`` with 2 CPU processes, and the GPU check script's smoke mode."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.cli import relaunch_command
from stages.config import TinyArch, VLLMOptions, load_config
from stages.engines import make_sampler
from stages.engines.hf import HFSampler
from stages.engines.static import StaticSampler
from stages.engines.vllm_engine import build_requests, outputs_to_rollouts, request_seed
from stages.models import char_tokenizer, tiny_qwen3
from stages.rollout import concat, draw_uniforms, sample_tokens, token_logprobs

REPO = Path(__file__).resolve().parents[1]
ARCH = TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)


def _prompts(tok, texts):
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# ------------------------------------------------------------------ sampling semantics
def test_inverse_cdf_sampling_matches_float64_reference():
    logits = torch.tensor([[0.0, 1.0, -float("inf"), 2.0], [3.0, 3.0, 0.5, -1.0]])
    T = 0.7
    u = torch.tensor([0.3, 0.97])
    tok, lp, ent = sample_tokens(logits, u, T)
    for b in range(2):
        z = [float(x) / T for x in logits[b].tolist()]
        m = max(z)
        w = [0.0 if x == -float("inf") else pow(2.718281828459045, x - m) for x in z]
        p = [x / sum(w) for x in w]
        c, want = 0.0, None
        for i, pi in enumerate(p):
            c += pi
            if c > float(u[b]) and want is None:
                want = i
        assert tok[b].item() == want
        assert lp[b].item() == pytest.approx(__import__("math").log(p[want]), abs=1e-6)
        assert ent[b].item() == pytest.approx(-sum(x * __import__("math").log(x) for x in p if x > 0), abs=1e-6)
    assert tok[0].item() != 2  # a zero-probability token is never drawn
    g, glp, _ = sample_tokens(logits, u, T, greedy=True)
    assert g.tolist() == [3, 0] and glp[1].item() == pytest.approx(lp[1].item() if tok[1] == 0 else glp[1].item())


def test_inverse_cdf_frequencies_follow_the_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -30.0]).repeat(20000, 1)
    u = draw_uniforms(0, 20000, 1)[:, 0]
    tok, _, _ = sample_tokens(logits, u, 1.0)
    p = torch.softmax(logits[0].double(), -1)
    freq = torch.bincount(tok, minlength=5).double() / len(tok)
    assert torch.allclose(freq, p, atol=4 * (0.25 / 20000) ** 0.5)  # 4 sigma of a Bernoulli mean


def test_draws_do_not_depend_on_how_rows_are_split():
    full = draw_uniforms(7, 10, 4)
    assert torch.equal(draw_uniforms(7, 10, 4), full)
    assert torch.equal(draw_uniforms(7, 6, 4)[2:], full[2:6])  # first_row = 2, 4 rows


# ------------------------------------------------------------------ static engine vs HF sampler
@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    return tok, tiny_qwen3(ARCH, tok, seed=3).eval()


@pytest.mark.parametrize("temperature, greedy", [(1.0, False), (0.7, False), (1.0, True)])
def test_static_engine_gives_the_hf_samplers_tokens(tiny, temperature, greedy):
    tok, model = tiny
    prompts = _prompts(tok, ["7+5=", "0123+0489=", "1+1=", "99+1=", "5=", "12+34="])
    kw = dict(temperature=temperature, max_new_tokens=12, greedy=greedy, seed=11)
    hf = HFSampler(tok.eos_token_id, tok.pad_token_id, batch_size=4).generate(model, prompts, **kw)
    st = StaticSampler(tok.eos_token_id, tok.pad_token_id, batch_size=4).generate(model, prompts, **kw)
    assert st.prompt_len == hf.prompt_len
    assert torch.equal(st.input_ids, hf.input_ids)
    assert torch.equal(st.attention, hf.attention) and torch.equal(st.completion, hf.completion)
    assert torch.allclose(st.logprobs, hf.logprobs, atol=1e-5)
    assert torch.allclose(st.entropy, hf.entropy, atol=1e-5)
    # and the sampler's log-probs are the trainer's
    m = st.completion.bool()
    assert torch.allclose(token_logprobs(model, st, chunk=5)[m], st.logprobs[m], atol=1e-4)


def test_static_engine_stops_at_eos_and_rows_split_like_processes(tiny):
    tok, model = tiny
    prompts = _prompts(tok, ["7+5=", "0123+0489=", "1+1=", "99+1=", "5="])
    s = StaticSampler(tok.eos_token_id, tok.pad_token_id, batch_size=8)
    # a model whose every token is EOS: one completion token per row, then stop
    eos_model = tiny_qwen3(ARCH, tok, seed=3).eval()

    def eos_first(module, inputs, out):
        out = out.clone()
        out[..., tok.eos_token_id] = 1e4
        return out

    eos_model.lm_head.register_forward_hook(eos_first)
    ro = s.generate(eos_model, prompts, temperature=1.0, max_new_tokens=9)
    assert ro.input_ids.shape[1] == ro.prompt_len + 1 and ro.completion.sum() == len(prompts)
    assert (ro.input_ids[:, -1] == tok.eos_token_id).all()
    # two "ranks": rows [0, 2) and [2, 5) with first_row give the whole batch's tokens
    kw = dict(temperature=1.0, max_new_tokens=10, seed=4)
    whole = s.generate(model, prompts, **kw)
    parts = concat([s.generate(model, prompts[:2], **kw), s.generate(model, prompts[2:], first_row=2, **kw)], tok.pad_token_id)
    assert parts.completion_ids() == whole.completion_ids()
    with pytest.raises(ValueError, match="CUDA"):
        StaticSampler(tok.eos_token_id, tok.pad_token_id, decode="cuda_graph").generate(model, prompts, **kw)


def test_static_decode_step_traces_as_one_graph(tiny):
    """CUDA-graph capture needs a step without host syncs or data-dependent Python branches; dynamo's
    fullgraph mode refuses exactly those, so a clean trace here is the CPU-side check of capturability."""
    torch._dynamo.reset()
    tok, model = tiny
    from transformers import StaticCache

    from stages.engines import static

    captured = []
    real = static.decode_step
    compiled = torch.compile(real, backend="eager", fullgraph=True, dynamic=False)

    def spy(*a, **k):
        captured.append(1)
        return compiled(*a, **k)

    static.decode_step = spy
    try:
        prompts = _prompts(tok, ["7+5=", "0123+0489="])
        kw = dict(temperature=1.0, max_new_tokens=6, seed=2)
        got = StaticSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, **kw)
    finally:
        static.decode_step = real
    assert captured
    want = HFSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, **kw)
    assert got.completion_ids() == want.completion_ids()
    assert StaticCache  # the cache class the engine builds on (transformers 5.24)


def test_make_sampler_follows_the_config():
    tok = char_tokenizer()
    assert isinstance(make_sampler(load_config("tiny").sampling, 2, 0), HFSampler)
    s = make_sampler(load_config("tiny", ["sampling.engine=static", "sampling.stop_check_every=4"]).sampling, 2, 0)
    assert isinstance(s, StaticSampler) and s.stop_check_every == 4
    assert load_config("qwen3-1.7b").sampling.engine in ("static", "vllm")
    assert tok.eos_token_id is not None


# ------------------------------------------------------------------ vLLM: pure parts, fake outputs
class FakeSamplingParams(SimpleNamespace):
    pass


def _fake_output(prompt, tokens, logprobs):
    # vLLM's RequestOutput: .prompt_token_ids, .outputs[0] a CompletionOutput with .token_ids and
    # .logprobs = one {token_id: Logprob(logprob=...)} dict per generated token
    lp = [{t: SimpleNamespace(logprob=v, rank=1)} for t, v in zip(tokens, logprobs)]
    return SimpleNamespace(prompt_token_ids=prompt, outputs=[SimpleNamespace(token_ids=tokens, logprobs=lp)])


def test_vllm_requests_and_outputs_to_rollouts():
    prompts = [[1, 5, 6], [1, 7]]
    reqs, params = build_requests(prompts, temperature=0.8, max_new_tokens=5, greedy=False, seed=3, eos_id=2,
                                  sampling_params_cls=FakeSamplingParams, first_row=4)
    assert reqs == [{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 7]}]
    assert params[0].temperature == 0.8 and params[0].max_tokens == 5 and params[0].logprobs == 0
    assert params[1].seed == request_seed(3, 5) != params[0].seed and params[0].stop_token_ids == [2]
    assert not params[0].ignore_eos
    # a negative EOS id (the benchmarks' "never stop"): no stop token, EOS ignored, every row max_new_tokens long
    _, never = build_requests(prompts, temperature=1.0, max_new_tokens=5, greedy=False, seed=3, eos_id=-1,
                              sampling_params_cls=FakeSamplingParams)
    assert never[0].ignore_eos and never[0].stop_token_ids == []
    outs = [_fake_output([1, 5, 6], [9, 2], [-0.5, -0.1]), _fake_output([1, 7], [8, 8, 8], [-1.0, -2.0, -3.0])]
    ro = outputs_to_rollouts(prompts, outs, eos_id=2, pad_id=0)
    assert ro.prompt_len == 3 and ro.input_ids.tolist() == [[1, 5, 6, 9, 2, 0], [0, 1, 7, 8, 8, 8]]
    assert ro.attention.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert ro.completion.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert torch.allclose(ro.logprobs, torch.tensor([[0, 0, 0, -0.5, -0.1, 0], [0, 0, 0, -1.0, -2.0, -3.0]]))
    assert ro.completion_ids() == [[9, 2], [8, 8, 8]]
    with pytest.raises(ValueError, match="order"):
        outputs_to_rollouts(prompts, outs[::-1], 2, 0)
    with pytest.raises(ValueError, match="logprobs"):
        outputs_to_rollouts(
            prompts[:1],
            [SimpleNamespace(prompt_token_ids=[1, 5, 6], outputs=[SimpleNamespace(token_ids=[4], logprobs=None)])],
            2,
            0,
        )
    assert VLLMOptions().enable_sleep_mode


# ------------------------------------------------------------------ multi-process
def test_relaunch_only_when_asked_and_not_already_launched(tmp_path):
    argv = ["teacher_rl", "--config", "tiny"]
    assert relaunch_command(argv, {}) is None
    assert relaunch_command(argv, {"S2D_GPUS": "1"}) is None
    cmd = relaunch_command(argv, {"S2D_GPUS": "4"})
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--config_file") + 1].endswith("infra/accelerate/deepspeed_zero3.yaml")
    assert cmd[-5:] == ["-m", "stages", *argv]
    assert relaunch_command(argv, {"S2D_GPUS": "4", "LOCAL_RANK": "0"}) is None  # inside a launch already
    assert relaunch_command(["validate", "--config", "tiny"], {"S2D_GPUS": "4"}) is None
    with pytest.raises(SystemExit, match="not found"):
        relaunch_command(argv, {"S2D_GPUS": "2", "S2D_ACCELERATE_CONFIG": str(tmp_path / "nope.yaml")})
    for f in ("deepspeed_zero3.yaml", "fsdp.yaml", "multi_cpu.yaml"):
        import yaml

        assert "distributed_type" in yaml.safe_load((REPO / "infra/accelerate" / f).read_text())


def test_stage_runs_under_accelerate_launch_with_two_cpu_processes(small_cfg, tmp_path):
    from conftest import TEST_OVERRIDES

    from stages.recipes import bootstrap
    from stages.runtime import StageRun

    root = str(tmp_path / "root")
    bootstrap.main(StageRun("bootstrap", small_cfg(), root))
    sets = [a for o in TEST_OVERRIDES + ["torch_threads=1", "teacher_rl.steps=2"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "S2D_GPUS": "2",
           "S2D_ACCELERATE_CONFIG": str(REPO / "infra/accelerate/multi_cpu.yaml")}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run([sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", root, *sets],
                         env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "relaunching on 2 processes" in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["skipped"] is False and summary["metrics"]
    rows = (Path(root) / "teacher_rl" / "rollouts.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 4 * 4  # steps x prompts x group: the gathered batch, written once


def test_stage_runs_under_deepspeed_zero3_through_accelerate_on_cpu(tmp_path):
    """The ZeRO-3 path (engine prepare, sharded params gathered for generation and for the published
    state dict) with the shipped config, on the CPU: only its device settings are changed."""
    pytest.importorskip("deepspeed")
    import yaml
    from conftest import TEST_OVERRIDES

    cfg = yaml.safe_load((REPO / "infra/accelerate/deepspeed_zero3.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == 3
    cfg |= {"use_cpu": True, "mixed_precision": "no"}  # no GPU, no bf16 kernels on this CPU
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(cfg))
    root = tmp_path / "root"
    sets = [a for o in TEST_OVERRIDES + ["torch_threads=1"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
                          "--num_processes", "1", "-m", "stages", "bootstrap", "--config", "tiny", "--root", str(root), *sets],
                         env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["skipped"] is False
    from transformers import AutoModelForCausalLM

    from stages.models import char_tokenizer, tiny_qwen3

    published = AutoModelForCausalLM.from_pretrained(root / "bootstrap" / "student")
    fresh = tiny_qwen3(small_arch("student"), char_tokenizer(), 0)
    n = sum(p.numel() for p in fresh.parameters())
    # the full (gathered) weights were published, not a rank's empty ZeRO-3 shards
    assert sum(p.numel() for p in published.parameters()) == n
    assert all(p.abs().sum() > 0 for p in published.parameters())


def small_arch(role: str):
    from conftest import TEST_OVERRIDES

    from stages.config import load_config

    return getattr(load_config("tiny", TEST_OVERRIDES).models, role).arch


# ------------------------------------------------------------------ the GPU check script
def test_gpu_check_smoke_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--smoke", "--out", str(out)],
                         env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"stages", "rollout", "train"} <= set(report)
    stages = {k: v for k, v in report["stages"].items() if not k.startswith("_")}
    assert set(stages) == {"teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"}
    assert all(s["ok"] for s in stages.values()), stages
    assert report["rollout"]["static"]["new_tok_per_s"] > 0 and report["rollout"]["hf_generate"]["new_tok_per_s"] > 0
    assert "| " in res.stdout  # the table


def test_gradient_checkpointing_and_root_forward_give_the_same_gradients():
    """The trained model's hidden states come from its top-level forward (so DDP/FSDP/DeepSpeed hooks see
    it); with and without gradient checkpointing the log-prob gradients equal the decoder-path ones."""
    from stages.rollout import teacher_forced

    tok = char_tokenizer()
    batch = teacher_forced(tok, _prompts(tok, ["7+5=", "0123+0489="]), ["12", "612"])

    def grads(ckpt: bool, decoder_path: bool):
        model = tiny_qwen3(ARCH, tok, seed=5).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if decoder_path:  # the reference: decoder + head by hand
            h = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention,
                                    position_ids=batch.positions()).last_hidden_state[:, :-1]
            lp = torch.log_softmax(model.lm_head(h).double(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
            lp = torch.nn.functional.pad(lp, (1, 0))
        else:
            lp = token_logprobs(model, batch, chunk=3)
        (-(lp * batch.completion).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads(False, True)
    for ckpt in (False, True):
        got = grads(ckpt, False)
        assert all(torch.allclose(a.double(), b.double(), atol=1e-5) for a, b in zip(got, ref))


SAMPLER_IS_TRAINER = """
import torch
from stages.config import TinyArch
from stages.engines.hf import HFSampler
from stages.engines.static import StaticSampler
from stages.models import char_tokenizer, tiny_qwen3
from stages.rollout import token_logprobs
tok = char_tokenizer()
model = tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, 3).eval()
prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in ["7+5=", "0123+0489=", "99+1="]]
for engine in (HFSampler, StaticSampler):
    ro = engine(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, temperature=1.0, max_new_tokens=12, seed=11)
    m = ro.completion.bool()
    print(engine.__name__, float((token_logprobs(model, ro, chunk=5) - ro.logprobs)[m].abs().max()))
"""


def test_stage_code_runs_on_the_gpu_machines_transformers(tmp_path):
    """The GPU machine has transformers 5.17 (../shared/ENV-FACTS.md); so has the vLLM venv. There, the GPU
    check's path (bench/gpu_run.sh, smoke shapes) runs, and both native engines' log-probs are the trainer's
    (transformers renamed the forward's KV-cache argument after 5.17: passed under the wrong name it is
    silently dropped)."""
    py = REPO / ".venv-vllm/bin/python"
    if not py.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-vllm is missing: `make test` builds it (make vllm-venv)")
        pytest.skip("needs the vLLM venv (make vllm-venv), which has the GPU machine's transformers 5.17")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHON": str(py),
           "CARRIED": "0", "GPU_CHECK_ARGS": "--smoke", "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(REPO / "bench/gpu_run.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "transformers 5.17" in (tmp_path / "versions.txt").read_text()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(s["ok"] for k, s in report["stages"].items() if not k.startswith("_"))
    out = subprocess.run([str(py), "-c", SAMPLER_IS_TRAINER], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = dict(line.split() for line in out.stdout.split("\n") if line.endswith(tuple("0123456789")))
    assert set(diffs) == {"HFSampler", "StaticSampler"} and all(float(d) < 1e-4 for d in diffs.values()), out.stdout
