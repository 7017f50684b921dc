"""The whole chain on tiny settings: every stage publishes, lineage and counts are right, MLflow
holds one parent with a child per stage, and a re-run skips everything."""

import json
import os
from pathlib import Path

from mlflow import MlflowClient

from stages import artifacts, workflow
from stages.cli import main


def test_workflow_end_to_end_with_mlflow_and_skip_on_rerun(small_cfg, tmp_path, capsys):
    root = str(tmp_path / "run")
    cfg = small_cfg("tracking.enabled=true", "tracking.experiment=wf-test")
    summary = workflow.run(cfg, root)
    stages = ["bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo"]
    manifests = {s: artifacts.read_manifest(f"{root}/{s}") for s in stages}
    assert all(manifests.values())
    for s in stages:  # every output verifies and loads as a HF folder
        for uri in manifests[s]["outputs"].values():
            assert (artifacts.fetch(uri) / "config.json").exists()
    # lineage: each stage consumed the checkpoint the previous one produced
    assert manifests["teacher_rl"]["inputs"] == {"policy": f"{root}/bootstrap/teacher"}
    assert manifests["kl_warmup"]["inputs"] == {"teacher": f"{root}/teacher_rl/model", "student": f"{root}/bootstrap/student"}
    assert manifests["onpolicy_distill"]["inputs"] == {
        "teacher": f"{root}/teacher_rl/model",
        "student": f"{root}/kl_warmup/model",
    }
    assert manifests["student_rl"]["inputs"] == {"policy": f"{root}/onpolicy_distill/model"}
    assert manifests["direct_grpo"]["inputs"] == {"policy": f"{root}/bootstrap/student"}
    # equal student budgets; labeled data only in the GRPO stages
    h = summary["headline"]
    assert h["workflow_student_steps"] == 3 + 3 + 2 == h["direct_grpo_steps"]
    assert manifests["kl_warmup"]["labeled_examples"] == manifests["onpolicy_distill"]["labeled_examples"] == 0
    assert manifests["teacher_rl"]["labeled_examples"] == 4 * 4  # 4 steps x 4 prompts, all distinct
    for key in ("c1_teacher_before", "c1_teacher_after", "c2_kl_warmup_before", "c2_kl_warmup_after"):
        assert isinstance(h[key], float)
    table = capsys.readouterr().out
    assert "direct GRPO baseline" in table and "C2 (student close to teacher)" in table
    assert json.loads(Path(root, "summary.json").read_text())["headline"] == h

    # MLflow: one parent, one child per stage, each child pointing to what it consumed and produced
    client = MlflowClient()
    exp = client.get_experiment_by_name("wf-test")
    parents = client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")
    assert len(parents) == 1 and parents[0].info.run_name == "tiny · run" and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(stages + ["promote"])  # the gate after the report (tests/test_promotion.py)
    # short, uniform keys: the role (not the stage's argument name), the checkpoint relative to the root,
    # the producing run and its logged model; full URIs in params
    od, trl = by_name["onpolicy_distill"].data, by_name["teacher_rl"].data
    assert od.tags["s2d.input.student"] == "kl_warmup/model" and od.params["input.student"] == f"{root}/kl_warmup/model"
    assert od.tags["s2d.input.student.run"] == by_name["kl_warmup"].info.run_id
    assert (
        od.tags["s2d.output.model"] == "onpolicy_distill/model" and od.params["output.model"] == f"{root}/onpolicy_distill/model"
    )
    assert trl.tags["s2d.input.teacher"] == "bootstrap/teacher" and "s2d.input.policy" not in trl.tags
    assert by_name["student_rl"].data.tags["s2d.input.student"] == "onpolicy_distill/model"
    assert "kl" in od.metrics and "final.c2_after" in od.metrics
    assert len(client.get_metric_history(by_name["teacher_rl"].info.run_id, "reward")) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    # every checkpoint is a logged model pointing at its URI, output of its run, input of its consumers
    lm = client.get_logged_model(od.tags["s2d.output.model.model"])
    assert lm.tags["s2d.uri"] == f"{root}/onpolicy_distill/model" and lm.source_run_id == by_name["onpolicy_distill"].info.run_id
    consumer = client.get_run(by_name["student_rl"].info.run_id)
    assert [m.model_id for m in consumer.inputs.model_inputs] == [lm.model_id]
    assert lm.model_id in [m.model_id for m in client.get_run(lm.source_run_id).outputs.model_outputs]
    # the RL teacher and the final student are registered versions, the student's naming the teacher's
    student = client.search_model_versions("name = 's2d-student'")
    teacher = client.search_model_versions("name = 's2d-teacher'")
    assert len(student) == len(teacher) == 1
    assert student[0].tags["s2d.uri"] == f"{root}/student_rl/model" and student[0].run_id == by_name["student_rl"].info.run_id
    assert (
        student[0].tags["s2d.teacher_version"] == "s2d-teacher/1" and "arithmetic/teacher_rl@" in student[0].tags["s2d.datasets"]
    )
    assert teacher[0].tags["s2d.uri"] == f"{root}/teacher_rl/model"

    # a second run skips every finished stage: no training, no new child runs, no new versions
    capsys.readouterr()
    assert main(["workflow", "--config", "tiny", "--root", root, *[a for o in _cli_overrides() for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(stages) + 1  # the gate too: its version is the champion it compared with
    assert sum("s2d.stage" in r.data.tags for r in client.search_runs([exp.experiment_id])) == len(stages) + 1
    assert len(client.search_model_versions("name = 's2d-student'")) == 1
    # ... and no empty parent run: the results stay on the run that published them
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id], "tags.`s2d.kind` = 'workflow'")] == [parent]

    # the version's description links the workflow run, the training run and the teacher's version
    desc = client.get_model_version("s2d-student", "1").description
    eid = exp.experiment_id
    for link in (f"[tiny · run](#/experiments/{eid}/runs/{parent}?workflowType=machine_learning)",
                 f"[student_rl](#/experiments/{eid}/runs/{by_name['student_rl'].info.run_id}?workflowType=machine_learning)",
                 "[s2d-teacher version 1](#/models/s2d-teacher/versions/1?workflowType=machine_learning)"):
        assert link in desc, desc
    # the docs' Python lineage snippet runs as written against this store
    from conftest import run_docs_python

    out = run_docs_python("tracking.md", "## Seeing it", os.environ["MLFLOW_TRACKING_URI"], tmp_path)
    assert f"{root}/student_rl/model" in out and f"{root}/teacher_rl/model" in out and "s2d.input.student" in out, out

    # a registered version is an input like any URI: resolved through the registry
    from stages.lineage import resolve_model_uri

    assert resolve_model_uri("models:/s2d-student/1") == f"{root}/student_rl/model"


def _cli_overrides():
    from conftest import TEST_OVERRIDES

    return TEST_OVERRIDES + ["tracking.enabled=true", "tracking.experiment=wf-test"]


def test_ablation_switches_skip_stages(small_cfg, tmp_path):
    root = str(tmp_path / "abl")
    cfg = small_cfg("workflow.stages=[onpolicy_distill]", "workflow.baseline=false")
    summary = workflow.run(cfg, root)
    assert not Path(root, "teacher_rl").exists() and not Path(root, "kl_warmup").exists()
    m = artifacts.read_manifest(f"{root}/onpolicy_distill")
    assert m["inputs"] == {"teacher": f"{root}/bootstrap/teacher", "student": f"{root}/bootstrap/student"}  # raw teacher
    assert summary["headline"]["workflow_student_steps"] == 3
    # any checkpoint can be evaluated on its own, through the stage command
    from conftest import TEST_OVERRIDES

    args = ["evaluate", "--config", "tiny", "--root", root, "--model", f"{root}/onpolicy_distill/model", "--label", "distilled"]
    assert main(args + [a for o in TEST_OVERRIDES for a in ("--set", o)]) == 0
    ev = artifacts.read_manifest(f"{root}/evaluate/distilled")
    assert ev["inputs"] == {"model": f"{root}/onpolicy_distill/model"}
    assert 0.0 <= ev["metrics"]["eval.avg@2"] <= 1.0 and "eval.greedy" in ev["metrics"]


def test_parent_run_names_tell_dag_runs_apart(small_cfg, monkeypatch):
    cfg = small_cfg()
    monkeypatch.delenv("AIRFLOW_CTX_DAG_RUN_ID", raising=False)
    assert workflow.parent_name(cfg, "/runs/demo/") == "tiny · demo"
    names = set()
    for dag_id, run_id in [("sparse_to_dense", "manual__2026-12-02T21:25:46.123456+00:00"),
                           ("sparse_to_dense", "manual__2026-12-02T21:40:01+00:00"),
                           ("sparse_to_dense__nightly", "scheduled__2026-12-03T00:00:00+00:00"),
                           ("sparse_to_dense", "asset_triggered__2026-12-03T01:02:03+00:00"),
                           ("sparse_to_dense", "my-own-id")]:
        monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", dag_id)
        monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", run_id)
        names.add(workflow.parent_name(cfg, "/runs/x"))
    assert names == {"tiny · 12-02 21:25:46 manual", "tiny · 12-02 21:40:01 manual", "tiny · 12-03 00:00:00 scheduled nightly",
                     "tiny · 12-03 01:02:03 asset", "tiny · my-own-id"}
    assert len({n[:20] for n in names}) == len(names)  # apart within the first 20 characters


def test_unequal_baseline_budget_is_said_loudly(small_cfg, capsys):
    """The baseline's steps equal the workflow's student steps unless set; set apart, the plan and the
    headline say the comparison is not at equal budgets."""
    assert workflow.budget_mismatch(small_cfg()) is None  # unset: equal
    cfg = small_cfg("direct_grpo.steps=2")  # the workflow's student steps: 3 + 3 + 2
    said = workflow.budget_mismatch(cfg)
    assert said.startswith("WARNING: NOT AN EQUAL-BUDGET COMPARISON: direct GRPO trained 2 steps, the workflow's student 8")
    assert "favours the workflow" in said
    assert workflow.budget_mismatch(small_cfg("direct_grpo.steps=2", "workflow.baseline=false")) is None

    def manifest(steps, avg):
        return {"metrics": {"eval.avg@2": avg}, "student_steps": steps, "labeled_examples": 0, "wall_time_s": 1.0}

    results = {"kl_warmup": manifest(3, 0.1), "onpolicy_distill": manifest(3, 0.2), "student_rl": manifest(2, 0.3),
               "direct_grpo": manifest(2, 0.25)}
    summary = workflow.summarize(cfg, results, "root/student_rl/model", "root/bootstrap/teacher")
    assert summary["headline"]["equal_budgets"] is False
    text = workflow.format_table(summary)
    assert "(8 student steps) vs direct GRPO 0.250 (2 steps)\nWARNING: NOT AN EQUAL-BUDGET COMPARISON" in text, text
    results["direct_grpo"] = manifest(8, 0.25)
    summary = workflow.summarize(small_cfg(), results, "root/student_rl/model", "root/bootstrap/teacher")
    assert summary["headline"]["equal_budgets"] is True and "WARNING" not in workflow.format_table(summary)
