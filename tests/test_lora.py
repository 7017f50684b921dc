"""LoRA adapters (``models.<role>.lora``, stages/lora.py) on the tiny models: a stage trains only an adapter
on a frozen base and publishes it (+ the merged checkpoint) with its base's digest; resume states hold only
the adapter and a resumed stage ends where an uninterrupted one does; downstream stages take an adapter as
input (base + adapter, no hand merge); the fused chunked full-vocabulary KL (2a token_kl, 2b full) on a LoRA
student gives the full-logits gradients on the adapter only and moves it; bad inputs are one-line errors (exit 2)
before any model loads;
MLflow's logged models read base -> adapter -> merged. ~1 min on 2 busy cores."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TEST_OVERRIDES
from safetensors.torch import load_file

from stages import artifacts, cli, lora
from stages.config import LoraSpec, TinyArch, load_config
from stages.models import char_tokenizer, load, save, tiny_qwen3
from stages.recipes import grpo, kl_warmup, onpolicy_distill
from stages.rollout import teacher_forced, token_logprobs
from stages.runtime import StageRun
from stages.trainer import Trainer

LORA = "{r: 4, alpha: 8, target_modules: [q_proj, v_proj], publish_merged: true}"


def cfg_with(*extra):
    return load_config("tiny", TEST_OVERRIDES + [
        "torch_threads=1", "task.kind=digit_task:make_task", "sampling.max_new_tokens=3", "eval.greedy=false",
        "teacher_rl.steps=4", "teacher_rl.optim.lr=0.01", "teacher_rl.kl_coef=0.1", f"models.teacher.lora={LORA}",
        *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    tok = char_tokenizer()
    save(
        tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, seed=0), tok, d / "teacher"
    )
    save(
        tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, seed=1), tok, d / "student"
    )
    return d


def _logprobs(model, tok):
    ro = teacher_forced(tok, [[tok.bos_token_id] + tok("12+34=", add_special_tokens=False)["input_ids"]] * 2, ["46", "47"])
    with torch.no_grad():
        return token_logprobs(model, ro)


def test_grpo_trains_and_publishes_only_the_adapter_and_resumes(base, tmp_path, monkeypatch):
    teacher = str(base / "teacher")
    before = load_file(f"{teacher}/model.safetensors")
    states = []
    real_save = artifacts.save_state
    monkeypatch.setattr(artifacts, "save_state", lambda uri, name, step, d, meta: (
        states.append(sorted(p.name for p in Path(d).iterdir())), real_save(uri, name, step, d, meta)))
    seen = {}
    real_init = Trainer.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen["optimized"] = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        seen["total"] = sum(p.numel() for p in self.model.parameters())

    monkeypatch.setattr(Trainer, "__init__", spy)
    # the reference: uninterrupted
    m = grpo.main(StageRun("teacher_rl", cfg_with(), str(tmp_path / "ref"), inputs={"policy": teacher}), teacher)
    a = m["adapters"]["model"]
    assert a["base"] == {"uri": teacher, "digest": lora.base_digest(teacher)} and a["lora"]["r"] == 4
    assert seen["optimized"] == a["trainable_params"] < seen["total"] / 10  # the optimizer sees the adapter only
    out = Path(m["outputs"]["model"])
    assert sorted(p.name for p in out.iterdir() if "token" not in p.name) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").stat().st_size < (
        Path(m["outputs"]["merged"]) / "model.safetensors"
    ).stat().st_size / 5
    assert states and all(s == ["adapter.safetensors", "optimizer.pt", "rollouts.jsonl"] for s in states)  # resume: adapter only
    assert all(torch.equal(before[k], v) for k, v in load_file(f"{teacher}/model.safetensors").items())  # base untouched

    # the merged checkpoint = base + adapter, and an adapter input loads as base + adapter
    merged, tok = load(m["outputs"]["merged"])
    run = StageRun("evaluate/x", cfg_with(), str(tmp_path / "ev"))
    via_adapter, _ = run.load_model(m["outputs"]["model"], "teacher")
    plain, _ = load(teacher)
    lp_m, lp_a, lp_0 = _logprobs(merged, tok), _logprobs(via_adapter, tok), _logprobs(plain, tok)
    assert torch.allclose(lp_m, lp_a, atol=1e-5) and not torch.allclose(lp_m, lp_0, atol=1e-3)

    # a stage killed after its step-2 state resumes to the uninterrupted result
    root = str(tmp_path / "killed")
    real_update = Trainer.update

    def dies_at_3(self, loss):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_update(self, loss)

    monkeypatch.setattr(Trainer, "update", dies_at_3)
    with pytest.raises(KeyboardInterrupt):
        grpo.main(StageRun("teacher_rl", cfg_with(), root, inputs={"policy": teacher}), teacher)
    monkeypatch.setattr(Trainer, "update", real_update)
    m2 = grpo.main(StageRun("teacher_rl", cfg_with(), root, inputs={"policy": teacher}), teacher)
    w1, w2 = (
        load_file(f"{m['outputs']['model']}/adapter_model.safetensors"),
        load_file(f"{m2['outputs']['model']}/adapter_model.safetensors"),
    )
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_downstream_stages_take_adapters_and_continue_them(base, tmp_path):
    teacher, student = str(base / "teacher"), str(base / "student")
    root = str(tmp_path / "root")
    cfg = cfg_with("teacher_rl.kl_coef=0", "models.student.lora={r: 4, alpha: 8}", "onpolicy_distill.steps=2",
                   "student_rl.steps=2", "kl_warmup.steps=2", "kl_warmup.form=token_kl", "onpolicy_distill.form=full")
    before = load_file(f"{student}/model.safetensors")
    t = grpo.main(StageRun("teacher_rl", cfg, root, inputs={"policy": teacher}), teacher)
    # 2a (token_kl) and 2b (full): the fused full-vocabulary KL on a LoRA student moves its adapter (B starts at 0)
    w = kl_warmup.main(StageRun("kl_warmup", cfg, root, inputs={"teacher": t["outputs"]["model"], "student": student}),
                       t["outputs"]["model"], student)
    # 2b: the teacher is base + the stage-1 adapter (no merge by hand); the student trains an adapter
    m = onpolicy_distill.main(StageRun("onpolicy_distill", cfg, root, inputs={"teacher": t["outputs"]["model"],
                                                                               "student": student}),
                              t["outputs"]["model"], student)
    a = m["adapters"]["model"]
    assert a["base"]["uri"] == student and a["continued_from"] is None
    for out in (w, m):
        assert out["adapters"]["model"]["base"]["uri"] == student
        b = [v for k, v in load_file(f"{out['outputs']['model']}/adapter_model.safetensors").items() if "lora_B" in k]
        assert b and all(v.abs().max() > 0 for v in b)
    assert all(torch.equal(before[k], v) for k, v in load_file(f"{student}/model.safetensors").items())  # base untouched
    # stage 3 trains the same adapter further on the same base (one adapter for the student's whole chain)
    s3 = grpo.main(StageRun("student_rl", cfg, root, inputs={"policy": m["outputs"]["model"]}), m["outputs"]["model"])
    a3 = s3["adapters"]["model"]
    assert a3["base"] == a["base"] and a3["continued_from"] == m["outputs"]["model"]
    # another rank: the input adapter is merged and a new one trained on it; its base is the input adapter
    cfg8 = cfg.model_copy(update={"models": cfg.models.model_copy(update={
        "student": cfg.models.student.model_copy(update={"lora": cfg.models.student.lora.model_copy(update={"r": 8})})})})
    s8 = grpo.main(StageRun("student_rl", cfg8, str(tmp_path / "r8"), inputs={"policy": m["outputs"]["model"]}),
                   m["outputs"]["model"])
    assert s8["adapters"]["model"]["base"]["uri"] == m["outputs"]["model"]
    # the chain loads: base -> adapter (merged) -> adapter
    model, tok = StageRun("evaluate/x", cfg8, str(tmp_path / "ev")).load_model(s8["outputs"]["model"], "student")
    assert lora.adapter_of(model) is None and torch.isfinite(_logprobs(model, tok)).all()


def _cli(capsys, *args):
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_lora_inputs_are_one_line_errors_before_loading(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("stages.models.load", lambda *a, **k: pytest.fail("a model was loaded"))
    root = str(tmp_path / "root")
    common = ["--root", root, "--teacher", str(base / "teacher"), *[x for o in TEST_OVERRIDES for x in ("--set", o)]]
    code, err = _cli(capsys, "teacher_rl", "--config", "tiny", *common, "--set", "models.teacher.lora={r: 0}")
    assert code == 2 and "models.teacher.lora.r" in err and "greater than 0" in err
    code, err = _cli(capsys, "teacher_rl", "--config", "tiny", *common,
                     "--set", "models.teacher.lora={target_modules: [q_proj, qkv_proj]}")
    assert code == 2 and "['qkv_proj'] not in the teacher model" in err and "q_proj" in err

    # an adapter whose base changed after it was trained: a fake published adapter on a published base
    pub = tmp_path / "pub"
    artifacts.publish(base, str(pub / "bootstrap"), {"stage": "bootstrap", "outputs": {}})
    base_uri = str(pub / "bootstrap" / "teacher")
    (tmp_path / "ad" / "model").mkdir(parents=True)
    (tmp_path / "ad" / "model" / "adapter_config.json").write_text("{}")
    artifacts.publish(tmp_path / "ad", str(pub / "teacher_rl"), {"stage": "teacher_rl", "adapters": {"model": {
        "base": {"uri": base_uri, "digest": lora.base_digest(base_uri)}, "lora": {"r": 4}}}})
    adapter = str(pub / "teacher_rl" / "model")
    args = ["kl_warmup", "--config", "tiny", "--root", root, "--teacher", adapter, "--student", str(base / "student"),
            *[x for o in TEST_OVERRIDES for x in ("--set", o)]]
    monkeypatch.setattr("stages.workflow.run_stage", lambda *a, **k: pytest.fail("the stage ran"))
    artifacts.publish(base, str(pub / "bootstrap"), {"stage": "bootstrap", "outputs": {}, "note": "republished"})
    code, err = _cli(capsys, *args)
    assert code == 2 and "an adapter trained on base digest" in err and "adapter_base" in err
    code, err = _cli(capsys, *args, "--set", f"models.teacher.adapter_base={tmp_path / 'nowhere'}")
    assert code == 2 and "does not exist" in err


def test_lineage_reads_base_adapter_merged(base, tmp_path):
    from mlflow import MlflowClient

    from stages.recipes import bootstrap

    root = str(tmp_path / "root")
    cfg = cfg_with("tracking.enabled=true", "tracking.experiment=lora-lineage", "teacher_rl.steps=1",
                   "teacher_rl.kl_coef=0", "eval.problems=2", "eval.samples=1")
    bootstrap.main(StageRun("bootstrap", cfg, root))
    b = f"{root}/bootstrap/teacher"
    m = grpo.main(StageRun("teacher_rl", cfg, root, inputs={"policy": b}), b)
    c = MlflowClient()
    exp = c.get_experiment_by_name("lora-lineage").experiment_id
    models = {lm.tags.get("s2d.uri"): lm for lm in c.search_logged_models([exp])}
    base_lm, ad, merged = models[b], models[m["outputs"]["model"]], models[m["outputs"]["merged"]]
    assert ad.tags["s2d.kind"] == "adapter" and ad.tags["s2d.base.model"] == base_lm.model_id
    assert ad.tags["s2d.base.digest"] == m["adapters"]["model"]["base"]["digest"]
    assert merged.tags["s2d.kind"] == "merged" and merged.tags["s2d.merged_from.model"] == ad.model_id
    assert json.loads(json.dumps(m["adapters"]))["model"]["merged"] == "merged"


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_the_fused_vocabulary_kl_trains_only_the_adapter(base, targets):
    """vocab_kl reads student.get_output_embeddings() and the hidden states of a model PEFT injected an adapter
    into: the fused chunked head (a frozen plain lm_head) or the unfused path (an adapter on lm_head) gives the
    gradients of the full-logits KL, on the adapter's weights only."""
    from stages.losses import aggregate, forward_kl, reverse_kl
    from stages.rollout import vocab_kl

    student, tok = load(base / "student")
    teacher, _ = load(base / "teacher")
    teacher.requires_grad_(False)
    lora.attach_new(student, LoraSpec(r=4, alpha=8, target_modules=targets), "student", "s", "d", None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B drawn (PEFT starts it at 0) so that A gets a gradient too
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    fused = "lm_head" not in targets
    assert (type(student.get_output_embeddings()) is torch.nn.Linear) is fused
    prompts = [[tok.bos_token_id] + tok(f"{a}+{a}=", add_special_tokens=False)["input_ids"] for a in (1, 23)]
    ro = teacher_forced(tok, prompts, ["2", "46"])
    ro.temperature = 0.7
    adapter = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    for direction, fn in (("forward", forward_kl), ("reverse", reverse_kl)):
        student.zero_grad(set_to_none=True)
        vocab_kl(direction, student, teacher, ro, "seq-mean", chunk=3).loss.backward()
        got = {n: p.grad.clone() for n, p in adapter.items()}
        assert all(p.grad is None for n, p in student.named_parameters() if n not in adapter)  # the base: none
        student.zero_grad(set_to_none=True)
        kw = dict(input_ids=ro.input_ids, attention_mask=ro.attention, position_ids=ro.positions())
        with torch.no_grad():
            zt = teacher(**kw).logits[:, :-1] / ro.temperature
        kl = fn(student(**kw).logits[:, :-1] / ro.temperature, zt)
        aggregate(kl, ro.completion[:, 1:], "seq-mean").backward()
        for n, p in adapter.items():
            assert got[n].abs().max() > 0 and torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), (direction, n)
