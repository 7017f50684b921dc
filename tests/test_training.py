"""Real training steps: GRPO raises reward; stages publish atomically; a killed stage resumes to the
same result as an uninterrupted run; a finished stage is skipped."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import artifacts, storage
from stages.config import TinyArch
from stages.models import char_tokenizer, save, tiny_qwen3
from stages.recipes import bootstrap, grpo
from stages.runtime import StageRun

REPO = Path(__file__).resolve().parents[1]


def test_grpo_steps_raise_reward_on_an_easy_task(small_cfg, tmp_path):
    tok = char_tokenizer()
    base = tmp_path / "base"
    save(tiny_qwen3(TinyArch(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64), tok, seed=0), tok, base)
    cfg = small_cfg("task.kind=digit_task:make_task", "teacher_rl.steps=12", "teacher_rl.prompts_per_step=16",
                    "teacher_rl.group_size=8", "teacher_rl.optim.lr=0.01", "sampling.max_new_tokens=2",
                    "eval.problems=40", "eval.samples=8", "eval.greedy=false", "checkpoint_every=100")
    run = StageRun("teacher_rl", cfg, str(tmp_path / "root"), inputs={"policy": str(base)})
    m = grpo.main(run, str(base))
    before, after = m["metrics"]["eval_before.avg@8"], m["metrics"]["eval.avg@8"]
    # at init about 10% of completions start with a digit (10 of 100 tokens); 12 steps take it far higher
    assert before < 0.3
    assert after > before + 0.3, (before, after)
    assert m["metrics"]["c1_reward_lift"] == pytest.approx(after - before)
    rows = (tmp_path / "root/teacher_rl/metrics.jsonl").read_text().splitlines()
    assert len(rows) == 12 and json.loads(rows[-1])["reward"] > json.loads(rows[0])["reward"]
    assert m["labeled_examples"] == 12 * 16  # distinct labeled problems consumed (200 available)


@pytest.fixture
def boot_root(small_cfg, tmp_path):
    root = str(tmp_path / "root")
    bootstrap.main(StageRun("bootstrap", small_cfg(), root))
    return root


def test_publish_is_atomic_and_reads_verify_checksums(boot_root, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    for i in range(3):
        (work / "model" / f"f{i}.bin").write_bytes(os.urandom(1000))
    stage_uri = f"{boot_root}/demo"
    calls = {"n": 0}
    real_put = storage.LocalStore.put_file

    def failing_put(self, local, uri):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk went away")
        real_put(self, local, uri)

    monkeypatch.setattr(storage.LocalStore, "put_file", failing_put)
    with pytest.raises(OSError):
        artifacts.publish(work, stage_uri, {"stage": "demo"})
    assert artifacts.read_manifest(stage_uri) is None  # half-written: no manifest, never read
    with pytest.raises(storage.ArtifactError, match="no manifest"):
        artifacts.fetch(f"{stage_uri}/model")
    monkeypatch.setattr(storage.LocalStore, "put_file", real_put)
    artifacts.publish(work, stage_uri, {"stage": "demo"})  # the retry completes
    assert artifacts.fetch(f"{stage_uri}/model") == Path(stage_uri) / "model"
    # a corrupted file is caught by the reader
    (Path(stage_uri) / "model" / "f1.bin").write_bytes(b"tampered")
    with pytest.raises(storage.ArtifactError, match="checksum mismatch"):
        artifacts.fetch(f"{stage_uri}/model")


def test_finished_stage_is_skipped_and_changed_config_reruns(boot_root, small_cfg):
    assert StageRun("bootstrap", small_cfg(), boot_root).finished is not None
    assert StageRun("bootstrap", small_cfg("bootstrap.noise=0.1"), boot_root).finished is None
    teacher = f"{boot_root}/bootstrap/teacher"
    m = grpo.main(StageRun("teacher_rl", small_cfg(), boot_root, inputs={"policy": teacher}), teacher)
    again = StageRun("teacher_rl", small_cfg(), boot_root, inputs={"policy": teacher})
    assert again.finished == m
    assert not (Path(boot_root) / "teacher_rl" / "_resume").exists()  # state is cleared once published


def _stage_cmd(root, *extra):
    return [sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", root,
            *[a for o in _overrides(*extra) for a in ("--set", o)]]


def _overrides(*extra):
    from conftest import TEST_OVERRIDES

    return TEST_OVERRIDES + ["torch_threads=1", "teacher_rl.steps=8", "checkpoint_every=2", *extra]


def _weights(root):
    return load_file(str(Path(root) / "teacher_rl" / "model" / "model.safetensors"))


def test_killed_stage_resumes_to_the_same_result(boot_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    # reference: the same stage, uninterrupted, in a copy of the root
    ref_root = str(tmp_path / "ref")
    subprocess.run(["cp", "-r", boot_root, ref_root], check=True)
    subprocess.run(_stage_cmd(ref_root), env=env, check=True, capture_output=True, timeout=300)

    latest = Path(boot_root) / "teacher_rl" / "_resume" / "policy" / "latest.json"
    proc = subprocess.Popen(_stage_cmd(boot_root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= 4):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up, like a preempted pod
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 4 <= killed_at < 8
    assert artifacts.read_manifest(f"{boot_root}/teacher_rl") is None

    out = subprocess.run(_stage_cmd(boot_root), env=env, check=True, capture_output=True, text=True, timeout=300)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["skipped"] is False
    manifest = artifacts.read_manifest(f"{boot_root}/teacher_rl")
    assert manifest["steps"] == 8
    history = [json.loads(r) for r in (Path(boot_root) / "teacher_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 9))
    # bit-identical to the uninterrupted run: resuming does not silently change results
    a, b = _weights(boot_root), _weights(ref_root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rollouts = (Path(boot_root) / "teacher_rl" / "rollouts.jsonl").read_text()
    assert rollouts == (Path(ref_root) / "teacher_rl" / "rollouts.jsonl").read_text()
    # and a third run is a no-op
    out = subprocess.run(_stage_cmd(boot_root), env=env, check=True, capture_output=True, text=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1])["skipped"] is True


def test_onpolicy_distill_with_inf_and_sentinel_teacher_logprobs_publishes_finite_numbers(boot_root, small_cfg, monkeypatch):
    """Issue 23 item 13, through the real stage: a teacher that answers -inf and vLLM's -9999 for some
    sampled tokens neither fails the stage (an inf loss would, on every retry) nor dominates it: the values
    are floored (losses.floor_teacher_logp), counted in the metrics and the manifest, and every number
    published is finite."""
    from stages.recipes import onpolicy_distill
    from stages.teacher import LocalTeacher

    real = LocalTeacher.logprobs

    def broken(self, ro):
        out = real(self, ro).clone()
        comp = ro.completion.bool()
        rows, cols = comp.nonzero(as_tuple=True)
        out[rows[::3], cols[::3]] = -torch.inf  # every third completion token: -inf
        out[rows[1::3], cols[1::3]] = -9999.0  # and the server's sentinel
        return out

    monkeypatch.setattr(LocalTeacher, "logprobs", broken)
    t, s = f"{boot_root}/bootstrap/teacher", f"{boot_root}/bootstrap/student"
    run = StageRun(
        "onpolicy_distill",
        small_cfg("onpolicy_distill.steps=2", "onpolicy_distill.form=sampled"),
        boot_root,
        inputs={"teacher": t, "student": s},
    )
    m = onpolicy_distill.main(run, t, s)
    history = [json.loads(r) for r in (Path(boot_root) / "onpolicy_distill" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["teacher_floored"] > 0 for h in history)
    assert all(v is not None for h in history for v in h.values()), history  # null = a non-finite number
    assert m["teacher_logp_floored"] == sum(h["teacher_floored"] for h in history)
    assert all(abs(h["kl"]) < -math.log(1e-8) + 10 and math.isfinite(h["loss"]) for h in history)


def test_distillation_stages_run_under_bf16_autocast(boot_root, small_cfg):
    """``autocast: bfloat16``: 2a token_kl and 2b form full train and publish with finite losses; the C2 and the
    losses stay close to the same steps in fp32 (bf16 matmuls, float32 log-softmax)."""
    from stages.recipes import kl_warmup, onpolicy_distill

    root = Path(boot_root).parent
    teacher, student = f"{boot_root}/bootstrap/teacher", f"{boot_root}/bootstrap/student"
    out = {}
    for mode in ("none", "bfloat16"):
        cfg = small_cfg(f"autocast={mode}", "kl_warmup.steps=1", "onpolicy_distill.steps=1", "onpolicy_distill.form=full",
                        "checkpoint_every=100")
        r = str(root / f"r-{mode}")
        a = kl_warmup.main(StageRun("kl_warmup", cfg, r), teacher, student)
        onpolicy_distill.main(StageRun("onpolicy_distill", cfg, r), teacher, student)
        hist = [json.loads(line) for line in (Path(r) / "onpolicy_distill/metrics.jsonl").read_text().splitlines()]
        out[mode] = (a["metrics"]["c2_before"], hist[0]["loss"])
        assert all(torch.isfinite(torch.tensor(v)) for v in out[mode])
    assert out["bfloat16"][0] == pytest.approx(out["none"][0], rel=0.05)
    assert out["bfloat16"][1] == pytest.approx(out["none"][1], rel=0.05)
