"""Smoke test of bench/speed_vs_trl.py: every arm runs one tiny step on both sides and the results
(dict, markdown, PNG, JSON, MLflow run) are well formed. No timing is asserted: benchmarks are not tests."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("speed_vs_trl", REPO / "bench" / "speed_vs_trl.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_arm_runs_and_results_are_well_formed(tmp_path):
    bench = load_bench()
    opts = bench.parse(["--repeats", "1", "--steps", "1", "--warmup", "0", "--max-new-tokens", "3", "--group-size", "2",
                        "--grpo-prompts", "2", "--distill-prompts", "2", "--out", str(tmp_path)])
    res = bench.run_benchmark(opts, log=lambda s: None)

    assert {"grpo", "distill_full", "distill_sampled", "rollout"} <= set(res["arms"])
    for name, arm in res["arms"].items():
        for side in ("ours", "other"):
            stats = arm[side]
            # identical work: both sides count the same samples and completion tokens per step
            assert stats["tokens_per_step"] == stats["samples_per_step"] * 3, (name, side, stats)
            assert stats["samples_per_s"] > 0 and stats["gen_s_per_step"] > 0 and math.isfinite(stats["cpu_s_per_step"])
            assert len(arm["steps"][side]) == 1 and len(arm["steps"][side][0]) == 1
        assert arm["ours"]["samples_per_step"] == arm["other"]["samples_per_step"]
        r = arm["ratio"]
        assert 0 < r["min"] <= r["median"] <= r["max"]
    assert res["arms"]["grpo"]["ours"]["samples_per_step"] == 2 * 2  # prompts x group
    assert res["arms"]["distill_full"]["ours"]["samples_per_step"] == 2
    for sides in res["profile"].values():  # one profiled step per side: kernel time by category
        for p in sides.values():
            assert p["step_ms"] > 0 and p["profiled_step_ms"] > 0 and p["top"] and sum(p["ms"].values()) > 0
            assert all(v >= 0 for v in p["share"].values())
    m = res["meta"]
    assert m["versions"]["trl"] and m["machine"]["torch_threads"] == 1 and m["command"].startswith("python bench/speed_vs_trl.py")

    files = bench.write_outputs(res, tmp_path)
    md = files["md"].read_text()
    assert "| GRPO step" in md and "Command: `python bench/speed_vs_trl.py" in md and "Where the time goes" in md
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files["json"].read_text())["arms"].keys() == res["arms"].keys()

    run_id = bench.log_mlflow(res, files)  # MLFLOW_TRACKING_URI points into tmp_path (conftest)
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    assert "grpo.ratio_median" in run.data.metrics and run.data.params["version.trl"] == m["versions"]["trl"]
    assert {a.path for a in MlflowClient().list_artifacts(run_id)} >= {"speed_vs_trl.md", "speed_vs_trl.png", "speed_vs_trl.json"}
