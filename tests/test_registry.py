"""The stage table is the one place that says what a stage is: everything else follows it."""

import pytest

from stages import registry, workflow
from stages.cli import COMMANDS
from stages.config import Workflow, load_config


def test_every_stage_has_a_module_command_and_config_section():
    cfg = load_config("tiny")
    for name, st in registry.STAGES.items():
        assert callable(st.fn()), name
        assert name in COMMANDS
        assert st.kind in ("setup", "data", "workflow", "baseline", "gate", "tool")
        if st.kind in ("workflow", "baseline"):
            assert hasattr(cfg, name), f"config has no section for {name}"
            assert st.label and st.trains
        assert set(st.inputs.values()) <= {"teacher", "student", "base_student", "final_student", "teacher_data",
                                           "baseline_student", "champion"}
    assert Workflow().stages == list(registry.WORKFLOW)


def test_plan_follows_the_table(tmp_path):
    cfg = load_config("tiny")
    root = str(tmp_path)
    steps = workflow.plan(cfg, root)
    # the tiny preset's base models come from bootstrap: import and prune (other sources) are not planned
    assert [s["stage"] for s in steps] == [n for n in registry.RUNNABLE if registry.STAGES[n].kind != "data"
                                           and n not in ("import", "prune")]
    # each workflow stage's output becomes the next stage's input of that role
    by = {s["stage"]: s["inputs"] for s in steps}
    assert by["kl_warmup"] == {"teacher": f"{root}/teacher_rl/model", "student": f"{root}/bootstrap/student"}
    assert by["direct_grpo"] == {"policy": f"{root}/bootstrap/student"}
    assert workflow.final_models(cfg, root) == {"teacher": f"{root}/teacher_rl/model",
                                                "final_student": f"{root}/student_rl/model"}
    # an ablation passes the input through: no stage 1 means the raw teacher
    raw = load_config("tiny", ["workflow.stages=[kl_warmup,onpolicy_distill,student_rl]"])
    assert workflow.plan(raw, root)[1]["inputs"]["teacher"] == f"{root}/bootstrap/teacher"
    # a data stage is planned for the consumer that reads it: kl_warmup.form topk trains from teacher_data
    topk = {s["stage"]: s["inputs"] for s in workflow.plan(load_config("tiny", ["kl_warmup.form=topk"]), root)}
    assert list(topk)[2:4] == ["teacher_data", "kl_warmup"]
    assert topk["kl_warmup"]["teacher_data"] == f"{root}/teacher_data/data"


def test_direct_grpo_budget_is_resolved_once():
    cfg = load_config("tiny")
    want = sum(getattr(cfg, n).steps for n in registry.WORKFLOW if registry.STAGES[n].trains == "student")
    assert cfg.steps("direct_grpo") == cfg.student_step_budget() == want
    no3 = load_config("tiny", ["workflow.stages=[teacher_rl,kl_warmup,onpolicy_distill]"])
    assert no3.steps("direct_grpo") == cfg.kl_warmup.steps + cfg.onpolicy_distill.steps
    assert cfg.stage_hash("direct_grpo", {}) != no3.stage_hash("direct_grpo", {})


def test_explicit_inputs_map_to_roles(tmp_path):
    cfg = load_config("tiny")
    root = str(tmp_path)
    got = workflow.stage_inputs(cfg, root, "teacher_rl", {"teacher": "org/teacher", "student": "org/student"})
    assert got == {"policy": "org/teacher"}
    got = workflow.stage_inputs(cfg, root, "direct_grpo", {"student": "org/student"})
    assert got == {"policy": "org/student"}
    assert workflow.stage_inputs(cfg, root, "evaluate") == {"model": f"{root}/student_rl/model"}
    assert workflow.stage_inputs(cfg, root, "evaluate", {"final_student": "x/y"}) == {"model": "x/y"}
    # the gate reads the final student and the baseline's model (the champion comes from the registry)
    assert workflow.stage_inputs(cfg, root, "promote") == {"model": f"{root}/student_rl/model",
                                                           "baseline": f"{root}/direct_grpo/model"}
    no_baseline = load_config("tiny", ["workflow.baseline=false"])
    assert workflow.stage_inputs(no_baseline, root, "promote") == {"model": f"{root}/student_rl/model"}


def test_dag_stage_tasks_are_the_table(monkeypatch):
    pytest.importorskip("airflow", reason="needs the 'airflow' extra")
    from test_dag import load_dag

    dag = load_dag(monkeypatch)
    stage_tasks = [t for t in dag.task_ids if t in registry.STAGES]
    assert sorted(stage_tasks) == sorted(registry.RUNNABLE + registry.GATES)  # the gates: after the report
    form_stages = dag.params.get_param("stages").schema["items"]["enum"]
    assert list(form_stages) == list(registry.WORKFLOW)
    # the workflow stages run in the table's order
    for a, b in zip(registry.WORKFLOW, registry.WORKFLOW[1:]):
        assert a in dag.task_dict[b].get_flat_relative_ids(upstream=True)
