"""Fault injection: what breaks around a stage (storage, processes, numbers) and what must hold anyway.

Every test asserts the behaviour users expect AND that nothing published is wrong: a manifest only
ever names complete files with the right checksums, a failure never publishes, and a retry works.

    PYTHONPATH=$PWD python -m pytest -q tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import artifacts, storage
from stages.lock import StageLock

REPO = Path(__file__).resolve().parents[1]


def _check_published(stage_uri: str) -> dict | None:
    """The stage's manifest, after checking every file it lists is there with its checksum (or None)."""
    m = artifacts.read_manifest(stage_uri)
    if m is not None:
        artifacts.fetch(stage_uri)  # every listed file: present, with its checksum
        json.loads(json.dumps(m), parse_constant=lambda c: pytest.fail(f"manifest holds {c}"))
    return m


# ------------------------------------------------------------------ S3: a stalled endpoint


@pytest.fixture
def stalled_endpoint(monkeypatch):
    """A socket that accepts connections (the kernel's backlog) and never answers a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_DEFAULT_REGION": "us-east-1", "S2D_S3_TIMEOUT_S": "1", "S2D_S3_DEADLINE_S": "3"}.items():
        monkeypatch.setenv(k, v)
    yield url
    srv.close()
    storage._S3.clear()


def test_stalled_s3_endpoint_is_a_clear_error_within_the_deadline(stalled_endpoint, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(storage.ArtifactError) as e:
        artifacts.read_manifest("s3://bucket/runs/r1/teacher_rl")
    took = time.monotonic() - t0
    msg = str(e.value)
    assert stalled_endpoint in msg and "s3://bucket/runs/r1/teacher_rl/manifest.json" in msg and "S2D_S3_DEADLINE_S" in msg
    assert took < 30, f"a 3 s deadline took {took:.0f} s"  # botocore's defaults take ~8 min
    # uploads too (the transfer manager's worker threads)
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(storage.ArtifactError, match="s3://bucket/k/w.bin.*upload failed"):
        storage.store_for("s3://bucket/k").put_file(f, "s3://bucket/k/w.bin")


def test_stalled_s3_endpoint_stage_command_exits_with_one_line(stalled_endpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "S2D_S3_DEADLINE_S": "2"}
    # the time bound is asserted in-process above; here, importing torch dominates on a busy machine
    p = subprocess.run([sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", "s3://bucket/runs/x",
                        "--set", "tracking.enabled=false"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and stalled_endpoint in last and "manifest.json" in last


# ------------------------------------------------------------------ locks: one writer per stage folder

_HOLD = """
import sys, time
from stages import artifacts, storage
from stages.lock import StageLock
held = StageLock(sys.argv[1], lease_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(stage_uri: str, lease_s: float = 120, env=None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, stage_uri, str(lease_s)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_second_writer_refuses_while_first_holds_and_a_killed_holder_does_not_block(backend, tmp_path, request, monkeypatch):
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        stage = f"s3://{bucket}/runs/r/teacher_rl"
        monkeypatch.setenv("S2D_LOCK_LEASE_S", "6")
    else:
        stage = str(tmp_path / "runs/r/teacher_rl")
    first = _holder(stage, lease_s=6)  # heartbeat every 2 s; slack for a busy machine
    try:
        with pytest.raises(storage.LockHeld, match=rf"{stage} is being written by another run \(pid {first.pid} on "):
            StageLock(stage).acquire()
        if backend == "s3":
            time.sleep(8)  # the heartbeat renews the lease: a live holder keeps its lock past it
            with pytest.raises(storage.LockHeld):
                StageLock(stage).acquire()
    finally:
        first.kill()  # kill -9: no code runs, no release
        first.wait()
    if backend == "s3":
        with pytest.raises(storage.LockHeld):  # still within the dead holder's lease
            StageLock(stage).acquire()
        time.sleep(8)  # past the lease, on the server clock (1 s resolution)
    with StageLock(stage) as lock:  # the dead holder's lock is taken over
        assert lock.info["pid"] == os.getpid()
        with pytest.raises(storage.LockHeld):
            StageLock(stage).acquire()
    with StageLock(stage):  # and released on exit
        pass


@pytest.mark.parametrize("var,value", [("S2D_LOCK_LEASE_S", "2m"), ("S2D_LOCK_WAIT_S", "-1"), ("S2D_LOCK_WAIT_S", "nan")])
def test_a_bad_lock_setting_is_an_error_naming_it(tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=rf"^{var}='{value}': expected a number of seconds >= 0$"):
        StageLock(str(tmp_path / "teacher_rl"))._patience({}, 6.0)


def test_a_retry_waits_out_its_own_killed_try_but_not_a_live_one_or_another_run(s3_bucket, monkeypatch):
    """S3 lock + Airflow retries: a try killed with SIGKILL (a container killed) leaves its lock for the
    lease; the next try of the SAME task waits for the lease to lapse and takes over instead of failing.
    Another run is refused at once, and a previous try that still heartbeats (a zombie) is never taken over."""
    stage = f"s3://{s3_bucket}/runs/retry/teacher_rl"
    task = {"AIRFLOW_CTX_DAG_ID": "sparse_to_dense", "AIRFLOW_CTX_DAG_RUN_ID": "manual__1", "AIRFLOW_CTX_TASK_ID": "teacher_rl"}
    monkeypatch.setenv("S2D_LOCK_LEASE_S", "6")
    for k, v in task.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "2")
    live = _holder(stage, lease_s=6, env={**task, "AIRFLOW_CTX_TRY_NUMBER": "1"})
    try:
        t0 = time.monotonic()
        with pytest.raises(storage.LockHeld):  # alive and renewing: waited for, never taken over
            StageLock(stage).acquire()
        assert time.monotonic() - t0 >= 1.25 * 6 + 5 - 1
    finally:
        live.kill()
        live.wait()
    dead = _holder(stage, lease_s=6, env={**task, "AIRFLOW_CTX_TRY_NUMBER": "1"})
    dead.kill()  # kill -9 right after acquiring: the lock stays with a fresh heartbeat
    dead.wait()
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "kl_warmup")  # another task (any other run): refused at once
    t0 = time.monotonic()
    with pytest.raises(storage.LockHeld, match=rf"pid {dead.pid} "):
        StageLock(stage).acquire()
    assert time.monotonic() - t0 < 3
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "teacher_rl")  # the retry of the killed try: waits, then takes over
    with StageLock(stage) as lock:
        assert lock.info["try"] == "2" and lock.info["task"] == "sparse_to_dense/manual__1/teacher_rl"
        assert 2 < time.monotonic() - t0 < 1.25 * 6 + 5 + 3


# ------------------------------------------------------------------ kill -9 leftovers are swept


def test_stale_tmp_files_and_scratch_folders_of_dead_runs_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stage = tmp_path / "root" / "teacher_rl"
    (stage / "model").mkdir(parents=True)
    host = storage._HOST
    stale = stage / "model" / f".model.safetensors.tmp-{dead_pid}-{host}-abcd1234"
    stale.write_bytes(b"half a file")
    mine = tmp_path / "root" / f".summary.json.tmp-{os.getpid()}-{host}-abcd1234"  # a live writer's
    mine.write_bytes(b"in progress")
    assert storage.sweep_tmp(tmp_path / "root") == 1 and not stale.exists() and mine.exists()
    stale.write_bytes(b"half a file")
    with StageLock(str(stage)):  # the lock holder is the only writer: every temporary is stale
        assert not stale.exists()
    assert mine.exists()

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    (scratch / f"s2d-teacher_rl-{dead_pid}-x1y2z3ab" / "state").mkdir(parents=True)
    (scratch / f"s2d-teacher_rl-{os.getpid()}-x1y2z3ab").mkdir()
    (scratch / "s2d-cache").mkdir()
    assert storage.sweep_scratch(scratch) == 1
    assert sorted(p.name for p in scratch.iterdir()) == ["s2d-cache", f"s2d-teacher_rl-{os.getpid()}-x1y2z3ab"]


# ------------------------------------------------------------------ published files: missing, flipped, not JSON


def _published(tmp_path) -> str:
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "model" / "weights.bin").write_bytes(os.urandom(4096))
    (work / "model" / "config.json").write_text("{}")
    stage = str(tmp_path / "root" / "kl_warmup")
    m = artifacts.publish(work, stage, {"stage": "kl_warmup", "metrics": {"loss": float("nan"), "kl": float("inf"), "ok": 1.5}})
    assert m["metrics"] == {"loss": None, "kl": None, "ok": 1.5}
    return stage


def test_manifests_are_strict_json_and_damage_is_named_precisely(tmp_path):
    stage = _published(tmp_path)
    raw = (Path(stage) / "manifest.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"bare {c} in a manifest"))
    assert _check_published(stage)["metrics"]["loss"] is None
    weights = Path(stage) / "model" / "weights.bin"
    good = weights.read_bytes()
    weights.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one flipped bit
    with pytest.raises(storage.ArtifactError, match="weights.bin: checksum mismatch"):
        artifacts.fetch(f"{stage}/model")
    weights.unlink()
    with pytest.raises(storage.ArtifactError, match="weights.bin: listed in its manifest but missing"):
        artifacts.fetch(f"{stage}/model")
    weights.write_bytes(good)
    (Path(stage) / "manifest.json").write_text(raw[: len(raw) // 2])  # truncated
    with pytest.raises(storage.CorruptManifest, match=r"kl_warmup/manifest.json: manifest is not valid JSON"):
        artifacts.fetch(f"{stage}/model")


# ------------------------------------------------------------------ resume states: damaged -> previous -> start over


def _save(stage: str, step: int, tmp_path) -> None:
    d = tmp_path / f"state{step}"
    d.mkdir()
    (d / "model.safetensors").write_bytes(os.urandom(256) + bytes([step]))
    (d / "optimizer.pt").write_bytes(os.urandom(64))
    artifacts.save_state(stage, "policy", step, d, {"config_hash": "h", "history": [{"step": step, "loss": float("nan")}]})


@pytest.mark.parametrize("damage", ["flip", "missing", "pointer"])
def test_corrupted_resume_state_falls_back_to_the_previous_then_starts_over(damage, tmp_path, caplog):
    stage = str(tmp_path / "root" / "teacher_rl")
    for step in (2, 4, 6):
        _save(stage, step, tmp_path)
    base = Path(stage) / "_resume" / "policy"
    assert sorted(p.name for p in base.iterdir()) == ["latest.json", "previous.json", "step-00000004", "step-00000006"]
    latest = json.loads((base / "latest.json").read_text())
    assert latest["history"][0]["loss"] is None  # strict JSON in resume pointers too
    target = base / "step-00000006" / "model.safetensors"
    if damage == "flip":
        b = target.read_bytes()
        target.write_bytes(bytes([b[0] ^ 0xFF]) + b[1:])
    elif damage == "missing":
        target.unlink()
    else:
        (base / "latest.json").write_text('{"step": 6, "fil')
    dest = tmp_path / "restore"
    meta = artifacts.load_state(stage, "policy", dest)
    assert meta["step"] == 4 and (dest / "model.safetensors").read_bytes()[-1] == 4
    assert "unusable" in caplog.text and "trying the previous one" in caplog.text
    # a state that loads but that the trainer rejects (check raises) is skipped the same way
    assert artifacts.load_state(stage, "policy", dest, check=lambda d, m: 1 / 0) is None
    assert "starting over" in caplog.text


# ------------------------------------------------------------------ bad inputs: one line, exit 2, nothing loaded


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from stages.cli import main

    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def published_model(tmp_path_factory):
    """A tiny published checkpoint (stage folder + manifest), as a stage would leave it."""
    from stages.config import TinyArch
    from stages.models import char_tokenizer, save, tiny_qwen3

    root = tmp_path_factory.mktemp("pub")
    tok = char_tokenizer()
    save(
        tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, 0),
        tok,
        root / "work" / "model",
    )
    artifacts.publish(root / "work" / "model", str(root / "base" / "model"), {"stage": "base", "outputs": {}})
    artifacts.publish(root / "work", str(root / "stage"), {"stage": "stage", "outputs": {"model": str(root / "stage" / "model")}})
    return root


def _bad_input_case(case: str, tmp: Path, pub: Path, monkeypatch) -> tuple[list[str], str]:
    """(CLI args, what the error line must name) for one bad input."""
    stage = ["teacher_rl", "--config", "tiny", "--root", str(tmp / "root"), "--set", "tracking.enabled=false"]
    if case == "yaml_file":
        f = tmp / "bad.yaml"
        f.write_text("name: x\nseed: [1, 2\nmodels: {}\n")
        return ["validate", "--config", str(f)], f"{f}: not valid YAML: line"
    if case == "yaml_set":
        return ["validate", "--set", "teacher_rl.steps=[1,"], "--set teacher_rl.steps=[1,: value is not valid YAML"
    if case == "set_key":
        return ["validate", "--set", "teacher rl.steps=3"], "is not a key path"
    if case == "nan_value":
        return ["validate", "--set", "kl_warmup.optim.lr=.nan"], "kl_warmup.optim.lr: Input should be a finite number"
    if case == "device_banana":
        return stage + ["--set", "device=banana"], "device: not a device"
    if case == "device_cuda":
        return stage + ["--set", "device=cuda"], "device 'cuda' is not available on this host"
    if case == "template_field":
        return ["validate", "--set", "task.prompt_template='Q: {question}'"], "prompt_template uses unknown field(s) ['question']"
    if case == "template_positional":
        return ["validate", "--set", "task.prompt_template='{problem} {}'"], "prompt_template has a positional field"
    if case == "plugin_import":
        return [
            "validate",
            "--set",
            "task.kind=no_such_pkg.tasks:make",
        ], "'no_such_pkg.tasks:make'"  # (whichever check meets it first names the key and the module)
    if case == "plugin_attr":
        return ["validate", "--set", "task.kind=json:no_factory"], "no_factory"
    if case == "stage_order":
        return ["validate", "--set", "workflow.stages=[onpolicy_distill, kl_warmup]"], "stages run in the paper's order"
    if case == "stage_twice":
        return ["validate", "--set", "workflow.stages=[kl_warmup, kl_warmup]"], "lists a stage twice"
    if case == "bogus_config_json":
        d = tmp / "bogus"
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "qwen3", "hidden_size": "wide"}')
        return stage + ["--teacher", str(d)], f"policy {d}: not a loadable model config"
    if case == "config_json_not_json":
        d = tmp / "bogus2"
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "qwen3",')
        return stage + ["--teacher", str(d)], f"policy {d}: not a loadable model config"
    if case == "stage_folder_published":
        return stage + [
            "--teacher",
            str(pub / "stage"),
        ], f"policy {pub / 'stage'}: a stage folder, not a model; pass one of its outputs: {pub / 'stage' / 'model'}"
    if case == "stage_folder_plain":
        d = tmp / "plain"
        (d / "model").mkdir(parents=True)
        (d / "model" / "config.json").write_text("{}")
        return stage + ["--teacher", str(d)], f"policy {d}: a stage folder; pass its model folder {d / 'model'}"
    if case == "offline_hub_id":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return stage + [
            "--teacher",
            "nobody-s2d/no-such-model",
        ], "policy: hub id 'nobody-s2d/no-such-model' is not in the local cache"
    if case == "manifest_not_json":
        d = tmp / "pubcopy"
        import shutil

        shutil.copytree(pub / "stage", d)
        (d / "manifest.json").write_text("{not json")
        return stage + ["--teacher", str(d / "model")], f"{d / 'manifest.json'}: manifest is not valid JSON"
    if case == "published_file_missing":
        d = tmp / "pubcopy"
        import shutil

        shutil.copytree(pub / "stage", d)
        (d / "model" / "model.safetensors").unlink()
        return stage + ["--teacher", str(d / "model")], f"{d / 'model' / 'model.safetensors'}: listed in its manifest but missing"
    if case == "input_missing":
        return stage + ["--teacher", str(tmp / "nope" / "model")], f"policy {tmp / 'nope' / 'model'} does not exist"
    if case == "unpublished_s3":
        return stage + ["--teacher", "s3://{bucket}/runs/x/teacher_rl/model"], "not a published artifact"
    raise AssertionError(case)


BAD_INPUTS = [
    "yaml_file",
    "yaml_set",
    "set_key",
    "nan_value",
    "device_banana",
    "device_cuda",
    "template_field",
    "template_positional",
    "plugin_import",
    "plugin_attr",
    "stage_order",
    "stage_twice",
    "bogus_config_json",
    "config_json_not_json",
    "stage_folder_published",
    "stage_folder_plain",
    "offline_hub_id",
    "manifest_not_json",
    "published_file_missing",
    "input_missing",
    "unpublished_s3",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_before_anything_runs(case, tmp_path, published_model, capsys, monkeypatch, request):
    args, expected = _bad_input_case(case, tmp_path, published_model, monkeypatch)
    if case == "unpublished_s3":
        args = [a.replace("{bucket}", request.getfixturevalue("s3_bucket")) for a in args]
    if case == "device_cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has a GPU")
    rc, err = _cli(args, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and lines and lines[-1].startswith("error: "), err
    assert expected in lines[-1], lines[-1]
    assert "Traceback" not in err and not [ln for ln in lines if ln.startswith("error")][1:]
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("manifest.json"))


def test_bad_input_through_the_real_command_and_debug_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages", "validate", "--set", "workflow.stages=[student_rl, teacher_rl]"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and not p.stdout
    p = subprocess.run(cmd + ["--debug"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error: ")


# ------------------------------------------------------------------ whole stages: the real command, real faults


def _overrides(*extra: str) -> list[str]:
    from conftest import TEST_OVERRIDES

    return TEST_OVERRIDES + ["torch_threads=1", "teacher_rl.steps=6", "checkpoint_every=2", *extra]


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    """The bootstrap stage's models, published once for every stage test here (read-only inputs)."""
    from conftest import TEST_OVERRIDES

    from stages.config import load_config
    from stages.recipes import bootstrap
    from stages.runtime import StageRun

    root = str(tmp_path_factory.mktemp("base") / "root")
    bootstrap.main(StageRun("bootstrap", load_config("tiny", TEST_OVERRIDES), root))
    return f"{root}/bootstrap/teacher"


@pytest.fixture
def stage_env(tmp_path):
    """Environment of a stage subprocess, with its own temp folder so leaked scratch folders are visible."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "TQDM_DISABLE": "1", "TMPDIR": str(tmp)}


def _stage(root, teacher, *extra, env, wait=True, timeout=300, stage="teacher_rl"):
    inputs = ["--teacher", teacher] + (["--student", teacher.replace("/teacher", "/student")] if stage != "teacher_rl" else [])
    cmd = [sys.executable, "-m", "stages", stage, "--config", "tiny", "--root", str(root), *inputs,
           *[a for o in _overrides(*extra) for a in ("--set", o)]]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


def _leftovers(root: Path, env: dict) -> list[str]:
    """Scratch folders in the stage's temp folder and unfinished temporaries in the root."""
    return sorted(p.name for p in Path(env["TMPDIR"]).glob("s2d-*")) + sorted(p.name for p in Path(root).rglob(".*.tmp-*"))


def _latest(root, stage="teacher_rl", name="policy") -> dict | None:
    f = Path(root) / stage / "_resume" / name / "latest.json"
    return json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}")) if f.exists() else None


def test_divergence_stops_before_the_step_publishes_nothing_and_keeps_the_last_state(base_models, tmp_path, stage_env):
    root = tmp_path / "root"
    # an exploding learning rate (forward KL always has a gradient): step 1 is finite and saved, then not
    p = _stage(root, base_models, "kl_warmup.optim.lr=1e30", "kl_warmup.steps=4", "checkpoint_every=1",
               stage="kl_warmup", env=stage_env)
    line = _error_line(p)
    assert p.returncode == 1 and "Divergence: kl_warmup:" in line and "at step 2 (student" in line, line
    assert "nothing published, the resume state of step 1 kept" in line
    assert artifacts.read_manifest(str(root / "kl_warmup")) is None
    assert _latest(root, "kl_warmup", "student")["step"] == 1
    assert _leftovers(root, stage_env) == []
    # a retry with a fixed learning rate starts over (another config) and publishes strict JSON only
    p = _stage(root, base_models, "kl_warmup.steps=4", stage="kl_warmup", env=stage_env)
    assert p.returncode == 0, p.stderr[-3000:]
    m = _check_published(str(root / "kl_warmup"))
    assert m["steps"] == 4
    for line in (root / "kl_warmup" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert _latest(root, "kl_warmup", "student") is None and _leftovers(root, stage_env) == []


def test_concurrent_run_refused_sigterm_cleans_up_and_corrupted_state_falls_back(base_models, tmp_path, stage_env):
    root = tmp_path / "root"
    first = _stage(root, base_models, "teacher_rl.steps=16", env=stage_env, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((_latest(root) or {}).get("step", 0) >= 4):
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # paused mid-training (still holding its lock), so it cannot finish meanwhile
    try:
        # a second run of the same stage into the same root refuses while the first holds the lock
        second = _stage(root, base_models, "teacher_rl.steps=16", env=stage_env)
        line = _error_line(second)
        assert second.returncode == 1 and f"teacher_rl is being written by another run (pid {first.pid} on " in line, line
    finally:
        # SIGTERM (docker stop, a pod deletion, an Airflow timeout): cleans up, publishes nothing, keeps the state
        os.kill(first.pid, signal.SIGTERM)
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "terminated (SIGTERM)" in err, err[-3000:]
    assert artifacts.read_manifest(str(root / "teacher_rl")) is None
    assert _leftovers(root, stage_env) == []
    saved = _latest(root)["step"]
    assert saved >= 4
    # flip one byte of the newest state: the retry falls back to the previous one with a warning
    newest = root / "teacher_rl" / "_resume" / "policy" / f"step-{saved:08d}" / "model.safetensors"
    b = bytearray(newest.read_bytes())
    b[len(b) // 2] ^= 0x01
    newest.write_bytes(bytes(b))
    p = _stage(root, base_models, "teacher_rl.steps=16", "checkpoint_every=100", env=stage_env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resume state latest.json is unusable" in p.stderr and "trying the previous one" in p.stderr
    m = _check_published(str(root / "teacher_rl"))
    history = [json.loads(r) for r in (root / "teacher_rl" / "metrics.jsonl").read_text().splitlines()]
    assert m["steps"] == 16 and [h["step"] for h in history] == list(range(1, 17))
    assert _leftovers(root, stage_env) == []


_KILL_AT = """
import os, signal, sys
from stages import artifacts, storage
from stages.lock import StageLock
moment, argv = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_put, real_write, real_clear = storage.LocalStore.put_file, storage.LocalStore.write_bytes, artifacts.clear_state
def put(self, local, uri):
    if moment == "mid_file" and uri.endswith("model.safetensors") and "/_resume/" not in uri:
        os.replace = lambda *a: die()  # the temporary is written in full, the rename never happens
    real_put(self, local, uri)
def write(self, uri, data):
    if moment == "before_manifest" and uri.endswith("/manifest.json"):
        die()
    real_write(self, uri, data)
def clear(uri):
    if moment == "after_manifest":
        die()
    real_clear(uri)
storage.LocalStore.put_file, storage.LocalStore.write_bytes, artifacts.clear_state = put, write, clear
from stages.cli import main
sys.exit(main(argv))
"""


@pytest.mark.parametrize("moment", ["mid_file", "before_manifest", "after_manifest"])
def test_kill_9_while_publishing_never_leaves_a_wrong_stage_and_the_retry_repairs(moment, base_models, tmp_path, stage_env):
    root = tmp_path / "root"
    args = ["teacher_rl", "--config", "tiny", "--root", str(root), "--teacher", base_models,
            *[a for o in _overrides("teacher_rl.steps=4") for a in ("--set", o)]]
    p = subprocess.run(
        [sys.executable, "-c", _KILL_AT, moment, *args], env=stage_env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == -9, p.stderr[-3000:]
    m = _check_published(str(root / "teacher_rl"))  # whatever is there is complete and verified
    assert (m is not None) == (moment == "after_manifest")
    assert _latest(root) is not None  # the training state outlives a kill before its cleanup
    assert _leftovers(root, stage_env)  # kill -9 runs no cleanup code ...
    p = _stage(root, base_models, "teacher_rl.steps=4", env=stage_env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["skipped"] is (moment == "after_manifest")
    assert _check_published(str(root / "teacher_rl"))["steps"] == 4
    assert _latest(root) is None and _leftovers(root, stage_env) == []  # ... the next run sweeps it


@pytest.fixture
def small_mount(tmp_path):
    """Mount a tmpfs (root only; skipped elsewhere). Yields mount(path, size, ro=False) -> path."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI containers run as root)")
    mounted = []

    def mount(path: Path, size: str, ro: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_fails_cleanly_and_the_retry_completes(base_models, tmp_path, stage_env, small_mount):
    root = small_mount(tmp_path / "disk", "300k")  # a resume state of the test teacher is ~1 MB
    p = _stage(root, base_models, "teacher_rl.steps=4", env=stage_env)
    line = _error_line(p)
    assert p.returncode == 1 and "No space left on device" in line, line
    assert artifacts.read_manifest(str(root / "teacher_rl")) is None and _latest(root) is None
    assert _leftovers(root, stage_env) == []  # no half-written temporaries eat the little space there is
    subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
    p = _stage(root, base_models, "teacher_rl.steps=4", env=stage_env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _check_published(str(root / "teacher_rl"))["steps"] == 4


def test_unwritable_root_and_empty_split_are_found_before_any_model_or_mlflow_run(base_models, tmp_path, stage_env, small_mount):
    db = tmp_path / "mlflow.db"
    env = {**stage_env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    ro = small_mount(tmp_path / "ro", "1m", ro=True)
    for root, extra, expected in [
        (ro / "runs", [], [f"artifact folder {ro / 'runs' / 'teacher_rl'} is not writable: Read-only file system"]),
        # (the task loader's own check or the stage's, whichever meets it first)
        (tmp_path / "root", ["task.sizes.teacher_rl=0"], ["teacher_rl", "is empty"]),
    ]:
        p = _stage(root, base_models, "tracking.enabled=true", *extra, env=env)
        line = _error_line(p)
        assert p.returncode == 2 and all(x in line for x in expected), p.stderr[-3000:]
        assert "Loading" not in p.stderr and "load_model" not in p.stderr
    if db.exists():  # MLflow may have created its store; it must hold no run
        import sqlite3

        with sqlite3.connect(db) as c:
            assert c.execute("select count(*) from runs").fetchone()[0] == 0
    assert _leftovers(tmp_path / "root", stage_env) == []
