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


# ------------------------------------------------------------------ issue 23 item 5: a lost lock is acted on (fencing)

_STALLED = """
import sys, time
from pathlib import Path
from stages import artifacts
from stages.lock import StageLock
stage, work, lease = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
with StageLock(stage, lease_s=lease):
    print("held", flush=True)
    sys.stdin.readline()  # the test stops this process here (SIGSTOP), takes the lock over, then lets it go on
    try:
        artifacts.save_state(stage, "policy", 2, work / "state", {"config_hash": "stalled"})
        artifacts.publish(work / "out", stage, {"stage": "stalled"})
    except Exception as e:
        print(f"{type(e).__name__}: {e}", flush=True)
        sys.exit(3)
print("published", flush=True)
"""


def _work(folder: Path, tag: str) -> Path:
    """An output folder (same file names for every tag, different bytes) and a resume state."""
    for sub in ("out/model", "state"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "out" / "model" / "model.safetensors").write_bytes(tag.encode() * 5000)
    (folder / "out" / "model" / "config.json").write_text(json_dumps({"tag": tag}))
    (folder / "state" / "optimizer.pt").write_bytes(tag.encode() * 100)
    return folder


def json_dumps(obj) -> str:
    return json.dumps(obj)


def test_a_holder_stalled_past_its_lease_fails_after_a_takeover_and_publishes_nothing(s3_bucket, tmp_path):
    """Real S3 server, real processes: the holder is SIGSTOPped past its lease, another run takes the lock
    over and publishes, the holder is SIGCONTed with a save_state and a publish to do: both are refused
    (LockLost) before any byte is written, and the new holder's manifest and files are intact."""
    stage = f"s3://{s3_bucket}/runs/fence/teacher_rl"
    lease = 6.0
    old = subprocess.Popen([sys.executable, "-c", _STALLED, stage, str(_work(tmp_path / "old", "old")), str(lease)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert old.stdout.readline().strip() == "held"
        os.kill(old.pid, signal.SIGSTOP)
        time.sleep(lease + 3)  # past the lease on the server's clock (1 s resolution)
        with StageLock(stage, lease_s=lease) as new:  # the stalled holder's lock is taken over
            artifacts.publish(_work(tmp_path / "new", "new") / "out", stage, {"stage": "new"})
            old.stdin.write("go\n")  # its next instruction is queued before it runs again: the race is real
            old.stdin.flush()
            os.kill(old.pid, signal.SIGCONT)
            out, _ = old.communicate(timeout=60)
            assert old.returncode == 3 and out.startswith("LockLost: ") and "lost its stage lock" in out, out
            assert not new.lost
            new.check()  # still ours
        m = _check_published(stage)  # the new holder's files, checksums verified
        assert m["stage"] == "new"
        assert json.loads(storage.store_for(stage).read_bytes(f"{stage}/model/config.json")) == {"tag": "new"}
        assert storage.store_for(stage).list(f"{stage}/_resume") == []  # the stalled one saved no state either
    finally:
        if old.poll() is None:
            os.kill(old.pid, signal.SIGCONT)
            old.kill()
            old.wait()


def test_a_real_stage_stalled_past_its_lease_fails_and_the_new_run_publishes(base_models, s3_bucket, tmp_path, stage_env):
    """The same through two real stage commands on one S3 root: the first is SIGSTOPped mid-training past its
    lease, a second run takes over, trains and publishes; the first, continued, exits 1 with one line and the
    published stage is the second's, complete and verified."""
    root = f"s3://{s3_bucket}/runs/stall"
    env = {**stage_env, "S2D_LOCK_LEASE_S": "12"}
    first = _stage(root, base_models, "teacher_rl.steps=12", "checkpoint_every=1", env=env, wait=False)
    store = storage.store_for(root)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and store.read_bytes(f"{root}/teacher_rl/_resume/policy/latest.json") is None:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)
        time.sleep(12 + 3)
        second = _stage(root, base_models, "teacher_rl.steps=12", "checkpoint_every=1", env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "taking over the lock of pid" in second.stderr
        published = _check_published(f"{root}/teacher_rl")
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.communicate()
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert first.returncode == 1 and len(line) == 1 and "lost its stage lock" in line[0], err[-3000:]
    assert _check_published(f"{root}/teacher_rl") == published  # untouched by the stalled run
    assert store.list(f"{root}/teacher_rl/_resume") == []


def test_the_heartbeat_marks_the_lock_lost_on_any_error_and_every_write_is_then_refused(s3_bucket, tmp_path):
    stage = f"s3://{s3_bucket}/runs/hb/teacher_rl"
    lock = StageLock(stage, lease_s=3).acquire()
    try:
        def broken(*a, **kw):
            raise RuntimeError("not a storage error")

        lock._store.replace_if = broken
        deadline = time.time() + 10
        while time.time() < deadline and not lock.lost:
            time.sleep(0.1)
        assert lock.lost and "RuntimeError: not a storage error" in lock.lost_why
        time.sleep(0.5)
        assert not lock._thread.is_alive()  # ended, loudly (the lock is marked lost), never silently
        work = _work(tmp_path / "w", "x")
        for write in (lambda: artifacts.publish(work / "out", stage, {"stage": "x"}),
                      lambda: artifacts.save_state(stage, "policy", 1, work / "state", {}),
                      lambda: artifacts.clear_state(stage)):
            with pytest.raises(storage.LockLost, match="lost its stage lock"):
                write()
        assert storage.store_for(stage).list(stage) == [f"{stage}/.lock"]  # nothing written
    finally:
        lock.release()


@pytest.mark.parametrize("lost_after", ["model.safetensors", "latest.json"])
def test_a_save_whose_upload_was_in_flight_when_the_lock_was_lost_removes_only_its_own_writes(lost_after, s3_bucket, tmp_path):
    """The lock is lost while one of the save's PUTs is in flight (a holder stalled mid-request): that PUT
    lands, the next fence refuses, and the save removes exactly what it wrote (its own folder, and a pointer
    only while it still holds its bytes). The new holder's pointer and the earlier state stay untouched."""
    stage = f"s3://{s3_bucket}/runs/inflight/teacher_rl"
    store = storage.store_for(stage)
    base = f"{stage}/_resume/policy"
    lock = StageLock(stage, lease_s=30).acquire()
    try:
        _save(stage, 2, tmp_path)
        earlier = json.loads(store.read_bytes(f"{base}/latest.json"))
        theirs = b'{"step": 9, "dir": "step-00000009-0a0b0c0d", "files": {}}'

        keys = []

        def note(params, **kw):
            keys.append(params["url_path"])

        def taken_over(model, **kw):  # after the server applied the PUT
            if model.name == "PutObject" and keys[-1].endswith(lost_after) and not lock.lost:
                lock._lose("taken over (test)")
                if lost_after == "model.safetensors":  # the new holder has written its pointer meanwhile
                    store.write_bytes(f"{base}/latest.json", theirs)

        events = store.client.meta.events
        events.register("before-call.s3.PutObject", note, unique_id="inflight-note")
        events.register("after-call.s3.PutObject", taken_over, unique_id="inflight-lose")
        with pytest.raises(storage.LockLost, match="lost its stage lock"):
            _save(stage, 4, tmp_path)
        left = store.list(base)
        assert not any("/step-00000004-" in u for u in left), left  # its own folder is gone
        assert any(f"/{earlier['dir']}/" in u for u in left)  # the earlier state is intact
        if lost_after == "model.safetensors":
            assert store.read_bytes(f"{base}/latest.json") == theirs  # the new holder's pointer, untouched
        else:  # its own pointers, which nobody replaced, are removed: no pointer names a missing folder
            assert store.read_bytes(f"{base}/latest.json") is None and store.read_bytes(f"{base}/previous.json") is None
    finally:
        events.unregister("before-call.s3.PutObject", unique_id="inflight-note")
        events.unregister("after-call.s3.PutObject", unique_id="inflight-lose")
        lock.release()


def test_a_renewal_whose_answer_was_lost_is_recognised_as_our_own(s3_bucket):
    """A conditional PUT that landed but whose answer never came back (a timeout): the next renewal gets 412;
    the lock is re-read and our own owner id there keeps it (before: "lost"). The same at acquisition. A lock
    object with another owner is a loss."""
    import boto3
    from botocore.exceptions import ReadTimeoutError

    stage = f"s3://{s3_bucket}/runs/own/teacher_rl"
    lock = StageLock(stage, lease_s=3).acquire()
    try:
        dropped = {"n": 0}

        def drop_answer(http_response, parsed, model, **kw):  # after the server applied the PUT
            if model.name == "PutObject" and not dropped["n"]:
                dropped["n"] += 1
                raise ReadTimeoutError(endpoint_url="lost answer")

        lock._store.client.meta.events.register("after-call.s3.PutObject", drop_answer)
        time.sleep(3)  # two heartbeats: the one whose answer is lost, the one answered 412
        assert dropped["n"] == 1 and not lock.lost
        etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="runs/own/teacher_rl/.lock")["ETag"]
        assert lock._etag == etag
        lock.check()
    finally:
        lock.release()
    # acquisition: our create landed, its answer was lost (simulated: our own body is already there)
    mine = StageLock(stage, lease_s=3)
    storage.store_for(stage).write_bytes(f"{stage}/.lock", mine._body())
    with mine:
        with pytest.raises(storage.LockHeld):
            StageLock(stage, lease_s=3).acquire()
        # another owner's body in place of ours: the next renewal is a loss
        other = StageLock(stage, lease_s=3)
        storage.store_for(stage).write_bytes(f"{stage}/.lock", other._body())
        mine._renew()
        assert mine.lost and "taken over" in mine.lost_why
        with pytest.raises(storage.LockLost):
            mine.check()


def test_one_lock_call_is_bounded_well_inside_the_heartbeat_margin(stalled_endpoint, caplog):
    """A renewal against an endpoint that never answers ends within a third of the lease (the next renewal
    is due then), as one attempt: never the data store's retries and 60 s deadline."""
    from stages.lock import lock_store

    for lease in (6.0, 12.0, 120.0, 600.0):
        st = lock_store(lease)
        assert st.timeout_s * 2 <= lease / 3 and st.client.meta.config.retries["total_max_attempts"] == 1
    lock = StageLock("s3://bucket/runs/x/teacher_rl", lease_s=12)
    lock._store, lock._etag, lock._renewed, lock._thread = lock_store(12), '"x"', time.monotonic(), object()
    t0 = time.monotonic()
    lock._renew()
    took = time.monotonic() - t0
    assert took < 12 / 3 and not lock.lost and "lock heartbeat failed" in caplog.text, took
    lock._renewed = time.monotonic() - 13  # no renewal confirmed for a whole lease: lost, and writes refused
    lock._renew()
    assert lock.lost and "no renewal confirmed" in lock.lost_why


# ------------------------------------------------------------------ issue 23 item 10: decided again under the lock


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_run_that_waited_for_the_lock_skips_what_the_holder_just_published(backend, base_models, tmp_path, stage_env, request):
    """Two real stage commands, one real lock: the second starts while the first trains and waits for the lock
    (S2D_LOCK_WAIT_S); once it holds it, it re-reads the manifest and skips (no second training, the first
    run's manifest untouched) instead of retraining and republishing."""
    root = f"s3://{request.getfixturevalue('s3_bucket')}/runs/wait" if backend == "s3" else str(tmp_path / "root")
    stage_env = {**stage_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}  # s3_bucket's, set later
    store = storage.store_for(root)
    first = _stage(root, base_models, "teacher_rl.steps=8", env=stage_env, wait=False)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and store.read_bytes(f"{root}/teacher_rl/_resume/policy/latest.json") is None:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        second = _stage(root, base_models, "teacher_rl.steps=8", env={**stage_env, "S2D_LOCK_WAIT_S": "600"}, wait=False)
        out1, err1 = first.communicate(timeout=600)
        out2, err2 = second.communicate(timeout=600)
    finally:
        for p in (first, second) if "second" in locals() else (first,):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert first.returncode == 0 and second.returncode == 0, (err1[-2000:], err2[-2000:])
    a, b = json.loads(out1.strip().splitlines()[-1]), json.loads(out2.strip().splitlines()[-1])
    assert a["skipped"] is False and b["skipped"] is True, err2[-3000:]
    m = _check_published(f"{root}/teacher_rl")
    assert b["metrics"] == a["metrics"] == m["metrics"]
    assert "resumed" not in err2 and "teacher_rl:policy" not in err2  # it never trained
    assert store.list(f"{root}/teacher_rl/_resume") == []


# ------------------------------------------------------------------ issue 23 item 11: credentials inside URIs


def test_redact_masks_userinfo_and_secret_query_values_only():
    from stages.redact import has_credentials, redact, redact_obj

    cases = {
        "http://user:pa55@mlflow:5000/api": "http://***@mlflow:5000/api",
        "at https://TOKEN123@host/x, then s3://bucket/key@v2": "at https://***@host/x, then s3://bucket/key@v2",
        "https://h/o?X-Amz-Signature=abc&part=1&access_token=zz": "https://h/o?X-Amz-Signature=***&part=1&access_token=***",
        "s3://bucket/runs/x": "s3://bucket/runs/x",
        "Qwen/Qwen3-1.7B": "Qwen/Qwen3-1.7B",
        "mail me: a@b.c": "mail me: a@b.c",
    }
    for raw, want in cases.items():
        assert redact(raw) == want and has_credentials(raw) == (raw != want)
    assert redact_obj({"inputs": ["http://u:p@h/x"], "n": 3}) == {"inputs": ["http://***@h/x"], "n": 3}


def test_no_credential_inside_a_uri_reaches_output_logs_or_stored_files(base_models, tmp_path, stage_env, s3_server):
    """The real stage command with a password inside MLFLOW_TRACKING_URI, inside the S3 endpoint URL and inside
    a teacher URL: stdout, stderr (warnings, log lines, the error line, --debug's traceback) and every file the
    stage writes name the URIs with ``***`` in place of the userinfo."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    port = dead.getsockname()[1]
    env = {**stage_env, "MLFLOW_TRACKING_URI": f"http://mluser:SECRET-ML-1@127.0.0.1:{port}",
           "S2D_TEACHER_URL": "http://tuser:SECRET-T-2@127.0.0.1:1"}
    root = tmp_path / "root"
    try:
        p = _stage(root, base_models, "teacher_rl.steps=2", "tracking.enabled=true", "tracking.flush_timeout_s=1", env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"MLflow at http://***@127.0.0.1:{port} is unreachable" in p.stderr
        required = _stage(root / "b", base_models, "tracking.enabled=true", "tracking.required=true", env=env)
        assert required.returncode == 2 and f"http://***@127.0.0.1:{port}" in _error_line(required)
        s3 = {**env, "AWS_ENDPOINT_URL": s3_server.replace("http://", "http://ak:SECRET-S3-3@"),
              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        bad = _stage("s3://bucket/runs/x", base_models, "teacher_rl.steps=2", env=s3)
        assert bad.returncode == 1 and "http://***@127.0.0.1" in _error_line(bad), bad.stderr[-2000:]
        debug = subprocess.run(
            [sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", "s3://bucket/runs/x", "--teacher",
             base_models, "--debug", "--set", "tracking.enabled=false"], env=s3, capture_output=True, text=True, timeout=300)
        assert debug.returncode == 1 and "Traceback" in debug.stderr
    finally:
        dead.close()
    for out in (p, required, bad, debug):
        for secret in ("SECRET-ML-1", "SECRET-T-2", "SECRET-S3-3"):
            assert secret not in out.stdout + out.stderr, (secret, (out.stdout + out.stderr)[-2000:])
    written = [f for f in root.rglob("*") if f.is_file()]
    assert any(f.name == "manifest.json" for f in written)
    for f in written:
        assert b"SECRET" not in f.read_bytes(), f


def test_manifests_and_mlflow_records_never_hold_a_uri_password(tmp_path):
    """What the stage stores (a manifest's inputs and extras, MLflow params and tags through the Tracker)
    carries URIs with the userinfo masked; the URI the client USES is unchanged."""
    from mlflow import MlflowClient

    from stages.config import Tracking
    from stages.tracking import Tracker

    work = tmp_path / "w"
    work.mkdir()
    (work / "f.txt").write_text("x")
    m = artifacts.publish(work, str(tmp_path / "root" / "teacher_data"),
                          {"stage": "teacher_data", "inputs": {"teacher": "http://u:SECRET-A@teacher:8000"},
                           "teacher_url": "https://SECRET-B@vllm/v1?api_key=SECRET-C"})
    raw = (tmp_path / "root" / "teacher_data" / "manifest.json").read_text()
    assert "SECRET" not in raw and m["inputs"]["teacher"] == "http://***@teacher:8000"
    t = Tracker(Tracking(experiment="redact"))
    rid = t.start("teacher_data", tags={"s2d.source": "http://u:SECRET-D@h/x"},
                  params={"teacher.url": "http://u:SECRET-E@h:1", "root": str(tmp_path)})
    t.tags({"s2d.teacher": "https://tok:SECRET-F@h"})
    t.end()
    assert not t.flush(30)
    run = MlflowClient().get_run(rid)
    stored = json.dumps({**run.data.params, **run.data.tags})
    assert "SECRET" not in stored and "http://***@h:1" in stored and "https://***@h" in stored


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
    latest = json.loads((base / "latest.json").read_text())
    previous = json.loads((base / "previous.json").read_text())
    assert latest["dir"].startswith("step-00000006-") and previous["dir"].startswith("step-00000004-")
    assert sorted(p.name for p in base.iterdir()) == sorted(["latest.json", "previous.json", latest["dir"], previous["dir"]])
    assert latest["history"][0]["loss"] is None  # strict JSON in resume pointers too
    target = base / latest["dir"] / "model.safetensors"
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
    # issue 23, "bad inputs still not clean"
    if case in ("tokenizer_mismatch", "tokenizer_mismatch_workflow"):  # from the tokenizer files: no model loads first
        from stages import models
        from stages.config import TinyArch

        tok = models.char_tokenizer()
        tok.add_tokens(["<think>"])
        d = tmp / "other_student"
        models.save(models.tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, 0),
                    tok, d)

        def no_load(*a, **kw):
            raise AssertionError("a model was loaded before the tokenizer check")

        monkeypatch.setattr(models, "load", no_load)
        if case == "tokenizer_mismatch_workflow":  # the base models of a whole workflow
            return (["workflow", "--config", "tiny", "--root", str(tmp / "root"), "--set", "tracking.enabled=false",
                     "--set", f"models.teacher.source={pub / 'stage' / 'model'}", "--set", f"models.student.source={d}"],
                    f"teacher and student must share one tokenizer ({pub / 'stage' / 'model'} vs {d}): vocabularies differ")
        return (["kl_warmup", "--config", "tiny", "--root", str(tmp / "root"), "--set", "tracking.enabled=false",
                 "--teacher", str(pub / "stage" / "model"), "--student", str(d)],
                f"teacher and student must share one tokenizer ({pub / 'stage' / 'model'} vs {d}): vocabularies differ")
    if case in ("data_not_objects", "data_not_objects_mixed"):
        f = tmp / "rows.json"
        f.write_text("[1, 2, 3]" if case == "data_not_objects" else '[{"problem": "1+1", "answer": "2"}, ["1+2", "3"]]')
        n, got = (1, "int") if case == "data_not_objects" else (2, "list")
        return (["validate", "--set", "task.kind=dataset", "--set",
                 f"task.data={{teacher_rl: {{path: {f}}}, prompts: {{path: {f}}}, eval: {{path: {f}}}}}"],
                f"{f}: row {n} of the JSON array must be an object, got {got}")
    if case == "root_scheme":
        return (["teacher_rl", "--config", "tiny", "--root", "gs://bucket/runs/x", "--set", "tracking.enabled=false"],
                "--root gs://bucket/runs/x: unsupported URI scheme 'gs' for an artifact root")
    if case == "root_userinfo":
        return (["plan", "--root", "s3://key:secret@bucket/runs/x", "--set", "tracking.enabled=false"],
                "--root s3://***@bucket/runs/x: a credential inside the URI")
    if case == "stage_typo":
        return ["teacher_lr", "--config", "tiny"], "unknown command 'teacher_lr': did you mean 'teacher_rl'? commands: bootstrap,"
    if case == "unk_text":
        f = tmp / "unicode.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in [{"problem": "What is 2+3?", "answer": "5"},
                                                        {"problem": "What is 6 × 7?", "answer": "42"},
                                                        {"problem": "Café bill: 3+4?", "answer": "7"}]) + "\n")
        return (["validate", "--set", "task.kind=dataset", "--set",
                 f"task.data={{bootstrap: {{path: {f}}}, teacher_rl: {{path: {f}}}, prompts: {{path: {f}, answer_field: null}}, "
                 f"student_rl: {{path: {f}}}, eval: {{path: {f}}}}}"],
                "task: split 'bootstrap' problem bootstrap-1: the tokenizer of bootstrap cannot represent '×' "
                "(it would become <unk>; 2 of 3 problems in the split)")
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
    "tokenizer_mismatch",
    "tokenizer_mismatch_workflow",
    "data_not_objects",
    "data_not_objects_mixed",
    "root_scheme",
    "root_userinfo",
    "stage_typo",
    "unk_text",
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


def test_a_mistyped_command_is_one_line_and_eval_problems_above_the_split_is_a_warning(tmp_path):
    """The real command: a mistyped stage name prints ONE line (not argparse's usage block) and exits 2;
    eval.problems larger than the eval split is accepted with a warning naming both numbers (a cap on every
    evaluated set, so a small set under a large cap is normal; the number averaged over must be visible)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "stages", "kl_warmpu", "--config", "tiny"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and not p.stdout, p.stderr
    assert p.stderr.startswith("error: argument command: unknown command 'kl_warmpu': did you mean 'kl_warmup'?")
    p = subprocess.run([sys.executable, "-m", "stages", "validate", "--config", "tiny", "--set", "eval.problems=500",
                        "--set", "task.sizes.eval=40"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "warning: eval.problems is 500 but split 'eval' has 40 problems: avg@8 and pass@8 there are over 40" in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["valid"] is True


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
    assert _latest(root)["step"] >= 4
    # flip one byte of the newest state: the retry falls back to the previous one with a warning
    newest = root / "teacher_rl" / "_resume" / "policy" / _latest(root)["dir"] / "model.safetensors"
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
real_put, real_write, real_clear = storage.LocalStore.put_file, storage.LocalStore.write_new, artifacts.clear_state
def put(self, local, uri):
    if moment == "mid_file" and uri.endswith("model.safetensors") and "/_resume/" not in uri:
        os.replace = lambda *a: die()  # the temporary is written in full, the rename never happens
    real_put(self, local, uri)
def write(self, uri, data):  # the manifest is created only if absent (write_new)
    if moment == "before_manifest" and uri.endswith("/manifest.json"):
        die()
    return real_write(self, uri, data)
def clear(uri):
    if moment == "after_manifest":
        die()
    real_clear(uri)
storage.LocalStore.put_file, storage.LocalStore.write_new, artifacts.clear_state = put, write, clear
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
