import os

import pytest

from stages.config import load_config

# Small, fast settings shared by the tests that train for real.
TEST_OVERRIDES = [
    "tracking.enabled=false",
    "task.sizes={bootstrap: 2000, teacher_rl: 200, prompts: 400, student_rl: 200, eval: 40}",
    "models.teacher.arch={hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 128}",
    "models.student.arch={hidden_size: 32, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 64}",
    "bootstrap.teacher_steps=4",
    "bootstrap.student_steps=4",
    "bootstrap.batch_size=16",
    "teacher_rl.steps=4",
    "teacher_rl.prompts_per_step=4",
    "teacher_rl.group_size=4",
    "kl_warmup.steps=3",
    "kl_warmup.prompts_per_step=8",
    "kl_warmup.c2_every=2",
    "onpolicy_distill.steps=3",
    "onpolicy_distill.prompts_per_step=8",
    "student_rl.steps=2",
    "student_rl.prompts_per_step=4",
    "student_rl.group_size=4",
    "direct_grpo.prompts_per_step=4",
    "direct_grpo.group_size=4",
    "eval.problems=8",
    "eval.samples=2",
    "eval.c2_prompts=8",
    "checkpoint_every=2",
]


@pytest.fixture
def small_cfg():
    def make(*extra):
        return load_config("tiny", TEST_OVERRIDES + list(extra))
    return make


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # MLflow, when a test turns it on, writes to a store inside the test's own folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    os.environ.setdefault("TQDM_DISABLE", "1")
