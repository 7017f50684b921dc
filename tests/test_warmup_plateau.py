"""Issue 27 item 2: stage 2a warms up until C2 stops improving (``kl_warmup.c2_patience``) or reaches its target,
and stage 2b takes the steps it left unused (``onpolicy_distill.take_unused_warmup``), so the student's total
stays the configured one.

    python -m pytest tests/test_warmup_plateau.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import artifacts
from stages.config import ConfigError, load_config
from stages.recipes.kl_warmup import c2_stop
from stages.recipes.onpolicy_distill import unused_warmup_steps


def _decide(seq, before=1.0, target=None, patience=None, min_delta=0.02, state=None):
    """The stop reason after each measurement of ``seq``, stopping at the first one that stops."""
    state = {"c2_best": before, "c2_stale": 0} if state is None else state
    out = []
    for c2 in seq:
        out.append(c2_stop(state, c2, target, patience, min_delta))
        if out[-1]:
            break
    return out, state


def test_target_stops_when_c2_falls_below_it():
    reasons, _ = _decide([0.5, 0.3, 0.05, 0.01], target=0.1)
    assert reasons == [None, None, "c2_target"]
    # the target wins over a plateau at the same measurement
    assert _decide([0.05], target=0.1, patience=1, min_delta=0.99)[0] == ["c2_target"]


def test_plateau_stops_after_patience_measurements_without_improvement():
    # 0.395 and 0.393 are within 2% of the best 0.4; 0.41 is worse: three in a row
    reasons, state = _decide([0.6, 0.4, 0.395, 0.393, 0.41, 0.1], patience=3)
    assert reasons == [None, None, None, None, "c2_plateau"]
    assert state == {"c2_best": 0.4, "c2_stale": 3}
    # no improvement at all from the value before training: stops after `patience` measurements
    assert _decide([1.0, 1.01, 0.99], patience=2)[0] == [None, "c2_plateau"]


def test_noise_around_a_decline_does_not_stop_it():
    noisy = [0.8, 0.85, 0.7, 0.75, 0.6, 0.62, 0.5, 0.52, 0.4]
    assert _decide(noisy, patience=2)[0] == [None] * len(noisy)
    assert _decide(noisy, patience=1)[0] == [None, "c2_plateau"]  # patience 1 stops at the first bump
    # a slow steady decline, each step under min_delta, adds up to an improvement on the best
    slow = [1.0 - 0.015 * i for i in range(1, 20)]
    assert _decide(slow, patience=2)[0] == [None] * len(slow)
    # neither criterion set: never stops
    assert _decide([1.0] * 10)[0] == [None] * 10


def test_negative_sampled_estimates_improve_downwards():
    # the sampled-token C2 estimate can be negative: improvement is relative to |best|
    assert _decide([-0.2, -0.21, -0.5], before=-0.1, patience=2)[0] == [None, None, None]
    assert _decide([-0.2, -0.2, -0.2], before=-0.1, patience=2)[0] == [None, None, "c2_plateau"]


@pytest.mark.parametrize("cut", range(1, 10))
def test_a_resumed_run_decides_as_the_uninterrupted_one(cut):
    """The state goes through the trainer's resume state as JSON: cut anywhere, the decisions are the same."""
    seq = [0.9, 0.7, 0.69, 0.71, 0.5, 0.495, 0.5, 0.51, 0.6]
    straight, _ = _decide(seq, patience=3)
    first, state = _decide(seq[:cut], patience=3)
    if first[-1] is None:  # not stopped before the cut: resume from the saved state
        rest, _ = _decide(seq[cut:], patience=3, state=json.loads(json.dumps(state)))
        first += rest
    assert first == straight == [None] * 7 + ["c2_plateau"]


@pytest.mark.parametrize("bad, key", [("kl_warmup.c2_patience=0", "kl_warmup.c2_patience"),
                                      ("kl_warmup.c2_patience=-2", "kl_warmup.c2_patience"),
                                      ("kl_warmup.c2_min_delta=-0.1", "kl_warmup.c2_min_delta"),
                                      ("kl_warmup.c2_min_delta=1", "kl_warmup.c2_min_delta"),
                                      ("onpolicy_distill.take_unused_warmup=maybe", "onpolicy_distill.take_unused_warmup")])
def test_bad_values_are_one_line_config_errors(bad, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [bad])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_take_unused_warmup_without_a_warmup_is_a_no_op():
    # the no-warmup ablation (a switch) keeps a preset's option: there is simply nothing unused to take
    cfg = load_config("tiny", ["workflow.stages=[teacher_rl,onpolicy_distill,student_rl]",
                               "onpolicy_distill.take_unused_warmup=true"])
    assert cfg.student_step_budget() == cfg.onpolicy_distill.steps + cfg.student_rl.steps


def test_the_options_enter_the_stage_hash_only_when_on(monkeypatch):
    import stages.config as config

    base = load_config("tiny")
    seen = []
    real = json.dumps
    monkeypatch.setattr(config.json, "dumps", lambda obj, **kw: seen.append(obj) or real(obj, **kw))
    base.stage_hash("kl_warmup", {"t": "x"})
    base.stage_hash("onpolicy_distill", {"t": "x"})
    monkeypatch.undo()
    # off, they are not hashed at all: stages published before they existed are not rerun by the upgrade
    assert len(seen) == 2 and not {"c2_patience", "c2_min_delta"} & set(seen[0]["own"])
    assert "take_unused_warmup" not in seen[1]["own"]

    def h(stage, *sets):
        return load_config("tiny", list(sets)).stage_hash(stage, {"t": "x"})

    assert h("kl_warmup", "kl_warmup.c2_min_delta=0.3") == h("kl_warmup")  # no effect without patience
    assert h("kl_warmup", "kl_warmup.c2_patience=2") != h("kl_warmup")
    assert h("kl_warmup", "kl_warmup.c2_patience=2", "kl_warmup.c2_min_delta=0.3") != h("kl_warmup", "kl_warmup.c2_patience=2")
    assert h("onpolicy_distill", "onpolicy_distill.take_unused_warmup=true") != h("onpolicy_distill")


def _published(tmp_path, name, manifest) -> str:
    work = tmp_path / f"work-{name}"
    (work / "model").mkdir(parents=True)
    (work / "model" / "w.bin").write_bytes(b"w")
    uri = str(tmp_path / name)
    artifacts.publish(work, uri, manifest)
    return f"{uri}/model"


def test_unused_warmup_steps_read_from_the_input_manifest(tmp_path):
    warm = {"stage": "kl_warmup", "steps": 7, "student_steps": 7, "stopped_early": True}
    assert unused_warmup_steps(_published(tmp_path, "a", {**warm, "max_steps": 30}), configured=50) == 23
    # a manifest from before max_steps was recorded: this config's kl_warmup.steps
    assert unused_warmup_steps(_published(tmp_path, "b", warm), configured=50) == 43
    full = {**warm, "steps": 30, "student_steps": 30, "stopped_early": False, "max_steps": 30}
    assert unused_warmup_steps(_published(tmp_path, "c", full), configured=50) == 0
    # not a warmup's output: the base student, a plain folder, a hub id
    assert unused_warmup_steps(_published(tmp_path, "d", {"stage": "bootstrap", "student_steps": 0}), 50) == 0
    assert unused_warmup_steps(str(tmp_path / "nothing"), 50) == 0
    assert unused_warmup_steps("org/model", 50) == 0


# ------------------------------------------------------------------------------------ real training


def test_plateaued_warmup_stops_early_and_distillation_takes_its_steps(small_cfg, tmp_path):
    """A learning rate of ~0 keeps C2 flat: 2a with patience 1 stops after its first measurement; 2b with
    take_unused_warmup runs its steps plus the 3 left unused (the student's total stays 4 + 1), a rerun skips,
    a 2a that ends differently reruns 2b; without the option 2b keeps its step."""
    from stages.recipes import bootstrap, kl_warmup, onpolicy_distill
    from stages.runtime import StageRun

    root = str(tmp_path / "root")
    bootstrap.main(StageRun("bootstrap", small_cfg(), root))
    t, s = f"{root}/bootstrap/teacher", f"{root}/bootstrap/student"
    warm = ["kl_warmup.steps=4", "kl_warmup.c2_every=1", "kl_warmup.c2_patience=1", "kl_warmup.c2_min_delta=0.5",
            "kl_warmup.optim.lr=1e-12", "kl_warmup.prompts_per_step=4", "onpolicy_distill.steps=1",
            "onpolicy_distill.prompts_per_step=4", "onpolicy_distill.optim.warmup_steps=4", "checkpoint_every=100"]
    cfg = small_cfg(*warm, "onpolicy_distill.take_unused_warmup=true")

    a = kl_warmup.main(StageRun("kl_warmup", cfg, root, inputs={"teacher": t, "student": s}), t, s)
    assert (a["steps"], a["max_steps"], a["stopped_early"], a["stop_reason"]) == (1, 4, True, "c2_plateau")
    w = f"{root}/kl_warmup/model"
    inputs = {"teacher": t, "student": w}
    b = onpolicy_distill.main(StageRun("onpolicy_distill", cfg, root, inputs=inputs), t, w)
    assert (b["steps"], b["student_steps"], b["unused_warmup_steps"]) == (4, 4, 3)
    assert a["student_steps"] + b["student_steps"] == cfg.kl_warmup.steps + cfg.onpolicy_distill.steps
    hist = [json.loads(r) for r in (Path(root) / "onpolicy_distill/metrics.jsonl").read_text().splitlines()]
    lr = cfg.onpolicy_distill.optim.lr
    assert [h["lr"] for h in hist] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])  # the schedule runs over all 4
    assert StageRun("onpolicy_distill", cfg, root, inputs=inputs).finished == b  # the same again: skipped

    # 2a ends otherwise (patience 2: 2 steps): its manifest, in 2b's input digest, reruns 2b with 2 more steps
    cfg2 = small_cfg(*warm, "kl_warmup.c2_patience=2", "onpolicy_distill.take_unused_warmup=true")
    a2 = kl_warmup.main(StageRun("kl_warmup", cfg2, root, inputs={"teacher": t, "student": s}), t, s)
    assert (a2["steps"], a2["stop_reason"]) == (2, "c2_plateau")
    assert StageRun("onpolicy_distill", cfg2, root, inputs=inputs).finished is None
    assert unused_warmup_steps(w, cfg2.kl_warmup.steps) == 2

    # without the option 2b keeps its configured step
    plain = small_cfg(*warm, "kl_warmup.c2_patience=2")
    c = onpolicy_distill.main(StageRun("onpolicy_distill", plain, root, inputs=inputs), t, w)
    assert (c["steps"], c["student_steps"], c["unused_warmup_steps"]) == (1, 1, 0)


def test_the_workflow_keeps_equal_student_budgets_when_2a_stops_early(small_cfg, tmp_path):
    """Through the workflow: 2a stops after 1 of its 4 steps, 2b does 1 + 3, so the student's steps (1 + 4 + 2)
    equal direct GRPO's (the configured 4 + 1 + 2) and the headline says the budgets are equal."""
    from stages import workflow

    cfg = small_cfg("kl_warmup.steps=4", "kl_warmup.c2_every=1", "kl_warmup.c2_patience=1", "kl_warmup.c2_min_delta=0.5",
                    "kl_warmup.optim.lr=1e-12", "onpolicy_distill.steps=1", "onpolicy_distill.take_unused_warmup=true",
                    "promote.enabled=false")
    root = str(tmp_path / "run")
    h = workflow.run(cfg, root)["headline"]
    steps = {s: artifacts.read_manifest(f"{root}/{s}")["student_steps"] for s in ("kl_warmup", "onpolicy_distill")}
    assert steps == {"kl_warmup": 1, "onpolicy_distill": 4}
    assert h["workflow_student_steps"] == h["direct_grpo_steps"] == cfg.student_step_budget() == 4 + 1 + 2
    assert h["equal_budgets"] is True
    assert workflow.all_published(cfg, root)  # a rerun skips every stage
