"""The paper-table benchmark end to end on test-sized settings: every arm runs, budgets are equal, the learning
rates are chosen on the validation split, and the same command run twice gives identical numbers."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SETS = [a for o in TEST_OVERRIDES + ["task.sizes.validation=16", "sampling.max_new_tokens=24"] for a in ("--set", o)]
ARGS = ["--preset", "cpu", "--seeds", "0", "1", "--lrs", "0.001", "0.0003", "--distill-lrs", "0.001", *SETS]


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_bench(*args):
    """The documented command, as a user runs it (its worker processes re-import the script)."""
    return subprocess.run([sys.executable, str(REPO / "bench" / "paper_table.py"), *args], cwd=REPO, check=False)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """One test-sized table (2 seeds, 2 workers); ~2 min on 2 quiet cores."""
    tmp = tmp_path_factory.mktemp("paper")
    proc = run_bench(*ARGS, "--root", str(tmp / "runs"), "--out", str(tmp / "out"), "--workers", "2")
    assert proc.returncode == 0
    return tmp, json.loads((tmp / "out" / "paper_table_paper-cpu.json").read_text())


def test_paper_table_runs_every_arm_with_equal_student_steps(table):
    tmp, result = table
    bench = load("paper_table")
    names = {r["arm"] for r in result["rows"]}
    assert names == {"full", "full, 2b sampled", "raw teacher (no 1)", "no warmup (no 2a)", "no on-policy (no 2b)", "warmup only",
                     bench.EQ_NO2B, bench.EQ_WARM, "direct GRPO", "base student (no training)"}
    trained = [r for r in result["rows"] if r["arm"] != "base student (no training)"]
    assert len(trained) == 2 * (len(names) - 1)
    budget = 3 + 3 + 2  # kl_warmup + onpolicy_distill + student_rl steps of TEST_OVERRIDES
    equal_steps = [r for r in trained if r["arm"] not in (bench.EQ_NO2B, bench.EQ_WARM)]
    assert {r["student_steps"] for r in equal_steps} == {budget}
    # the equal-teacher-token arms: 2a gets w + d/2 steps (a 2a step costs the teacher twice a 2b step)
    assert {r["student_steps"] for r in trained if r["arm"] == bench.EQ_WARM} == {3 + 2}
    assert {r["student_steps"] for r in trained if r["arm"] == bench.EQ_NO2B} == {3 + 2 + 2}
    # the ablations really differ: the raw-teacher arm distills from another teacher than the full arm
    full = next(r for r in trained if r["arm"] == "full" and r["seed"] == 0)
    raw = next(r for r in trained if r["arm"] == "raw teacher (no 1)" and r["seed"] == 0)
    assert full["final_model"] != raw["final_model"]
    assert all(r["c2_final"] >= 0 for r in result["rows"])
    md = (tmp / "out" / "paper_table_paper-cpu.md").read_text()
    assert "| full |" in md and "| direct GRPO |" in md and "## Equal teacher tokens" in md and "paired [95% CI]" in md
    assert (tmp / "out" / "paper_table_paper-cpu.png").stat().st_size > 10_000


def test_learning_rates_are_chosen_on_validation_and_used_by_every_arm(table):
    _, result = table
    sel = {s["what"]: s for s in result["selection"]}
    assert set(sel) == {"2a/2b lr (full arm)", "stage 3 lr (full arm)", "direct GRPO lr"}
    for s in sel.values():  # the choice is the argmax of the validation scores (first listed wins a tie)
        assert s["values"][str(s["chosen"])] == max(s["values"].values())
    assert set(sel["direct GRPO lr"]["values"]) == {"0.001", "0.0003"}
    chosen = dict(c.split("=") for c in result["chosen"])
    assert float(chosen["direct_grpo.optim.lr"]) == sel["direct GRPO lr"]["chosen"]
    assert float(chosen["student_rl.optim.lr"]) == sel["stage 3 lr (full arm)"]["chosen"]
    for r in result["rows"]:
        if r["arm"] in ("full", "no warmup (no 2a)"):
            assert f"student_rl.optim.lr={chosen['student_rl.optim.lr']}" in r["overrides"]


def test_the_same_command_twice_gives_identical_results(table, tmp_path):
    """Reproducibility on one machine: a fresh root, one worker in-process instead of two processes."""
    _, first = table
    bench = load("paper_table")
    assert bench.main([*ARGS, "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    again = json.loads((tmp_path / "out" / "paper_table_paper-cpu.json").read_text())
    key = lambda r: (r["arm"], r["seed"])  # noqa: E731
    for a, b in zip(sorted(first["rows"], key=key), sorted(again["rows"], key=key)):
        assert (a["arm"], a["avg@2"], a["c2_final"], a["teacher_tokens"]) == (
            b["arm"],
            b["avg@2"],
            b["c2_final"],
            b["teacher_tokens"],
        )
    assert first["selection"] == again["selection"]


def test_a_rerun_on_the_same_root_reads_the_kept_scores(table, tmp_path):
    """A rerun of the same command on the same root trains nothing (every stage published) and recomputes no C2
    or validation score: it reads <arm root>/_scores. Proved by planting a value there and finding it in the rows."""
    tmp, first = table
    full = [r for r in first["rows"] if r["arm"] == "full" and r["seed"] == 1][0]
    kept = list((tmp / "runs" / "seed1" / "full" / "_scores").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["c2"] == full["c2_final"]
    original = kept[0].read_text()
    try:
        kept[0].write_text(json.dumps({**json.loads(original), "c2": 123.0}))
        bench = load("paper_table")
        assert bench.main([*ARGS, "--root", str(tmp / "runs"), "--out", str(tmp_path), "--workers", "1",
                           "--arms", "full"]) == 0
    finally:
        kept[0].write_text(original)
    again = json.loads((tmp_path / "paper_table_paper-cpu.json").read_text())
    row = [r for r in again["rows"] if r["arm"] == "full" and r["seed"] == 1][0]
    assert row["c2_final"] == 123.0 and row["stages_reused"] == row["stages"]


def test_c2_curves_read_every_arm_of_a_real_table_root(table):
    """bench/c2_curves.py on the table's real result: each arm's folder comes from its rows (the first seed's full
    arm and direct GRPO were run by the selection, under sweep/), each arm's 2b curve starts after its 2a steps,
    stage 3's reward after both, the eval markers sit at the stages' ends, every value is the mean over seeds."""
    _, result = table
    c2c = load("c2_curves")
    curves = c2c.curves(c2c.table_arms(result))
    where = {(r["arm"], r["seed"]): Path(r["final_model"]).parent.parent for r in result["rows"] if r.get("final_model")}
    assert "sweep" in where[("full", 0)].parts and "sweep" not in where[("full", 1)].parts

    def rows(seed, stage, arm="full"):
        f = where[(arm, seed)] / stage / "metrics.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []

    assert {"full", "no-warmup-no-2a", "no-on-policy-no-2b", "direct-grpo"} <= set(curves)
    w, d, r = (len(rows(0, s)) for s in ("kl_warmup", "onpolicy_distill", "student_rl"))
    full = curves["full"]
    assert w and d and r and sorted(full["2b"]) == list(range(w + 1, w + d + 1))
    assert sorted(full["3"]) == list(range(w + d + 1, w + d + r + 1))
    assert sorted(full["eval"]) == [w, w + d, w + d + r] and 0 in full["2a"] and w in full["2a"]
    assert full["2b"][w + 1] == pytest.approx((rows(0, "onpolicy_distill")[0]["kl"] + rows(1, "onpolicy_distill")[0]["kl"]) / 2)
    finals = [r for r in result["rows"] if r["arm"] == "full"]
    assert full["eval"][w + d + r] == pytest.approx(sum(x["avg@2"] for x in finals) / len(finals))
    assert not curves["no-warmup-no-2a"]["2a"] and min(curves["no-warmup-no-2a"]["2b"]) == 1
    assert sorted(curves["direct-grpo"]["3"]) == list(range(1, len(rows(0, "direct_grpo", "direct GRPO")) + 1))


def test_a_best_value_at_the_grid_edge_extends_the_grid():
    """A sweep whose best value is an edge of its grid found no optimum: the grid grows past that edge
    (1-3-10 steps, at most twice) and the choice is made again; an interior best stops it."""
    bench = load("paper_table")
    assert [bench.next_lr(x, True) for x in (1e-4, 3e-4, 3e-3)] == [3e-4, 1e-3, 1e-2]
    assert [bench.next_lr(x, False) for x in (1e-4, 3e-4)] == [3e-5, 1e-4]
    score = {1e-4: 0.05, 3e-4: 0.04, 1e-3: 0.01, 3e-5: 0.06, 1e-5: 0.02}
    ran = []

    def make(v):
        ran.append(v)
        return v

    jobs = {v: v for v in (1e-4, 3e-4, 1e-3)}
    values, best, added = bench.choose(jobs, make, score.get)
    assert (best, added, ran) == (3e-5, [3e-5, 1e-5], [3e-5, 1e-5]) and list(values) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    values, best, added = bench.choose({v: v for v in (1e-5, 3e-5, 1e-4)}, make, score.get)
    assert (best, added) == (3e-5, [])  # interior: no extension
    flat = {1e-4: 0.009, 3e-4: 0.005, 1e-3: 0.003, 3e-5: 0.009}  # a tie with the extension keeps the grid's value
    assert bench.choose({v: v for v in (1e-4, 3e-4, 1e-3)}, lambda v: v, flat.get)[1:] == (1e-4, [3e-5])
    up = {3e-4: 0.1, 1e-3: 0.2, 3e-3: 0.3, 1e-2: 0.25}
    assert bench.choose({v: v for v in (3e-4, 1e-3, 3e-3)}, lambda v: v, up.get)[1:] == (3e-3, [1e-2])


def test_determinism_probe_repeats_a_bootstrap_bit_for_bit(tmp_path):
    """bench/determinism.py, test-sized: the same bootstrap twice in fresh processes gives the same weights."""
    sets = [a for o in TEST_OVERRIDES for a in ("--set", o)]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "determinism.py"), "--variants", "1 thread", "1 thread, again",
                           "--out", str(tmp_path), *sets], cwd=REPO, check=False)
    assert proc.returncode == 0
    rows = json.loads((tmp_path / "determinism.json").read_text())["rows"]
    assert rows["1 thread"]["teacher_sha"] == rows["1 thread, again"]["teacher_sha"]
    assert rows["1 thread"]["student_sha"] == rows["1 thread, again"]["student_sha"]
    assert "| 1 thread, again |" in (tmp_path / "determinism.md").read_text()


def test_paired_interval_matches_a_hand_computation():
    common = load("_common")
    # differences 0.2, 0.3, 0.1, 0.2, 0.2: mean 0.2, sd sqrt(0.02 / 4), t(0.975, 4 df) = 2.776
    d = common.paired([0.3, 0.5, 0.4, 0.6, 0.2], [0.1, 0.2, 0.3, 0.4, 0.0])
    half = 2.776 * (0.02 / 4) ** 0.5 / 5 ** 0.5
    assert d["mean"] == pytest.approx(0.2) and d["lo"] == pytest.approx(0.2 - half) and d["hi"] == pytest.approx(0.2 + half)
    assert d["resolved"]
    # 3 seeds, differences 0.2, 0.3, 0.1: the interval (t = 4.303) reaches below 0: within noise
    assert not common.paired([0.3, 0.5, 0.4], [0.1, 0.2, 0.3])["resolved"]


def test_every_arm_configures_on_the_real_preset():
    """The real preset (import + prune) takes every arm with its base models given as checkpoints: its import
    settings are dropped with its import source (no model is loaded)."""
    bench = load("paper_table")
    base = str(REPO / "stages" / "configs" / "smollm2-cpu.yaml")
    cfg0 = bench.load_config(base, [])
    for name, arm in [*bench.arms(cfg0).items(), ("direct GRPO", bench.direct(1e-5, 24))]:
        cfg = bench.arm_config(base, [], "/runs/base/import/teacher", "/runs/base/prune/student", arm)
        assert cfg.models.teacher.source == "/runs/base/import/teacher" and cfg.models.teacher.import_from is None, name
        assert cfg.models.student.source == "/runs/base/prune/student", name


@pytest.mark.parametrize("steps,warm", [(30, 5), (8, 2), (3, 2)])
def test_the_warmed_2b_arm_really_warms_up_on_short_2b_stages(steps, warm):
    """A sixth of 2b's steps, at least 2: a 1-step warmup runs its first step at the full rate (no warmup at all),
    which is what a sixth of the real preset's 8 steps would give."""
    bench = load("paper_table")
    base, sets = str(REPO / "stages" / "configs" / "smollm2-cpu.yaml"), [f"onpolicy_distill.steps={steps}"]
    cfg = bench.arm_config(base, sets, "/t", "/s", bench.arms(bench.load_config(base, sets))[bench.WARM_2B])
    assert cfg.onpolicy_distill.optim.warmup_steps == warm

def test_only_some_arms_and_only_direct_grpos_rate(tmp_path):
    """--arms runs only the named arms (by key); --sweep direct chooses only direct GRPO's rate on validation
    (the stages keep the preset's); the base models may be given as paths (a real preset's published import/prune)."""
    sets = [a for o in TEST_OVERRIDES + ["task.sizes.validation=16", "sampling.max_new_tokens=24"] for a in ("--set", o)]
    bench = load("paper_table")
    args = ["--preset", "cpu", "--seeds", "0", "--lrs", "0.001", "0.0003", "--sweep", "direct", *sets,
            "--out", str(tmp_path / "out"), "--workers", "1"]
    assert bench.main([*args, "--arms", "no-warmup-no-2a", "direct-grpo", "--root", str(tmp_path / "runs")]) == 0
    result = json.loads((tmp_path / "out" / "paper_table_paper-cpu.json").read_text())
    assert {r["arm"] for r in result["rows"]} == {"no warmup (no 2a)", "direct GRPO", "base student (no training)"}
    assert [s["what"] for s in result["selection"]] == ["direct GRPO lr"]
    assert {float(v) for v in result["selection"][0]["values"]} >= {0.001, 0.0003}  # JSON keys: strings
    assert result["chosen"] == [f"direct_grpo.optim.lr={result['selection'][0]['chosen']}"]
    # the same base models given as paths: no setup stage runs under the new root, the same numbers come out
    base = tmp_path / "runs" / "base" / "bootstrap"
    assert bench.main([*args, "--arms", "direct-grpo", "--root", str(tmp_path / "again"), "--set",
                       f"models.teacher.source={base / 'teacher'}", "--set", f"models.student.source={base / 'student'}"]) == 0
    again = json.loads((tmp_path / "out" / "paper_table_paper-cpu.json").read_text())
    assert not (tmp_path / "again" / "base").exists() or not any((tmp_path / "again" / "base").iterdir())
    assert again["selection"] == result["selection"]
    # --sweep none: every arm at the preset's (and --set) rates; the plateau arm keeps the student budget equal
    none = [a for a in args if a not in ("--sweep", "direct")] + ["--sweep", "none", "--set", "kl_warmup.steps=4"]
    assert bench.main([*none, "--arms", "full", "2a-until-c2-plateaus", "--root", str(tmp_path / "runs")]) == 0
    plateau = json.loads((tmp_path / "out" / "paper_table_paper-cpu.json").read_text())
    assert plateau["selection"] == [] and plateau["chosen"] == []
    rows = {r["arm"]: r for r in plateau["rows"]}
    assert rows["2a until C2 plateaus"]["student_steps"] == rows["full"]["student_steps"]
    assert 1 <= rows["2a until C2 plateaus"]["warmup_steps"] <= rows["full"]["warmup_steps"] == 4


def test_per_arm_rates_choose_each_arms_own_2a_2b_rate_on_validation(tmp_path):
    """--per-arm-rates (issue 27): each arm's own 2a/2b rate is the best on validation over the grid, and every
    seed of that arm runs at it (not at the full arm's)."""
    sets = [a for o in TEST_OVERRIDES + ["task.sizes.validation=16", "sampling.max_new_tokens=24"] for a in ("--set", o)]
    bench = load("paper_table")
    assert bench.main(["--preset", "cpu", "--seeds", "0", "1", "--sweep", "none", "--per-arm-rates", "--distill-lrs",
                       "0.01", "0.0003", "--arms", "full", "no-warmup-no-2a", *sets, "--root", str(tmp_path / "runs"),
                       "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    result = json.loads((tmp_path / "out" / "paper_table_paper-cpu.json").read_text())
    sel = {s["what"]: s for s in result["selection"]}
    assert set(sel) == {"2a/2b lr (full, its own)", "2a/2b lr (no warmup (no 2a), its own)"}
    for arm in ("full", "no warmup (no 2a)"):
        s = sel[f"2a/2b lr ({arm}, its own)"]
        assert {float(v) for v in s["values"]} == {0.01, 0.0003}  # two values: no edge to extend past
        assert s["values"][str(s["chosen"])] == max(s["values"].values())
        assert result["own_rates"][arm] == str(s["chosen"])
        for r in (r for r in result["rows"] if r["arm"] == arm):  # both seeds
            assert f"onpolicy_distill.optim.lr={s['chosen']}" in r["overrides"], (arm, r["seed"])
    assert "own chosen rate" in (tmp_path / "out" / "paper_table_paper-cpu.md").read_text()


@pytest.mark.parametrize("bad", [["--set", "kl_warmup.stepz=3"], ["--digits", "1"],  # 1-digit tasks: too few problems
                                 ["--arms", "full", "no-such-arm"]])
def test_bad_preset_or_override_is_a_one_line_error(tmp_path, bad):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "paper_table.py"), "--preset", "cpu", *bad, "--root", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and bad[-1].split("=")[0] in proc.stderr
    assert not (tmp_path / "base").exists()  # nothing ran


def test_mechanism_mode_measures_the_2b_gain_per_digit_count(tmp_path):
    """--digits: full vs no-2b vs warmup-only at equal teacher tokens, one task per digit count (test-sized)."""
    sets = [a for o in TEST_OVERRIDES + ["task.sizes.validation=16"] for a in ("--set", o)]
    proc = run_bench("--preset", "cpu", "--digits", "3", "4", "--seeds", "0", "1", "--root", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "out"), "--workers", "2", *sets)
    assert proc.returncode == 0
    result = json.loads((tmp_path / "out" / "mechanism_paper-cpu.json").read_text())
    assert [m["digits"] for m in result["mechanism"]] == [3, 4]
    bench = load("paper_table")
    for m in result["mechanism"]:
        assert {r["arm"] for r in m["rows"]} == set(bench.MECHANISM_ARMS) | {"base student (no training)"}
    md = (tmp_path / "out" / "mechanism_paper-cpu.md").read_text()
    assert "| 3 |" in md and "| 4 |" in md and (tmp_path / "out" / "mechanism_paper-cpu.png").stat().st_size > 5_000
