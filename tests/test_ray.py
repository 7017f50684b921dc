"""A stage as a Ray Train job (stages/ray_train.py) on a real local Ray cluster: a head and a second raylet
on this machine (``ray start``, random ports, one CPU each, so the two workers land on two "nodes"), gloo.

Checks, in one run: killing the worker on the second node mid-stage makes Ray restart the group and the
stage resume from its resume state and publish; the result is the single-process one for the same global
batch (float tolerance); one MLflow child run; the published checkpoint loads with from_pretrained.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import TEST_OVERRIDES, free_port
from safetensors.torch import load_file

from stages import ray_train
from stages.recipes import bootstrap
from stages.runtime import StageRun

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# token authentication, as Ray's own default for a new cluster, with this module's token (never ~/.ray's)
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
SETS = ["torch_threads=1", "teacher_rl.steps=4", "tracking.enabled=true", "tracking.experiment=ray-test"]


# ------------------------------------------------------------------ settings (no cluster)
def test_engine_setting_selects_ray_for_stage_commands_only():
    assert ray_train.wanted(["teacher_rl"], {"S2D_ENGINE": "ray"})
    assert not ray_train.wanted(["teacher_rl"], {})
    assert not ray_train.wanted(["plan"], {"S2D_ENGINE": "ray"}) and not ray_train.wanted(["workflow"], {"S2D_ENGINE": "ray"})
    assert not ray_train.wanted(["teacher_rl"], {"S2D_ENGINE": "ray", ray_train.INSIDE: "1"})  # inside a worker
    with pytest.raises(SystemExit, match="S2D_ENGINE"):
        ray_train.wanted(["teacher_rl"], {"S2D_ENGINE": "rey"})
    assert ray_train.scaling({"S2D_RAY_WORKERS": "4"}, "cuda") == {
        "num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}
    assert ray_train.scaling({}, "cpu") == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}}
    with pytest.raises(SystemExit, match="S2D_RAY_WORKERS"):
        ray_train.scaling({"S2D_RAY_WORKERS": "0"}, "cpu")
    env = {"S2D_RAY_WORKERS": "2", "MLFLOW_TRACKING_URI": "http://m", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "a",
           "MLFLOW_TRACKING_PASSWORD": "p", "HF_TOKEN": "t", "AWS_ENDPOINT_URL": "http://s3", "HOME": "/root"}
    assert ray_train.forwarded_env(env) == {"S2D_RAY_WORKERS": "2", "MLFLOW_TRACKING_URI": "http://m", "AWS_ENDPOINT_URL": "http://s3"}


def test_worker_keeps_the_stage_commands_error_line_for_the_driver():
    import io

    out = io.StringIO()
    err = ray_train._ErrorLine(out)
    print("progress", file=err)
    err.write("error: policy x does not ")
    err.write("exist\nafter\n")
    assert err.error == "error: policy x does not exist" and out.getvalue() == "progress\nerror: policy x does not exist\nafter\n"


def test_bad_config_is_a_one_line_error_before_ray_starts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "S2D_ENGINE": "ray", "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there
    out = subprocess.run([sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", str(tmp_path),
                          "--set", "teacher_rl.stepz=3"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "teacher_rl.stepz" in out.stderr
    assert "Ray Train" not in out.stderr


# ------------------------------------------------------------------ a local two-node cluster
def _ray_ports() -> list[str]:
    lo = free_port() // 100 * 100  # a worker port range next to a free port (checked by Ray at start)
    lo = min(max(lo, 20000), 60000)
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--min-worker-port", str(lo), "--max-worker-port", str(lo + 99)]


def _wait_port(ip: str, port: int, proc, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head not listening on {port}")


@pytest.fixture(scope="module")
def cluster():
    """Head + second raylet, one CPU each; both stopped (their whole process groups) at teardown. Both on
    this machine's address: Ray rewrites 127.0.0.1 in a cluster address to it anyway."""
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short path: Ray's unix sockets live below it
    port = free_port()
    env = {**os.environ, **AUTH, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 << 20),
              "--node-ip-address", ip, "--disable-usage-stats"]
    procs, logs = [], [Path(temp) / "head.log", Path(temp) / "node2.log"]
    try:
        with open(logs[0], "w") as log:
            procs.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--head",
                        "--port",
                        str(port),
                        "--include-dashboard",
                        "false",
                        "--ray-client-server-port",
                        str(free_port()),
                        "--temp-dir",
                        temp,
                        *common,
                        *_ray_ports(),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait_port(ip, port, procs[0], logs[0])
        with open(logs[1], "w") as log:
            procs.append(subprocess.Popen([RAY, "start", "--address", f"{ip}:{port}", *common, *_ray_ports()],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield {"address": f"{ip}:{port}", "second": procs[1], "logs": logs}
    finally:
        import psutil

        # every process of both nodes (ray start, raylet, GCS, agents, workers), found before any is stopped
        ours = [psutil.Process(p.pid) for p in procs if p.poll() is None]
        ours += [c for p in ours for c in p.children(recursive=True)]
        for p in reversed(procs):  # `ray start --block` stops its node's processes on SIGTERM
            p.terminate()
        gone, alive = psutil.wait_procs(ours, timeout=5)
        for p in alive:  # Ray's drain timed out: stop what is left, by process id
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    """Bootstrapped models, and the single-process teacher_rl on them: the reference."""
    from stages.config import load_config

    base = tmp_path_factory.mktemp("ray")
    root = str(base / "boot")
    os.environ.setdefault("TQDM_DISABLE", "1")
    bootstrap.main(StageRun("bootstrap", load_config("tiny", TEST_OVERRIDES + ["tracking.enabled=false"]), root))
    ref = str(base / "ref")
    shutil.copytree(root, ref)
    out = subprocess.run(_cmd(ref), env=_env(base / "ref-mlflow.db"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"base": base, "boot": root, "ref": ref}


def _cmd(root: str) -> list[str]:
    return [sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", root,
            *[a for o in TEST_OVERRIDES + SETS for a in ("--set", o)]]


def _env(db: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_DEDUP_LOGS": "0", **AUTH, **extra}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "S2D_GPUS", ray_train.INSIDE):
        env.pop(k, None)
    return env


def _ray_env(cluster, db: Path) -> dict:
    return _env(db, S2D_ENGINE="ray", S2D_RAY_WORKERS="2", S2D_RAY_MAX_FAILURES="2", RAY_ADDRESS=cluster["address"],
                S2D_RAY_STORAGE=str(db.parent / "ray_results"))


def _weights(root: str) -> dict:
    return load_file(str(Path(root) / "teacher_rl" / "model" / "model.safetensors"))


def _same_as_reference(root: str, ref: str) -> None:
    a, b = _weights(root), _weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (Path(root) / "teacher_rl/rollouts.jsonl").read_text() == (Path(ref) / "teacher_rl/rollouts.jsonl").read_text()
    hist = [json.loads(r) for r in (Path(root) / "teacher_rl/metrics.jsonl").read_text().splitlines()]
    ref_hist = [json.loads(r) for r in (Path(ref) / "teacher_rl/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, 5))
    for h, r in zip(hist, ref_hist):
        assert h["reward"] == r["reward"] and h["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-6)


def _child_runs(db: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ray-test")
    return client.search_runs([exp.experiment_id], "tags.`s2d.stage` = 'teacher_rl'")


def _worker_pids(logs: str, rank: int) -> set[str]:
    """Processes that ran ``rank`` (each worker announces itself; Ray may repeat a line through its logger)."""
    return set(re.findall(rf"ray train worker rank {rank}/2 pid (\d+)", logs))


def _node_workers(proc) -> list:
    import psutil

    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in " ".join(c.cmdline())]


def test_stage_on_two_ray_workers_survives_a_lost_worker_and_matches_one_process(cluster, boot):
    """One run (to keep the suite short) checks both: the worker on the second node is SIGKILLed after the
    first resume state; Ray restarts the group, the stage resumes and publishes, and the result is the
    single-process one for the same global batch."""
    root = str(boot["base"] / "two")
    shutil.copytree(boot["boot"], root)
    db = boot["base"] / "two-mlflow.db"
    latest = Path(root) / "teacher_rl/_resume/policy/latest.json"
    proc = subprocess.Popen(_cmd(root), env=_ray_env(cluster, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not latest.exists():
            time.sleep(0.05)
        assert latest.exists(), "no resume state was written"
        victims = _node_workers(cluster["second"])
        assert len(victims) == 1  # one CPU per node, one CPU per worker: one worker on each node
        victims[0].send_signal(signal.SIGKILL)  # a lost node's worker: no clean-up
        killed_at = json.loads(latest.read_text())["step"]
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    logs = stdout + stderr
    assert "running teacher_rl on 2 Ray Train workers" in stderr
    assert killed_at == 2  # checkpoint_every=2, 4 steps: the one state before the end
    assert len(_worker_pids(logs, 0)) >= 2 and len(_worker_pids(logs, 1)) >= 2  # the group was started again
    assert f"teacher_rl: resumed policy from step {killed_at}" in logs  # from the state, not from scratch
    summary = json.loads(stdout.strip().splitlines()[-1])  # the contract: last stdout line, rank 0's
    assert summary["skipped"] is False and summary["uri"] == f"{root}/teacher_rl"
    _same_as_reference(root, boot["ref"])  # = one process on the same global batch; resuming changed nothing
    assert not (Path(root) / "teacher_rl/_resume").exists()
    # rank 0 alone publishes and tracks: one child run (the resumed stage reopened it), with the manifest's id
    runs = _child_runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == summary["mlflow_run_id"]
    # the published checkpoint is a plain Hugging Face folder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["outputs"]["model"])
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], _weights(root)["model.embed_tokens.weight"])


def test_missing_input_under_ray_is_a_one_line_error_not_retried(cluster, tmp_path):
    out = subprocess.run([*_cmd(str(tmp_path / "root")), "--teacher", str(tmp_path / "nope")],
                         env=_ray_env(cluster, tmp_path / "mlflow.db"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    # the driver's own line (Ray's forwarded actor logs may still trail it)
    assert f"error: policy {tmp_path / 'nope'} does not exist (has the stage that writes it finished?)" in out.stderr.splitlines()
    assert len(_worker_pids(out.stderr, 1)) == 1  # final: the group was not restarted
    assert not (tmp_path / "root").exists()


# ------------------------------------------------------------------ issue 23 item 8: the Airflow try identity on the workers
AIRFLOW_TRY = {
    "AIRFLOW_CTX_DAG_ID": "sparse_to_dense",
    "AIRFLOW_CTX_DAG_RUN_ID": "manual__ray",
    "AIRFLOW_CTX_TASK_ID": "teacher_rl",
    "AIRFLOW_CTX_TRY_NUMBER": "1",
}


def test_workers_get_the_airflow_try_identity_but_no_credential_inside_a_uri():
    env = {**AIRFLOW_TRY, "MLFLOW_TRACKING_URI": "http://user:pw@mlflow:5000", "S2D_LOCK_LEASE_S": "120",
           "AWS_ENDPOINT_URL": "http://minio:9000"}
    fwd = ray_train.forwarded_env(env)
    assert {k: fwd[k] for k in AIRFLOW_TRY} == AIRFLOW_TRY
    assert "MLFLOW_TRACKING_URI" not in fwd and fwd["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert ray_train.withheld_env(env) == ["MLFLOW_TRACKING_URI"]


def _job_workers(marker: str) -> list:
    """The Ray Train worker processes of the job whose environment carries ``marker`` (S2D_TEST_JOB)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.environ().get("S2D_TEST_JOB") == marker:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _ray_workers_seen() -> list:
    import psutil

    seen = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                seen.append((p.pid, " ".join(p.info["cmdline"])[:60], sorted(k for k in p.environ() if k.startswith("S2D_"))))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return seen


def test_a_ray_train_restart_inside_the_lock_lease_resumes_instead_of_lock_held(cluster, tmp_path, s3_bucket):
    """An S3 root (a leased lock): a worker is SIGKILLed after the first resume state; Ray restarts the group
    and the new rank 0 finds the lock of the group Ray tore down, whose lease has not lapsed. With the Airflow
    try identity forwarded it is the same task: it waits the lease out, takes the lock over and resumes."""
    from stages import artifacts, storage
    from stages.config import load_config

    os.environ.setdefault("TQDM_DISABLE", "1")
    boot = str(tmp_path / "boot")
    bootstrap.main(StageRun("bootstrap", load_config("tiny", TEST_OVERRIDES + ["tracking.enabled=false"]), boot))
    # the workers read S3 credentials from their own environment, never from the driver: a config file here
    aws = tmp_path / "aws-config"
    aws.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\nregion = us-east-1\n")
    root = f"s3://{s3_bucket}/runs/ray"
    env = _ray_env(cluster, tmp_path / "mlflow.db")
    marker = secrets.token_hex(8)  # forwarded to this job's workers only: how the test finds them among other jobs'
    env.update(
        AIRFLOW_TRY,
        S2D_TEST_JOB=marker,
        S2D_LOCK_LEASE_S="10",
        AWS_CONFIG_FILE=str(aws),
        AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
    )
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    cmd = [*_cmd(root), "--teacher", f"{boot}/bootstrap/teacher", "--set", "tracking.enabled=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = storage.store_for(root)
    import threading


    err_lines: list[str] = []  # read as they come: the workers announce their pids (Ray forwards to either stream)
    out_lines: list[str] = []
    readers = [threading.Thread(target=lambda s=s, o=o: o.extend(iter(s.readline, "")), daemon=True)
               for s, o in ((proc.stderr, err_lines), (proc.stdout, out_lines))]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + 400
        while (
            time.time() < deadline
            and proc.poll() is None
            and store.read_bytes(f"{root}/teacher_rl/_resume/policy/latest.json") is None
        ):
            time.sleep(0.2)
        assert proc.poll() is None, "".join(err_lines)[-4000:]
        while time.time() < deadline and len(_job_workers(marker)) < 2:
            time.sleep(0.5)
        victims = _job_workers(marker)
        assert len(victims) == 2, (_ray_workers_seen(), ("".join(err_lines + out_lines))[-3000:])
        victims[-1].send_signal(signal.SIGKILL)  # one worker of this job (a lost node): Ray restarts the whole group
        proc.wait(timeout=600)
        for r in readers:
            r.join(timeout=30)
        stdout, stderr = "".join(out_lines), "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    logs = stdout + stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "is being written by another run" not in logs
    # Ray may stop the torn-down rank 0 gracefully (its lock released on exit) or not (the lock lingers): either
    # the new rank 0 finds the lock free, or it recognises try 1 of its own task and waits that lease out
    if "held by" in logs:
        assert "try 1 of this task" in logs and "taking over the lock of pid" in logs, logs[-6000:]
    assert "teacher_rl: resumed policy from step 2" in logs
    assert json.loads(stdout.strip().splitlines()[-1])["skipped"] is False
    assert artifacts.read_manifest(f"{root}/teacher_rl")["steps"] == 4
    artifacts.fetch(f"{root}/teacher_rl/model", cache_dir=tmp_path / "cache")
