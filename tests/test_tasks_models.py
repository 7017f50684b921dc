"""Tasks (splits, verifier), tokenizer/model round trips, the teacher/student compatibility check,
and the sampler's agreement with the trainer's log-probs."""

import json
import random

import pytest
import torch

from stages.config import TaskConfig, TinyArch
from stages.engines.hf import HFSampler
from stages.models import TokenizerMismatch, char_tokenizer, check_compatible, load, save, tiny_qwen3
from stages.rollout import teacher_forced, token_logprobs
from stages.task_contract import Problem, TaskError
from stages.tasks import ArithmeticTask, make_task

ARCH = TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)


def test_arithmetic_splits_are_disjoint_deterministic_and_eval_is_stable():
    cfg = TaskConfig(sizes={"bootstrap": 500, "teacher_rl": 100, "prompts": 100, "student_rl": 100, "validation": 50, "eval": 50})
    t1, t2 = ArithmeticTask(cfg), ArithmeticTask(cfg)
    split_names = ("bootstrap", "teacher_rl", "prompts", "student_rl", "validation", "eval")

    def canonical(prompt: str) -> str:  # a+b and b+a are one problem
        return "+".join(sorted(prompt.rstrip("=").split("+"))) if "+" in prompt else prompt

    splits = {s: {canonical(p.prompt) for p in t1.problems(s)} for s in split_names}
    names = list(splits)
    for i, a in enumerate(names):
        assert len(splits[a]) == cfg.sizes[a]
        for b in names[i + 1 :]:
            assert not splits[a] & splits[b], f"{a} and {b} overlap"
    assert t1.problems("eval") == t2.problems("eval")
    assert all(p.answer is None for p in t1.problems("prompts"))  # stages 2a/2b never see labels
    bigger = ArithmeticTask(TaskConfig(sizes={**cfg.sizes, "bootstrap": 900}))
    assert bigger.problems("eval") == t1.problems("eval")  # training sizes never change the eval set


def test_arithmetic_solution_and_verifier():
    t = ArithmeticTask(TaskConfig())
    p = Problem("x", "0123+0489=", "612")
    assert t.solution(p) == "3+9+0=12;2+8+1=11;1+4+1=06;0+0+0=00;>612"
    assert t.reward("3+9+0=12;2+8+1=11;1+4+1=06;0+0+0=00;>612", p) == 1.0
    assert t.reward(">613", p) == 0.0
    assert t.reward("no answer", p) == 0.0
    # a corrupted trace leads to a wrong but consistent answer
    rng = random.Random(0)
    noisy = [t.solution(p, rng, noise=1.0) for _ in range(20)]
    assert all(t.reward(s, p) == 0.0 for s in noisy)


def test_multiplication_trace_and_mixed_splits():
    t = ArithmeticTask(TaskConfig(ops=["add", "mul"], max_digits=4))
    p = Problem("x", "0347*6=", "2082")
    assert t.solution(p) == "7*6+0=42;4*6+4=28;3*6+2=20;0*6+2=02;>2082"
    assert t.reward(t.solution(p), p) == 1.0
    probs = t.problems("eval")
    ops = {("*" if "*" in q.prompt else "+") for q in probs}
    assert ops == {"*", "+"}
    for q in probs[:100]:  # every worked trace ends in the verified answer
        assert t.reward(t.solution(q), q) == 1.0
        a, b = q.prompt.rstrip("=").split("*" if "*" in q.prompt else "+")
        assert int(q.answer) == (int(a) * int(b) if "*" in q.prompt else int(a) + int(b))


def test_math_jsonl_task_with_math_verify(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text(
        "\n".join(json.dumps(r) for r in [{"problem": "1/2+1/4?", "answer": "\\frac{3}{4}"}, {"problem": "2+2", "answer": "4"}])
    )
    cfg = TaskConfig(kind="math_jsonl", files={"teacher_rl": str(f), "prompts": str(f), "eval": str(f)})
    task = make_task(cfg)
    probs = task.problems("eval")
    assert probs[0].prompt.startswith("1/2+1/4?")
    assert task.reward("so the result is \\boxed{0.75}", probs[0]) == 1.0
    assert task.reward("so the result is \\boxed{\\frac{6}{8}}", probs[0]) == 1.0
    assert task.reward("\\boxed{5}", probs[1]) == 0.0
    assert all(p.answer is None for p in task.problems("prompts"))


def test_math_jsonl_missing_file_is_a_clear_error(tmp_path):
    cfg = TaskConfig(kind="math_jsonl", files={"teacher_rl": str(tmp_path / "x.jsonl"), "prompts": "a", "eval": "b"})
    with pytest.raises(TaskError, match="task.files.teacher_rl: .*x.jsonl does not exist"):
        make_task(cfg).problems("teacher_rl")


def test_checkpoint_round_trip_is_a_real_hf_folder(tmp_path):
    tok = char_tokenizer()
    model = tiny_qwen3(ARCH, tok, seed=0)
    save(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    m2, tok2 = load(tmp_path / "m")
    ids = torch.tensor([tok2("<s>12+34=", add_special_tokens=False)["input_ids"]])
    assert torch.allclose(model(ids).logits, m2(ids).logits, atol=1e-6)
    assert tok2.decode(tok2("12+34=\n", add_special_tokens=False)["input_ids"]) == "12+34=\n"


def test_tokenizer_mismatch_is_refused():
    a = char_tokenizer()
    b = char_tokenizer()
    b.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatch, match="vocabularies differ"):
        check_compatible(a, b)
    ma, mb = tiny_qwen3(ARCH, a, 0), tiny_qwen3(ARCH, b, 0)
    with pytest.raises(TokenizerMismatch, match="output vocab sizes differ"):
        check_compatible(a, char_tokenizer(), ma, mb)
    check_compatible(a, char_tokenizer(), ma, tiny_qwen3(ARCH, a, 1))  # same tokenizer: fine


def _prompts(tok, texts):
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_sampler_logprobs_match_trainer_logprobs_with_left_padding():
    """The sampler's per-token log-probs (KV cache, left-padded batch) equal a fresh full forward
    at the same temperature: the importance ratio starts at exactly 1."""
    tok = char_tokenizer()
    model = tiny_qwen3(ARCH, tok, seed=3).eval()
    sampler = HFSampler(tok.eos_token_id, tok.pad_token_id, batch_size=3)
    prompts = _prompts(tok, ["7+5=", "0123+0489=", "1+1=", "99+1=", "5="])  # two sub-batches, ragged
    for temp in (1.0, 0.7):
        ro = sampler.generate(model, prompts, temperature=temp, max_new_tokens=12, seed=11)
        with torch.no_grad():
            lp = token_logprobs(model, ro, chunk=5)
        m = ro.completion.bool()
        assert m.any()
        assert torch.allclose(lp[m], ro.logprobs[m], atol=1e-4)
        # padding never counts and prompts are intact
        assert (ro.logprobs[~m] == 0).all()
        for i, p in enumerate(prompts):
            row = ro.input_ids[i][ro.attention[i].bool()]
            assert row[: len(p)].tolist() == p


def test_sampler_is_deterministic_per_seed_and_batch_independent():
    tok = char_tokenizer()
    model = tiny_qwen3(ARCH, tok, seed=3).eval()
    prompts = _prompts(tok, ["7+5=", "0123+0489=", "1+1="])
    a = HFSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, temperature=1.0, max_new_tokens=10, seed=5)
    b = HFSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, temperature=1.0, max_new_tokens=10, seed=5)
    assert a.completion_ids() == b.completion_ids()
    g1 = HFSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, temperature=1.0, max_new_tokens=10, greedy=True)
    g2 = HFSampler(tok.eos_token_id, tok.pad_token_id, batch_size=1).generate(
        model, prompts, temperature=1.0, max_new_tokens=10, greedy=True
    )
    assert g1.completion_ids() == g2.completion_ids()  # left padding does not change greedy outputs


def test_teacher_forced_batch_masks_only_completion():
    tok = char_tokenizer()
    tf = teacher_forced(tok, _prompts(tok, ["1+1=", "10+10="]), ["2", "20"])
    assert tf.completion.sum(1).tolist() == [2, 3]  # answer + EOS
    assert tok.decode(tf.input_ids[0][tf.completion[0].bool()]) == "2</s>"


CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_is_applied_when_the_tokenizer_has_one(tmp_path):
    from stages.prompting import encode

    p = Problem("x", "What is 1+1?\nPut the final answer in \\boxed{}.\n", "2")
    plain = char_tokenizer()
    assert plain.decode(encode(plain, [p])[0]) == "<s>" + p.prompt  # no template: BOS + the raw prompt
    with pytest.raises(TaskError, match="task.chat_template"):
        encode(plain, [p], "always")
    tok = char_tokenizer()
    tok.chat_template = CHAT
    save(tiny_qwen3(ARCH, tok, 0), tok, tmp_path / "m")  # the template travels with the checkpoint
    _, tok = load(tmp_path / "m")
    ids = encode(tok, [p])[0]
    assert tok.decode(ids) == f"<s><|user|>{p.prompt}</s><|assistant|>"
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, none added
    assert tok.decode(encode(tok, [p], "never")[0]) == "<s>" + p.prompt


def test_sampling_training_and_evaluation_share_the_chat_encoding(small_cfg, tmp_path, monkeypatch):
    """A stage on a checkpoint with a chat template: rollouts, recorded prompts and evaluation all
    start from the templated prompt (one encoder)."""
    from stages import artifacts, workflow
    from stages.runtime import RolloutMaker

    tok = char_tokenizer()
    tok.chat_template = CHAT
    save(tiny_qwen3(ARCH, tok, 0), tok, tmp_path / "m")
    cfg = small_cfg(f"models.teacher.source={tmp_path / 'm'}", f"models.student.source={tmp_path / 'm'}",
                    "teacher_rl.steps=1", "sampling.max_new_tokens=4")
    seen = []
    real = RolloutMaker.sample

    def spy(self, model, tok, problems, *a, **k):
        ro = real(self, model, tok, problems, *a, **k)
        seen.append(tok.decode(ro.input_ids[0][ro.attention[0].bool()][: ro.prompt_len]))
        return ro

    monkeypatch.setattr(RolloutMaker, "sample", spy)
    workflow.run_stage(cfg, str(tmp_path / "root"), "teacher_rl", {"policy": str(tmp_path / "m")})
    # eval before, one training step, eval after (sampled + greedy)
    assert len(seen) >= 3 and all(s.startswith("<s><|user|>") and s.endswith("<|assistant|>") for s in seen), seen
    assert artifacts.read_manifest(str(tmp_path / "root" / "teacher_rl")) is not None


def test_example_plugin_runs_the_whole_tiny_workflow(tmp_path, capsys):
    """examples/reverse.yaml: a task plugin with its own options bootstraps the tiny models and runs every
    stage (test-sized settings); the plugin's source is part of every stage's identity."""
    from conftest import TEST_OVERRIDES

    from stages.cli import main

    root = str(tmp_path / "rev")
    sets = [a for o in TEST_OVERRIDES for a in ("--set", o)] + ["--set", "task.options={alphabet: abcd, max_len: 6}"]
    assert main(["validate", "--config", "examples/reverse.yaml", *sets]) == 0
    assert main(["workflow", "--config", "examples/reverse.yaml", "--root", root, *sets]) == 0
    out = capsys.readouterr().out
    assert "direct GRPO baseline" in out
    m = json.loads((tmp_path / "rev" / "bootstrap" / "manifest.json").read_text())
    assert m["metrics"]["teacher.params"] > 0
    rollouts = (tmp_path / "rev" / "teacher_rl" / "rollouts.jsonl").read_text().splitlines()
    assert json.loads(rollouts[0])["prompt"].startswith("rev ")
    assert main(["validate", "--config", "examples/reverse.yaml", "--set", "task.options={colour: red}"]) == 2
    assert "task.options: unknown key(s) ['colour']" in capsys.readouterr().err
    assert main(["validate", "--config", "examples/reverse.yaml", *sets, "--set", "task.options={alphabet: ab}"]) == 2
    assert "allow too few distinct words" in capsys.readouterr().err


def test_data_digest_covers_the_problems_and_the_plugin_source(tmp_path, monkeypatch):
    from stages.tasks import data_digest

    t = ArithmeticTask(TaskConfig(sizes={"teacher_rl": 10, "eval": 5}))
    base = data_digest(t, ("teacher_rl", "eval"))
    assert base == data_digest(ArithmeticTask(TaskConfig(sizes={"teacher_rl": 10, "eval": 5})), ("teacher_rl", "eval"))
    assert base != data_digest(ArithmeticTask(TaskConfig(sizes={"teacher_rl": 11, "eval": 5})), ("teacher_rl", "eval"))
    assert base == data_digest(
        ArithmeticTask(TaskConfig(sizes={"teacher_rl": 10, "eval": 5, "prompts": 9})), ("teacher_rl", "eval")
    )
    plugin = tmp_path / "myplug.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    src = "from stages.tasks import ArithmeticTask\nclass T(ArithmeticTask):\n    pass\ndef make_task(cfg): return T(cfg)\n"
    plugin.write_text(src)
    cfg = TaskConfig(kind="myplug:make_task", sizes={"eval": 5})
    a = data_digest(make_task(cfg), ("eval",))
    plugin.write_text(src.replace("pass", "def reward(self, c, p): return 1.0"))
    import importlib
    import sys

    importlib.reload(sys.modules["myplug"])
    assert data_digest(make_task(cfg), ("eval",)) != a  # edited plugin code: a new identity


@pytest.mark.parametrize("fused", [True, False])
def test_vocab_kl_on_models_equals_the_full_logits_loss(fused, monkeypatch):
    """2a / 2b full / C2 through :func:`stages.rollout.vocab_kl` (completion rows only, fused head + KL, or the
    unfused fallback) against the plain loss on the models' full [B, L, V] logits, float64: value, the student's
    parameter gradients, the per-token KL and the teacher's log-probs."""
    import torch.nn.functional as F

    from stages import rollout
    from stages.losses import aggregate, forward_kl, reverse_kl

    monkeypatch.setattr(rollout, "_fusable", lambda head: fused)
    tok = char_tokenizer()
    teacher = tiny_qwen3(ARCH, tok, seed=1).double().eval().requires_grad_(False)
    student = tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, seed=2).double()
    ro = HFSampler(tok.eos_token_id, tok.pad_token_id, batch_size=8).generate(
        teacher, _prompts(tok, ["7+5=", "0123+0489=", "1+1=", "99+1="]), temperature=0.8, max_new_tokens=9, seed=3)
    assert (ro.completion.sum(1) < 9).any()  # some rows stopped early: padding inside the batch
    mask = ro.completion[:, 1:]
    for direction, fn in (("forward", forward_kl), ("reverse", reverse_kl)):
        for mode in ("token-mean", "seq-mean", "dr_grpo"):
            got = rollout.vocab_kl(direction, student, teacher, ro, mode, chunk=4, max_len=9)
            g_got = torch.autograd.grad(got.loss, list(student.parameters()))
            kw = dict(input_ids=ro.input_ids, attention_mask=ro.attention, position_ids=ro.positions())
            zs, zt = student(**kw).logits[:, :-1].double() / 0.8, teacher(**kw).logits[:, :-1].double() / 0.8
            ref_kl = fn(zs, zt)  # float32 inside; the loss below is recomputed in float64 for the gradient check
            ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
            per_tok = (lt.exp() * (lt - ls)).sum(-1) if direction == "forward" else (ls.exp() * (ls - lt)).sum(-1)
            ref = aggregate(per_tok, mask, mode, max_len=9)
            g_ref = torch.autograd.grad(ref, list(student.parameters()))
            assert got.loss.item() == pytest.approx(ref.item(), rel=1e-9)
            for a, b in zip(g_got, g_ref):
                assert torch.allclose(a, b, rtol=1e-7, atol=1e-11)
            m = mask.bool()
            assert torch.allclose(got.kl[:, 1:][m], ref_kl[m].double(), atol=1e-5) and (got.kl[:, 1:][~m] == 0).all()
            t_lp = lt.gather(-1, ro.input_ids[:, 1:, None])[..., 0]
            assert torch.allclose(got.teacher_logp[:, 1:][m], t_lp[m], atol=1e-12)
    # the log-probs of the GRPO / sampled-token losses: completion tokens only, through a non-linear loss
    lp = rollout.token_logprobs(student, ro, chunk=4)
    ls = F.log_softmax(student(**kw).logits[:, :-1].double() / 0.8, -1)
    ref_lp = ls.gather(-1, ro.input_ids[:, 1:, None])[..., 0]
    assert torch.allclose(lp[:, 1:][m], ref_lp[m], rtol=1e-12) and (lp[:, 1:][~m] == 0).all() and (lp[:, 0] == 0).all()
    g_got = torch.autograd.grad((lp.exp() * ro.completion).sum(), list(student.parameters()))
    g_ref = torch.autograd.grad((ref_lp.exp() * mask).sum(), list(student.parameters()))
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-11)
