"""From a run to a deployed student (issue 28): the promotion gate, what each stage cost, and teacher data
reused across runs, through the real workflow on tiny settings and a real ``mlflow server``.

    python -m pytest tests/test_promotion.py -q

The unit tests at the top take seconds; the registry test trains one tiny workflow and two smaller ones
(about 3-5 minutes on 2 busy cores).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES, free_port, wait_http

from stages import artifacts, cost, workflow
from stages.config import load_config
from stages.recipes import promote as gate
from stages.scoring import paired_interval

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- the interval and the decision


def test_paired_interval_bootstrap_and_t():
    same = paired_interval([0.5, 1.0, 0.0, 0.5], [0.5, 1.0, 0.0, 0.5])
    assert (same["diff"], same["lo"], same["hi"], same["n"]) == (0.0, 0.0, 0.0, 4)
    new = [1.0] * 30 + [0.5] * 10
    old = [0.5] * 30 + [0.5] * 10
    b = paired_interval(new, old, 0.95, "bootstrap", 5000, seed=3)
    assert b["diff"] == pytest.approx(0.375) and 0.2 < b["lo"] < 0.375 < b["hi"] <= 0.5
    assert paired_interval(new, old, 0.95, "bootstrap", 5000, seed=3) == b  # seeded: reproducible
    t = paired_interval(new, old, 0.95, "t")
    from scipy import stats

    d = [x - y for x, y in zip(new, old)]
    sd = (sum((x - 0.375) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    half = stats.t.ppf(0.975, len(d) - 1) * sd / len(d) ** 0.5
    assert t["lo"] == pytest.approx(0.375 - half) and t["hi"] == pytest.approx(0.375 + half)
    # a wider confidence gives a wider interval; worse is negative
    wide = paired_interval(new, old, 0.99, "bootstrap", 5000, seed=3)
    assert wide["lo"] <= b["lo"] and wide["hi"] >= b["hi"]
    assert paired_interval(old, new, 0.95, "t")["hi"] < 0
    with pytest.raises(ValueError, match="same problems"):
        paired_interval([1.0], [1.0, 0.0])


def _cmp(lo, diff=0.05, hi=0.1):
    return {"diff": diff, "lo": lo, "hi": hi, "n": 100, "new": 0.5, "old": 0.45, "confidence": 0.95, "method": "bootstrap"}


def test_decisions():
    p = load_config("tiny").promote
    state = {"candidate": "3", "champion": "2"}
    assert gate.decide({"champion": _cmp(0.01)}, p, state, {})["status"] == "promoted"  # lower end above margin 0
    kept = gate.decide({"champion": _cmp(-0.01)}, p, state, {})
    assert kept["status"] == "kept" and kept["champion_after"] == "2" and "does not exceed margin +0.000" in kept["reason"]
    first = gate.decide({"baseline": _cmp(-0.5)}, p, {"candidate": "1", "champion": None}, {})
    assert first["status"] == "promoted" and first["champion_after"] == "1" and "first version" in first["reason"]
    assert gate.decide({}, p, {"candidate": "2", "champion": "2"}, {})["status"] == "already champion"
    assert gate.decide({"baseline": _cmp(0.1)}, p, None, {})["status"] == "not applied"
    strict = p.model_copy(update={"margin": 0.02, "baseline_margin": 0.0, "approval": True})
    assert gate.decide({"champion": _cmp(0.01), "baseline": _cmp(0.1)}, strict, state, {})["status"] == "kept"
    held = gate.decide({"champion": _cmp(0.03), "baseline": _cmp(0.1)}, strict, state, {})
    assert held["status"] == "awaiting approval" and held["champion_after"] == "2"  # moves only when approved
    no_base = gate.decide({"champion": _cmp(0.03), "baseline": _cmp(-0.01)}, strict, state, {})
    assert no_base["status"] == "kept" and "baseline_margin" in no_base["reason"]


# ---------------------------------------------------------------- cost


def test_meter_counts_this_stage_only():
    cost.add("tokens_generated", 5)  # before the meter: not its
    m = cost.Meter()
    cost.add("tokens_generated", 7)
    cost.add("teacher_tokens_scored", 3)
    sum(i * i for i in range(200_000))  # some CPU
    r = m.read(labeled_examples=4, usd_per_accelerator_hour=3.0)
    assert r["tokens_generated"] == 7 and r["teacher_tokens_scored"] == 3 and r["labeled_examples"] == 4
    assert r["wall_s"] >= 0 and r["cpu_s"] >= 0 and r["peak_rss_mb"] > 10 and r["accelerator_s"] == 0 and r["usd"] == 0
    both = cost.total([r, {**r, "peak_rss_mb": 1.0}])
    assert both["tokens_generated"] == 14 and both["peak_rss_mb"] == r["peak_rss_mb"]


def test_summary_cost_table_and_points_headline():
    cfg = load_config("tiny", ["eval.samples=2"])

    def m(metrics, labeled=0, teacher_tokens=0, wall=1.0):
        return {"metrics": metrics, "labeled_examples": labeled, "student_steps": 1, "wall_time_s": wall,
                "cost": {"wall_s": wall, "cpu_s": wall / 2, "accelerator_s": 0.0, "peak_rss_mb": 100.0, "tokens_generated": 10,
                         "teacher_tokens_scored": teacher_tokens, "labeled_examples": labeled, "usd": 0.0}}

    results = {"bootstrap": m({"student.eval.avg@2": 0.2, "teacher.eval.avg@2": 0.4}),
               "teacher_rl": m({"eval.avg@2": 0.5, "eval_before.avg@2": 0.4}, labeled=100),
               "kl_warmup": m({"eval.avg@2": 0.3}, teacher_tokens=5000),
               "onpolicy_distill": m({"eval.avg@2": 0.35}, teacher_tokens=3000),
               "student_rl": m({"eval.avg@2": 0.45}, labeled=50),
               "direct_grpo": m({"eval.avg@2": 0.3}, labeled=150)}
    s = workflow.summarize(cfg, results, "final", "teacher")
    h = s["headline"]
    assert h["gain_points"] == pytest.approx(25.0) and h["labeled_per_point"] == pytest.approx(150 / 25)
    assert h["teacher_tokens_per_point"] == pytest.approx(8000 / 25) and h["direct_grpo_labeled_per_point"] == pytest.approx(15)
    assert s["cost"]["total"]["teacher_tokens_scored"] == 8000 and s["cost"]["total"]["labeled_examples"] == 300
    text = workflow.format_table(s)
    assert "Per point of avg@2 gained over the base student (+25.0 points): 6.0 labeled examples, 320 teacher tokens" in text
    assert "direct GRPO: 15.0 labeled examples per point (+10.0 points)" in text
    assert "| stage | wall s | CPU s | accel s | peak RSS MB | tokens generated | teacher tokens scored | labeled | $ |" in text
    assert "| **total** | 6.0 | 3.0 | 0.0 | 100.0 | 60 | 8,000 | 300 | 0.0 |" in text
    metrics = workflow.cost_metrics(s["cost"])
    assert metrics["cost.kl_warmup.teacher_tokens_scored"] == 5000 and metrics["cost.total.wall_s"] == 6.0


def test_shared_store_location(monkeypatch):
    monkeypatch.delenv("S2D_SHARED_STORE", raising=False)
    monkeypatch.delenv("S2D_ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("S2D_ARTIFACT_BASE", raising=False)
    assert artifacts.shared_store("runs/default") == "runs/_shared"
    assert artifacts.shared_store("demo") == "demo/_shared"
    assert artifacts.shared_store("s3://b/runs/x") == "s3://b/runs/_shared"
    monkeypatch.setenv("S2D_ARTIFACT_BASE", "s3://b/base")
    assert artifacts.shared_store("s3://b/base/sparse_to_dense/manual__1") == "s3://b/base/_shared"
    assert artifacts.shared_store("s3://b/base/x", "s3://other/store/") == "s3://other/store"
    monkeypatch.setenv("S2D_SHARED_STORE", "/srv/store")
    assert artifacts.shared_store("s3://b/base/x") == "/srv/store"


# ---------------------------------------------------------------- the registry, through the real workflow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                             "--serve-artifacts", "--artifacts-destination", str(d / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=open(d / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=180)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _cli(args, root, sets):
    from stages.cli import main

    return main([*args, "--config", "tiny", "--root", root, *[a for o in sets for a in ("--set", o)]])


def test_gate_registry_cost_and_reused_teacher_data(mlflow_server, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from stages.lineage import resolve_model_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    for k in ("S2D_SHARED_STORE", "S2D_ARTIFACT_BASE", "S2D_ARTIFACT_ROOT"):
        monkeypatch.delenv(k, raising=False)
    c = MlflowClient(mlflow_server)
    common = TEST_OVERRIDES + ["tracking.enabled=true", "tracking.experiment=promo", "kl_warmup.form=topk",
                               "teacher_data.top_k=4", "teacher_data.prompts=32"]
    a, b, r = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")

    # run A, the whole workflow: its final student is the first version, so it becomes the champion
    summary = workflow.run(load_config("tiny", common + ["cost.usd_per_accelerator_hour=2.5"]), a)
    d = summary["promotion"]
    assert d["status"] == "promoted" and d["version"] == "1" and d["champion_before"] is None
    assert d["vs_baseline"]["n"] == 8 and d["uris"]["baseline"] == f"{a}/direct_grpo/model"
    v1 = c.get_model_version_by_alias("s2d-student", "champion")
    assert v1.version == "1" and sorted(v1.aliases) == ["challenger", "champion"]
    assert v1.tags["s2d.gate.status"] == "promoted" and v1.tags["s2d.gate.champion_before"] == "none"
    assert v1.tags["s2d.gate.vs_baseline"].startswith(f"{d['vs_baseline']['diff']:+.3f} [")
    assert v1.tags["s2d.gate.baseline_uri"] == f"{a}/direct_grpo/model"
    assert resolve_model_uri("models:/s2d-student@champion") == f"{a}/student_rl/model"
    text = Path(a, "summary.md").read_text()
    assert "Promotion gate: avg@2 on eval (8 problems" in text and "decision: promoted: the first version" in text
    assert "Cost per stage:" in text and "| teacher_data |" in text and "| $ |" in text
    # cost: per stage in the manifest and on its MLflow run, the table's totals on the parent run
    exp = c.get_experiment_by_name("promo").experiment_id
    parent = c.search_runs([exp], f"tags.`s2d.kind` = 'workflow' and tags.`s2d.root` = '{a}'")[0]
    kids = {k.info.run_name: k for k in c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert sorted(kids) == ["bootstrap", "direct_grpo", "kl_warmup", "onpolicy_distill", "promote", "student_rl",
                            "teacher_data", "teacher_rl"]
    td = artifacts.read_manifest(f"{a}/teacher_data")
    assert td["cost"]["teacher_tokens_scored"] == td["metrics"]["completion_tokens"] > 0
    assert kids["teacher_data"].data.metrics["cost.teacher_tokens_scored"] == td["cost"]["teacher_tokens_scored"]
    assert kids["teacher_rl"].data.metrics["cost.labeled_examples"] == 16 and kids["bootstrap"].data.metrics["cost.wall_s"] > 0
    assert parent.data.metrics["cost.total.tokens_generated"] == sum(
        artifacts.read_manifest(f"{a}/{s}")["cost"]["tokens_generated"] for s in kids if s != "promote")
    assert parent.data.tags["s2d.gate.status"] == "promoted" and parent.data.tags["s2d.champion"] == "s2d-student/1"
    # teacher data: published once into the shared store, the stage's manifest points there
    entry = td["outputs"]["data"].rsplit("/", 1)[0]
    assert entry == f"{tmp_path}/_shared/teacher_data/{td['store_key']}" and "reused" not in td
    stored = artifacts.read_manifest(entry)
    assert stored["producer"]["run"] == kids["teacher_data"].info.run_id and not Path(a, "teacher_data", "data").exists()

    # run B: another student (A's base teacher as the student), A's RL teacher as its raw teacher: its teacher data
    # is A's (nothing generated, the teacher never loaded); margin 1 cannot be met, so the champion stays
    b_sets = common + ["workflow.stages=[kl_warmup,onpolicy_distill]", f"models.teacher.source={a}/teacher_rl/model",
                       f"models.student.source={a}/bootstrap/teacher", "promote.margin=1.0"]
    d = workflow.run(load_config("tiny", b_sets), b)["promotion"]
    assert d["status"] == "kept" and d["version"] == "2" and d["champion_before"] == "1" and d["vs_champion"]["n"] == 8
    assert c.get_model_version_by_alias("s2d-student", "champion").version == "1"
    v2 = c.get_model_version_by_alias("s2d-student", "challenger")
    assert v2.version == "2" and v2.tags["s2d.gate.status"] == "kept" and v2.tags["s2d.gate.champion_before"] == "s2d-student/1"
    assert v2.tags["s2d.gate.vs_champion.lo"] == f"{d['vs_champion']['lo']:.4f}" and "margin +1.000" in v2.tags["s2d.gate.reason"]
    tb = artifacts.read_manifest(f"{b}/teacher_data")
    assert tb["reused"] == {"from": entry, "key": td["store_key"], "run": kids["teacher_data"].info.run_id, "root": a}
    assert tb["cost"]["teacher_tokens_scored"] == 0 and tb["outputs"]["data"] == td["outputs"]["data"]
    assert artifacts.read_manifest(entry)["published_at"] == stored["published_at"]  # not written again
    pb = c.search_runs([exp], f"tags.`s2d.kind` = 'workflow' and tags.`s2d.root` = '{b}'")[0].info.run_id
    kb = {k.info.run_name: k for k in c.search_runs([exp], f"tags.mlflow.parentRunId = '{pb}'")}
    assert kb["teacher_data"].data.tags["s2d.reused_from"] == entry
    assert kb["teacher_data"].data.tags["s2d.reused.run"] == kids["teacher_data"].info.run_id
    assert kb["kl_warmup"].data.tags["s2d.input.teacher_data.run"] == kb["teacher_data"].info.run_id
    assert "| teacher_data (reused) |" in Path(b, "summary.md").read_text()
    # the same gate with a margin it meets: B's version takes the champion directly
    capsys.readouterr()
    assert _cli(["promote"], b, b_sets + ["promote.margin=-1.0"]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # what the DAG's tasks read
    assert said["status"] == "promoted" and said["champion"] == "2" and "vs champion (version 1)" in said["comparison"]
    assert c.get_model_version_by_alias("s2d-student", "champion").version == "2"
    assert c.get_model_version("s2d-student", "1").tags["s2d.gate.replaced_by"] == "s2d-student/2"

    # run C with approval: the passing version waits; rejected, the champion stays; approved, it moves
    c_sets = common + ["workflow.stages=[onpolicy_distill]", f"models.teacher.source={a}/teacher_rl/model",
                       f"models.student.source={a}/bootstrap/student", "onpolicy_distill.steps=2",
                       "promote.margin=-1.0", "promote.approval=true"]
    d = workflow.run(load_config("tiny", c_sets), r)["promotion"]
    assert d["status"] == "awaiting approval" and d["version"] == "3" and d["champion_now"] == "2"
    assert c.get_model_version_by_alias("s2d-student", "champion").version == "2"
    capsys.readouterr()
    assert _cli(["promote", "--reject", "--by", "bob", "--note", "not this week"], r, c_sets) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "rejected"
    v3 = c.get_model_version("s2d-student", "3")
    assert v3.tags["s2d.gate.status"] == "rejected" and v3.tags["s2d.gate.approved_by"] == "bob"
    assert c.get_model_version_by_alias("s2d-student", "champion").version == "2"
    assert "approval: rejected by bob" in Path(r, "summary.md").read_text()
    assert _cli(["promote", "--approve"], r, c_sets) == 2  # the opposite verdict on the same decision: refused
    assert "already rejected by bob" in capsys.readouterr().err
    # a new decision (another margin) is held again, and approved this time
    c_sets[-2] = "promote.margin=-0.99"
    assert _cli(["promote"], r, c_sets) == 0
    assert "decision: awaiting approval" in capsys.readouterr().out
    assert _cli(["promote", "--approve", "--by", "alice"], r, c_sets) == 0
    assert c.get_model_version_by_alias("s2d-student", "champion").version == "3"
    assert resolve_model_uri("models:/s2d-student@champion") == f"{r}/onpolicy_distill/model"
    assert c.get_model_version("s2d-student", "3").tags["s2d.gate.approved_by"] == "alice"
    summary = json.loads(Path(r, "summary.json").read_text())
    assert summary["promotion"]["approval"]["verdict"] == "approved" and summary["promotion"]["champion_now"] == "3"
    pc = c.search_runs([exp], f"tags.`s2d.kind` = 'workflow' and tags.`s2d.root` = '{r}'")[0]
    assert pc.data.tags["s2d.gate.status"] == "approved" and pc.data.tags["s2d.champion"] == "s2d-student/3"
    # a rerun of the whole workflow trains nothing; the gate finds its version already champion and keeps the
    # record of the approval on it
    capsys.readouterr()
    assert workflow.run(load_config("tiny", c_sets), r)["promotion"]["status"] == "already champion"
    assert capsys.readouterr().out.count("already published with the same config and inputs: skipped") == 2
    v3 = c.get_model_version("s2d-student", "3")
    assert v3.tags["s2d.gate.approval"] == "approved" and c.get_model_version_by_alias("s2d-student", "champion").version == "3"
