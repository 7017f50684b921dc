"""Configs are validated before any model loads; errors name the key."""

from pathlib import Path

import pytest

from stages.cli import main
from stages.config import PRESETS, ConfigError, load_config


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_shipped_preset_validates_and_documents_its_command(preset):
    cfg = load_config(preset)
    first = (PRESETS / f"{preset}.yaml").read_text().splitlines()[0]
    assert first.startswith("# python -m stages ") and f"--config {preset}" in first
    assert cfg.name == preset


def test_paper_presets_name_real_checkpoints():
    cfg = load_config("qwen3-1.7b")
    assert cfg.models.student.source == "Qwen/Qwen3-1.7B"
    assert cfg.task.kind == "dataset" and cfg.task.data["eval"].path == "HuggingFaceH4/MATH-500"
    assert cfg.eval.samples == 16 and cfg.eval.sets == ["eval", "aime24"]  # the paper's avg@16 protocol


@pytest.mark.parametrize(
    "override, key",
    [
        ("teacher_rl.stepz=3", "teacher_rl.stepz"),  # unknown key
        ("teacher_rl.steps=many", "teacher_rl.steps"),  # wrong type
        ("sampling.temperature=0", "sampling.temperature"),  # impossible value
        ("teacher_rl.group_size=1", "teacher_rl.group_size"),  # GRPO needs a group
        ("models.student.arch.heads=5", "models.student.arch"),  # 96 not divisible by 5
        ("teacher_rl.aggregation=sum", "teacher_rl.aggregation"),
        ("task.min_digits=5", "task"),
    ],
)
def test_invalid_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert key in str(e.value)


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("tiny", ["teacher_rl.steps"])


def test_cli_rejects_bad_config_before_loading_anything(capsys, tmp_path):
    assert main(["teacher_rl", "--config", "tiny", "--root", str(tmp_path), "--set", "teacher_rl.lr=1"]) == 2
    assert "teacher_rl.lr" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_rejects_missing_input_before_loading_models(tmp_path, capsys):
    assert main(["kl_warmup", "--config", "tiny", "--root", str(tmp_path), "--teacher", str(tmp_path / "nope"),
                 "--student", str(tmp_path / "nope2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["workflow.stages=[teacher_rl, onpolicy_distill]", "kl_warmup.c2_target=0.5"])
    assert cfg.workflow.stages == ["teacher_rl", "onpolicy_distill"]
    assert cfg.kl_warmup.c2_target == 0.5
    # the direct-GRPO baseline gets exactly the workflow's student steps
    assert cfg.student_step_budget() == cfg.onpolicy_distill.steps


def test_stage_hash_changes_with_own_section_and_inputs_only():
    a = load_config("tiny")
    b = load_config("tiny", ["student_rl.steps=99"])
    assert a.stage_hash("teacher_rl", {"policy": "x"}) == b.stage_hash("teacher_rl", {"policy": "x"})
    assert a.stage_hash("student_rl", {"policy": "x"}) != b.stage_hash("student_rl", {"policy": "x"})
    assert a.stage_hash("teacher_rl", {"policy": "x"}) != a.stage_hash("teacher_rl", {"policy": "y"})
    # the baseline's budget follows the workflow's student steps
    assert a.stage_hash("direct_grpo", {}) != b.stage_hash("direct_grpo", {})


def test_yaml_file_path(tmp_path):
    p = Path(tmp_path) / "c.yaml"
    p.write_text("models: {teacher: {source: a/b}, student: {source: c/d}}\nteacher_rl: {steps: 3}\n")
    assert load_config(str(p)).teacher_rl.steps == 3


def test_autocast_changes_the_stage_hash_only_when_on():
    import json

    off, on = load_config("tiny", ["autocast=none"]), load_config("tiny", ["autocast=bfloat16"])
    # off, the setting is not hashed at all: stages published before it existed are not rerun by the upgrade
    seen = []
    real = json.dumps
    json.dumps = lambda obj, **kw: seen.append(obj) or real(obj, **kw)
    try:
        off.stage_hash("kl_warmup", {"t": "x"})
    finally:
        json.dumps = real
    assert seen and "autocast" not in real(seen[-1])
    assert on.stage_hash("kl_warmup", {"t": "x"}) != off.stage_hash("kl_warmup", {"t": "x"})
    with pytest.raises(ConfigError, match="autocast"):
        load_config("tiny", ["autocast=float16"])


def test_split_sizes_beyond_the_arithmetic_problem_space_are_refused_before_any_draw():
    """The arithmetic task draws distinct problems until every split is full: sizes the digits cannot supply
    would never finish, so the config check names the numbers instead (stages/limits.py)."""
    with pytest.raises(ConfigError, match=r"26,400 distinct problems.*4,095"):
        load_config("tiny", ["task.max_digits=2"])
    with pytest.raises(ConfigError, match="few_shot|distinct problems"):
        load_config("tiny", ["task.min_digits=1", "task.max_digits=1", "task.sizes={eval: 20}", "task.style=question",
                             "task.few_shot=8", "task.ops=[add]"])
    load_config("tiny", ["task.min_digits=1", "task.max_digits=1", "task.sizes={eval: 20}"])  # 20 of 55: fine


@pytest.mark.parametrize("override", [
    "task.prompt_template=" + "x" * 100_000 + "{problem:>9}",  # a huge value, and a format spec
    "task.sizes=[" + "1," * 50_000 + "]",  # a huge list of the wrong type
    "teacher_rl.steps=" + "9" * 5000,  # more digits than Python converts
    "task.ops=[&a [add,add,add,add,add,add,add,add,add], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
    "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]",  # a YAML alias bomb
    "x" * 10_000,  # not key=value
])
def test_errors_never_echo_unbounded_input(override):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert len(str(e.value)) < 3000 and "\n" not in str(e.value)


@pytest.mark.parametrize("template", ["Q {problem:>99999999}", "Q {problem.__class__}", "Q {problem!r}", "Q {problem[0]}"])
def test_prompt_templates_take_the_plain_field_only(template):
    with pytest.raises(ConfigError, match="only the plain field"):
        load_config("tiny", [f"task.prompt_template={template!r}".replace("'", '"')])
    load_config("tiny", ['task.prompt_template="Q: {problem} -> {{}}"'])
