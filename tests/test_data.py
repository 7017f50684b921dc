"""Dataset-backed tasks on local fixtures (Parquet, JSONL, CSV, a save_to_disk folder; nothing downloaded),
recipes, field mapping and answer extraction, overlap warnings, and every bad data file refused by
`python -m stages validate` with one line, exit 2, before any model or MLflow run."""

import json
from pathlib import Path

import pytest

from stages.cli import main
from stages.config import DataSource, TaskConfig, load_config
from stages.data import DatasetTask
from stages.task_contract import TaskError
from stages.tasks import check_task

MATH_ROWS = [
    {"problem": f"What is {a} + {b}?", "solution": f"We add: {a} + {b} = \\boxed{{{a + b}}}.", "level": "Level 1"}
    for a, b in [(1, 2), (3, 4), (10, 20), (7, 8), (2, 2), (5, 6)]
]


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def data_task(**data) -> TaskConfig:
    return TaskConfig(kind="dataset", sizes={}, data=data)


def test_parquet_math_recipe_answers_are_the_last_box_of_the_solution(tmp_path):
    f = write_parquet(tmp_path / "math.parquet", MATH_ROWS)
    cfg = data_task(teacher_rl={"recipe": "math", "path": f, "rows": [0, 3]},
                    prompts={"recipe": "math", "path": f, "rows": [3, 5], "answer_field": None},
                    eval={"recipe": "math", "path": f, "rows": [5, 6]})
    task = DatasetTask(cfg)
    tr = task.problems("teacher_rl")
    assert [p.answer for p in tr] == ["3", "7", "30"]
    assert tr[0].prompt.startswith("What is 1 + 2?\n") and "\\boxed{}" in tr[0].prompt
    assert [p.id for p in task.problems("prompts")] == ["prompts-3", "prompts-4"]
    assert all(p.answer is None for p in task.problems("prompts"))
    assert task.reward("so \\boxed{3}", tr[0]) == 1.0 and task.reward("3", tr[0]) == 0.0
    assert task.check() == []  # disjoint rows: no overlap warning


def test_gsm8k_jsonl_csv_and_saved_dataset_folder(tmp_path):
    import datasets

    g = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 2 apples and buys 3. How many?",
                                                 "answer": "2 + 3 = 5\n#### 5"}])
    csv = tmp_path / "eval.csv"
    csv.write_text("q,a\n\"2+2?\",4\n\"1,000 + 1?\",1001\n")
    disk = tmp_path / "saved"
    datasets.Dataset.from_list([{"problem": "x?", "answer": "\\frac{1}{2}"}]).save_to_disk(str(disk))
    cfg = data_task(teacher_rl={"recipe": "gsm8k", "path": g}, prompts={"path": str(disk)},
                    eval={"path": str(csv), "problem_field": "q", "answer_field": "a"})
    task = DatasetTask(cfg)
    assert task.problems("teacher_rl")[0].answer == "5"
    ev = task.problems("eval")
    assert [p.answer for p in ev] == ["4", "1001"]
    assert task.reward("\\boxed{1,001}", ev[1]) == 1.0
    assert task.problems("prompts")[0].prompt.startswith("x?")


def test_missing_local_folder_is_an_error_and_offline_hub_data_a_warning_for_validate(tmp_path, monkeypatch):
    from stages.data import load_split
    from stages.task_contract import DataUnavailable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(TaskError, match="task.data.eval: data/math does not exist") as e:
        load_split(DataSource(path="data/math"), "task.data.eval")
    assert not isinstance(e.value, DataUnavailable)
    with pytest.raises(DataUnavailable, match="hub dataset org/name cannot be read here"):  # HF_HUB_OFFLINE=1
        load_split(DataSource(path="org/name"), "task.data.eval")


def test_recipes_name_the_papers_data():
    math500 = DataSource(recipe="math500")
    assert (math500.path, math500.split, math500.answer) == ("HuggingFaceH4/MATH-500", "test", "plain")
    assert DataSource(recipe="math").answer == "boxed" and DataSource(recipe="math").answer_field == "solution"
    assert DataSource(recipe="gsm8k").answer == "gsm8k" and DataSource(recipe="gsm8k").name == "main"
    assert DataSource(recipe="aime24", split="test").split == "test"  # explicit keys win


def test_overlap_between_held_out_and_training_splits_is_warned(tmp_path):
    f = write_parquet(tmp_path / "m.parquet", MATH_ROWS)
    cfg = data_task(teacher_rl={"recipe": "math", "path": f}, prompts={"recipe": "math", "path": f, "rows": [0, 2]},
                    eval={"recipe": "math", "path": f, "rows": [4, 6]})
    warnings = DatasetTask(cfg).check()
    assert any("2 of 2 'eval' problems also appear in 'teacher_rl'" in w for w in warnings), warnings


def _cli_cfg(tmp_path, data: dict, extra: dict | None = None) -> str:
    """A config file of the tiny preset with a data task (bootstrap off: models from a folder)."""
    import yaml

    tree = yaml.safe_load(Path("stages/configs/tiny.yaml").read_text())
    tree["task"] = {"kind": "dataset", "sizes": {}, "data": data}
    tree["models"] = {"teacher": {"source": str(tmp_path / "model")}, "student": {"source": str(tmp_path / "model")}}
    tree["tracking"] = {"enabled": True, "experiment": "never-created"}
    for k, v in (extra or {}).items():
        tree[k] = v
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return str(p)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A real checkpoint folder: a tiny Qwen3 with the char tokenizer (context 256)."""
    from stages.config import TinyArch
    from stages.models import char_tokenizer, save, tiny_qwen3

    tok = char_tokenizer()
    save(tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, 0), tok,
         tmp_path / "model")
    return tmp_path / "model"


def _bad_cases(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"problem": "1+1?", "answer": "2"}])
    notjson = tmp_path / "notjson.jsonl"
    notjson.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", answer: 4}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"question": "1+1?", "answer": "2"}])
    emptyprob = write_jsonl(tmp_path / "emptyprob.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "  ", "answer": "3"}])
    noanswer = write_jsonl(tmp_path / "noanswer.jsonl", [{"problem": "1+1?", "answer": ""}])
    long = write_jsonl(tmp_path / "long.jsonl", [{"problem": "9" * 300, "answer": "2"}])
    near = write_jsonl(tmp_path / "near.jsonl", [{"problem": "9" * 200, "answer": "2"}])  # 200 + 64 new > 256
    emptypq = write_parquet(tmp_path / "empty.parquet", [{"problem": "x", "answer": "1"}])
    base = {"teacher_rl": {"path": good}, "prompts": {"path": good}, "student_rl": {"path": good}, "eval": {"path": good}}
    return {
        "not JSON": ({**base, "eval": {"path": str(notjson)}}, {}, f"{notjson}:2: not JSON"),
        "missing field": ({**base, "teacher_rl": {"path": nofield}}, {}, "has no field 'problem'"),
        "empty file": ({**base, "prompts": {"path": str(empty)}}, {}, f"{empty}: empty file"),
        "empty rows": ({**base, "eval": {"path": emptypq, "rows": [5, 9]}}, {}, "has no rows in rows [5, 9]"),
        "empty problem": ({**base, "student_rl": {"path": emptyprob}}, {}, "row 2: empty 'problem'"),
        "empty answer": ({**base, "eval": {"path": noanswer}}, {}, "row 1: empty 'answer'"),
        "file does not exist": ({**base, "eval": {"path": str(tmp_path / "nope.parquet")}}, {}, "nope.parquet does not exist"),
        "prompt longer than the context": ({**base, "eval": {"path": long}}, {}, "longer than the context"),
        "prompt + max_new_tokens beyond the context": ({**base, "eval": {"path": near}}, {"sampling": {"max_new_tokens": 64}},
                                                        "exceeds the context"),
        "unlabeled training split": ({**base, "teacher_rl": {"path": good, "answer_field": None}}, {}, "needs answers"),
        "a stage's split missing": ({k: v for k, v in base.items() if k != "student_rl"}, {},
                                    "reads split 'student_rl'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(Path("/nonexistent"))))
def test_validate_refuses_bad_data_with_one_line(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    data, extra, expected = _bad_cases(tmp_path)[case]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = _cli_cfg(tmp_path, data, extra)
    for command in (["validate"], ["teacher_rl", "--root", str(tmp_path / "root")]):
        capsys.readouterr()
        assert main([command[0], "--config", cfg, *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "root").exists()  # nothing written, no stage started
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run created


def test_validate_accepts_good_data_and_reports_overlap(tmp_path, tiny_model_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"problem": "1+1?", "answer": "2"}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"problem": "2+2?", "answer": "4"}])
    cfg = _cli_cfg(tmp_path, {"teacher_rl": {"path": good}, "prompts": {"path": other}, "student_rl": {"path": other},
                              "eval": {"path": good}})
    assert main(["validate", "--config", cfg]) == 0
    out = capsys.readouterr()
    assert "'eval' problems also appear in 'teacher_rl'" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["valid"] is True


def test_plugin_that_does_not_import_or_lacks_the_contract_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad_plugins.py").write_text(
        "def no_contract(cfg):\n    return object()\n"
        "def raises(cfg):\n    raise ValueError('options.size must be > 0')\n")
    (tmp_path / "broken_plugin.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind, expected in (("no_such_module:make_task", "cannot import no_such_module"),
                           ("broken_plugin:make_task", "No module named 'not_a_module_anywhere'"),
                           ("bad_plugins:missing", "bad_plugins has no callable 'missing'"),
                           ("bad_plugins:no_contract", "lacks problems(split) and reward"),
                           ("bad_plugins:raises", "failed to build its task: ValueError: options.size must be > 0")):
        assert main(["validate", "--config", "tiny", "--set", f"task.kind={kind}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: task.kind") and expected in err and "\n" not in err, err


def test_bootstrap_needs_a_task_with_worked_solutions(tmp_path, monkeypatch):
    (tmp_path / "nosol.py").write_text(
        "from stages.tasks import ArithmeticTask\n"
        "class T:\n    def __init__(self, cfg): self.a = ArithmeticTask(cfg)\n"
        "    def problems(self, split): return self.a.problems(split)\n"
        "    def reward(self, c, p): return 0.0\n"
        "def make_task(cfg): return T(cfg)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match="has no solution"):
        check_task(load_config("tiny", ["task.kind=nosol:make_task"]))
    # a data task has worked solutions (MATH's, GSM8K's reasoning, or the boxed answer); bootstrap reads its split
    f = write_parquet(tmp_path / "m.parquet", MATH_ROWS)
    g = write_jsonl(tmp_path / "g.jsonl", [{"question": "2 and 3?", "answer": "2 + 3 = 5\n#### 5"}])
    cfg = data_task(bootstrap={"recipe": "math", "path": f}, teacher_rl={"recipe": "gsm8k", "path": g},
                    prompts={"path": f, "answer_field": None}, eval={"path": g, "problem_field": "question"})
    task = DatasetTask(cfg)
    p = task.problems("bootstrap")[0]
    assert task.solution(p) == MATH_ROWS[0]["solution"] and task.reward(task.solution(p), p) == 1.0
    q = task.problems("teacher_rl")[0]
    assert task.solution(q) == "2 + 3 = 5\nThe answer is \\boxed{5}." and task.reward(task.solution(q), q) == 1.0
    import random

    noisy = [task.solution(p, random.Random(i), noise=1.0) for i in range(10)]
    assert any(task.reward(t, p) == 0.0 for t in noisy)


def _sum_rows(n: int, seed: int, hard: bool = False) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if hard:
            rows.append({"problem": f"What is {a} + {b} + {a}?", "answer": str(2 * a + b)})
        else:
            rows.append({"problem": f"What is {a} + {b}?", "solution": f"{a} + {b} = {a + b}, so \\boxed{{{a + b}}}."})
    return rows


def test_parquet_task_runs_the_workflow_evaluates_several_sets_and_data_edits_rerun_stages(tmp_path, capsys):
    """The whole tiny workflow on a local Parquet fixture (bootstrap on its worked solutions included), the
    `evaluate` command over two named eval sets into one table and MLflow, and skip-if-done keyed on the
    data: editing rows that only student_rl reads re-runs student_rl and direct_grpo, nothing else."""
    import yaml
    from conftest import TEST_OVERRIDES
    from mlflow import MlflowClient

    train = tmp_path / "data" / "train.parquet"
    rows = _sum_rows(300, 0)
    write_parquet(train, rows)
    write_parquet(
        tmp_path / "data" / "test.parquet",
        [{"problem": r["problem"], "answer": r["solution"].split("{")[1].rstrip("}.")} for r in _sum_rows(20, 1)],
    )
    write_parquet(tmp_path / "data" / "hard.parquet", _sum_rows(10, 2, hard=True))
    math = {"path": str(train), "answer_field": "solution", "answer": "boxed"}
    tree = yaml.safe_load(Path("stages/configs/tiny.yaml").read_text())
    tree["task"] = {"kind": "dataset", "data": {
        "bootstrap": {**math, "rows": [0, 200]}, "teacher_rl": {**math, "rows": [200, 240]},
        "prompts": {**math, "rows": [240, 280], "answer_field": None}, "student_rl": {**math, "rows": [280, 300]},
        "eval": {"path": str(tmp_path / "data" / "test.parquet")}, "hard": {"path": str(tmp_path / "data" / "hard.parquet")}}}
    tree["eval"] = {"sets": ["eval", "hard"]}
    cfg = tmp_path / "parquet.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    root = str(tmp_path / "run")
    sets = [a for o in TEST_OVERRIDES if not o.startswith("task.") for a in ("--set", o)] + [
        "--set",
        "sampling.max_new_tokens=24",
    ]

    assert main(["workflow", "--config", str(cfg), "--root", root, *sets]) == 0
    out = capsys.readouterr().out
    stages = ["bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo"]
    assert "skipped" not in out and all(Path(root, s, "manifest.json").exists() for s in stages)

    assert main(["evaluate", "--config", str(cfg), "--root", root, "--model", f"{root}/student_rl/model",
                 "--label", "final", *sets, "--set", "tracking.enabled=true", "--set", "tracking.experiment=ev"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert {"eval.eval.avg@2", "eval.hard.avg@2", "eval.avg@2"} <= set(summary["metrics"])
    table = Path(root, "evaluate", "final", "eval_table.md").read_text()
    assert "| eval | 8 |" in table and "| hard | 8 |" in table and "avg@2" in table
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert "eval.hard.avg_at_2" in run.data.metrics  # MLflow keys cannot hold "@"
    assert "eval_table.md" in [a.path for a in client.list_artifacts(run.info.run_id)]

    assert main(["workflow", "--config", str(cfg), "--root", root, *sets]) == 0
    assert capsys.readouterr().out.count("skipped") == len(stages)  # same data: everything reused

    rows[290] = {**rows[290], "problem": rows[290]["problem"].replace("What", "How much")}  # a student_rl row
    write_parquet(train, rows)  # edited in place
    assert main(["workflow", "--config", str(cfg), "--root", root, *sets]) == 0
    out = capsys.readouterr().out
    rerun = [s for s in stages if f"[{s}] already published" not in out]
    assert rerun == ["student_rl", "direct_grpo"], out
