"""Tracking never stops training, and lineage is repaired later (issue 12 faults 3 and 7), against a
real ``mlflow server`` that is never started, hangs, is killed in the middle of a stage and restarted on
the same store. Each stage runs as the real command in a subprocess. ~3-4 min on 2 busy cores.

No timing is asserted: each command only has a generous overall timeout (MLflow's own defaults
would retry a dead server for ~4 minutes per call and block the stage).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_OVERRIDES, free_port, wait_http

from stages import artifacts

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERRIDES = [o for o in TEST_OVERRIDES if not o.startswith("tracking.")] + ["tracking.experiment=faults"]


class Server:
    """A real MLflow tracking server on a fixed port and sqlite store, which the test stops and restarts."""

    def __init__(self, d: Path):
        self.d, self.port = d, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.d}/mlflow.db",
                                      "--serve-artifacts", "--artifacts-destination", str(self.d / "artifacts"),
                                      "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                     env=env, stdout=open(self.d / "log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/health", timeout=180)

    def ensure(self):
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow"))
    mp = pytest.MonkeyPatch()  # this process's client: bounded requests too
    mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    yield s  # not started: the first test runs against a port where nothing listens
    s.kill()
    mp.undo()


def stage(cmd: str, root, uri: str, *extra: str, timeout=600, driver: str | None = None, wait=True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "S2D_MLFLOW_RETRY_S": "1"}
    args = [cmd, "--config", "tiny", "--root", str(root), *[a for o in OVERRIDES + list(extra) for a in ("--set", o)]]
    argv = [sys.executable, "-c", driver, *args] if driver else [sys.executable, "-m", "stages", *args]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.url)


def stage_run(c, root, name):
    exp = c.get_experiment_by_name("faults")
    runs = c.search_runs([exp.experiment_id], f"tags.`s2d.root` = '{root}' and tags.`s2d.stage` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture
def hung_socket():
    """A server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    t.join()
    for s in held:
        s.close()
    sock.close()


def test_unreachable_server_never_blocks_and_the_skip_records_the_run(server, tmp_path, hung_socket):
    root = tmp_path / "down"
    # nothing listens on the port: the stage trains and publishes, with a warning
    r = stage("bootstrap", root, server.url)
    assert r.returncode == 0, r.stderr[-3000:]
    m = artifacts.read_manifest(str(root / "bootstrap"))
    assert m is not None and m["mlflow_run_id"] is None
    assert "unreachable" in r.stderr and "did not record" in r.stderr
    # a socket that accepts and never answers: the same
    r = stage("bootstrap", tmp_path / "hung", hung_socket)
    assert r.returncode == 0, r.stderr[-3000:]
    assert artifacts.read_manifest(str(tmp_path / "hung" / "bootstrap")) is not None
    # tracking.required: a one-line error naming the URI, before any model loads or anything is written
    r = stage("teacher_rl", root, server.url, "tracking.required=true")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: MLflow tracking server {server.url} is unreachable"
    )
    written = [p.name for p in (root / "teacher_rl").rglob("*")] if (root / "teacher_rl").exists() else []
    assert "Traceback" not in r.stderr and not [n for n in written if not n.startswith(".lock")], written

    # the server comes up: running the stage again skips it and records its run from the manifest
    server.start()
    r = stage("bootstrap", root, server.url)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["skipped"] is True, r.stderr[-3000:]
    c = client(server)
    run = stage_run(c, str(root), "bootstrap")
    assert run.info.status == "FINISHED" and run.data.tags["s2d.output.teacher"] == "bootstrap/teacher"
    assert run.data.metrics["final.teacher.params"] == m["metrics"]["teacher.params"]
    lm = c.get_logged_model(run.data.tags["s2d.output.student.model"])
    assert lm.tags["s2d.uri"] == f"{root}/bootstrap/student" and lm.source_run_id == run.info.run_id
    # a second skip changes nothing (idempotent)
    assert stage("bootstrap", root, server.url).returncode == 0
    assert len(c.search_logged_models([run.info.experiment_id])) == 2


def test_server_killed_mid_stage_then_restarted(server, tmp_path):
    root = tmp_path / "kill"
    server.ensure()
    assert stage("bootstrap", root, server.url).returncode == 0
    c = client(server)
    p = stage("teacher_rl", root, server.url, "teacher_rl.steps=10", "checkpoint_every=100", wait=False)
    try:
        deadline = time.time() + 600
        while True:  # the stage is training and its metrics arrive
            runs = c.search_runs([c.get_experiment_by_name("faults").experiment_id],
                                 f"tags.`s2d.root` = '{root}' and tags.`s2d.stage` = 'teacher_rl'")
            if runs and c.get_metric_history(runs[0].info.run_id, "reward"):
                break
            assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:] if p.poll() is not None else "timeout"
            time.sleep(0.5)
        server.kill()
        err = p.communicate(timeout=600)[1]
    finally:
        if p.poll() is None:
            p.kill()
    # training went on to the end and published
    assert p.returncode == 0, err[-3000:]
    m = artifacts.read_manifest(str(root / "teacher_rl"))
    assert m is not None and m["mlflow_run_id"] == runs[0].info.run_id
    assert len([line for line in (root / "teacher_rl" / "metrics.jsonl").read_text().splitlines() if line]) == 10
    assert "stopped answering" in err and "did not record" in err

    server.start()  # same store
    r = stage("teacher_rl", root, server.url, "teacher_rl.steps=10", "checkpoint_every=100")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["skipped"] is True, r.stderr[-3000:]
    run = c.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(x.step for x in c.get_metric_history(run.info.run_id, "reward")) == list(range(1, 11))
    assert run.data.metrics["final.eval.avg_at_2"] == m["metrics"]["eval.avg@2"]
    assert run.data.tags["s2d.input.teacher"] == "bootstrap/teacher"
    assert run.data.tags["s2d.input.teacher.run"] == stage_run(c, str(root), "bootstrap").info.run_id
    lm = c.get_logged_model(run.data.tags["s2d.output.model.model"])
    assert lm.tags["s2d.uri"] == f"{root}/teacher_rl/model"


KILL_AFTER_MANIFEST = """
import os, signal, sys
from stages import tracking
from stages.cli import main
# kill -9 the stage the moment its manifest is published, before MLflow hears about it
tracking.Tracker.reconcile = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main(sys.argv[1:]))
"""


def test_kill_after_manifest_is_repaired_by_the_skip(server, tmp_path):
    root = tmp_path / "half"
    server.ensure()
    r = stage("bootstrap", root, server.url, driver=KILL_AFTER_MANIFEST)
    assert r.returncode == -signal.SIGKILL
    m = artifacts.read_manifest(str(root / "bootstrap"))
    assert m is not None and m["mlflow_run_id"]
    c = client(server)
    run = c.get_run(m["mlflow_run_id"])
    assert run.info.status == "RUNNING" and "s2d.output.teacher" not in run.data.tags  # half-written
    assert not any(k.startswith("final.") for k in run.data.metrics)

    r = stage("bootstrap", root, server.url)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["skipped"] is True, r.stderr[-3000:]
    run = c.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["s2d.output.teacher"] == "bootstrap/teacher"
    assert run.data.metrics["final.student.params"] == m["metrics"]["student.params"]
    assert run.data.tags["s2d.published"] == m["published_at"]

    # the DAG's failure callback: every run of a root still RUNNING is closed
    r2 = stage("bootstrap", tmp_path / "other", server.url, driver=KILL_AFTER_MANIFEST)
    open_id = artifacts.read_manifest(str(tmp_path / "other" / "bootstrap"))["mlflow_run_id"]
    assert r2.returncode == -signal.SIGKILL and c.get_run(open_id).info.status == "RUNNING"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "stages", "close-runs", "--root", str(tmp_path / "other"), "--status", "KILLED",
                          "--set", "tracking.experiment=faults"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1])["closed"] == [open_id], out.stderr[-2000:]
    assert c.get_run(open_id).info.status == "KILLED" and c.get_run(m["mlflow_run_id"]).info.status == "FINISHED"


def test_outbox_is_bounded_while_the_server_is_away(monkeypatch):
    """In-process: with nothing listening, records queue up to the bound (oldest metrics dropped, counted);
    structural records (run creation, tags) are never dropped; a flush gives back what is unsent."""
    from stages import tracking
    from stages.config import Tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(tracking, "MAX_BUFFERED", 50)
    t = tracking.Tracker(Tracking(experiment="bounded"))
    assert t.error  # the probe saw nothing listening
    assert t.start("stage", tags={"s2d.stage": "x"}) is None
    for step in range(100):
        t.metrics({"loss": 1.0, "reward": 0.5}, step)
    t.tags({"s2d.output.model": "x/model"})
    left = t.flush(5)
    assert left[0] == "create run stage" and left[-1] == "tags"
    assert t.dropped == 150 and sum(d.startswith("metrics") for d in left) == 25


# ------------------------------------------------------------------ issue 23 item 7: registered versions pin their files


def test_a_registered_version_pins_its_files_and_its_stage_folder_is_not_overwritten_unasked(tmp_path, capsys, monkeypatch):
    """A version registered for <root>/teacher_rl/model pins that stage's manifest: it resolves while the files
    are the registered ones; a run that would retrain that stage into the same root refuses (one line, exit 2)
    unless the operator passes --overwrite-registered; once overwritten, models:/ refuses to resolve the
    version (one line, exit 2) instead of handing out the new weights under the old version number."""
    from mlflow import MlflowClient

    from stages import artifacts, lineage
    from stages.cli import main
    from stages.config import TinyArch, Tracking
    from stages.models import char_tokenizer, save, tiny_qwen3
    from stages.tracking import Tracker

    monkeypatch.setenv("TQDM_DISABLE", "1")
    root = str(tmp_path / "root")
    tok = char_tokenizer()
    base = tmp_path / "base"
    save(tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, 0), tok, base)
    work = tmp_path / "work"
    save(tiny_qwen3(TinyArch(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32), tok, 1), tok, work / "model")
    stage, uri = f"{root}/teacher_rl", f"{root}/teacher_rl/model"
    manifest = artifacts.publish(work, stage, {"stage": "teacher_rl", "config_hash": "registered", "outputs": {"model": uri}})
    t = Tracker(Tracking(experiment="pin"))
    t.reconcile(manifest, stage, root)
    mv = t.call("register", lambda c: lineage.register(c, t.experiment(c), "s2d-teacher", uri, {"s2d.root": root}))
    assert mv is not None and mv.tags[lineage.MANIFEST_TAG] == artifacts.manifest_sha256(stage)
    assert lineage.resolve_model_uri("models:/s2d-teacher/1") == uri

    sets = [a for o in ["tracking.experiment=pin", "teacher_rl.steps=2", "teacher_rl.prompts_per_step=2",
                        "teacher_rl.group_size=2", "eval.problems=4", "eval.samples=1", "eval.greedy=false",
                        "task.sizes={teacher_rl: 50, eval: 10, prompts: 10, bootstrap: 10, student_rl: 10}",
                        "checkpoint_every=100"] for a in ("--set", o)]
    cmd = ["teacher_rl", "--config", "tiny", "--root", root, "--teacher", str(base), *sets]
    rc = main(cmd)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"{stage} holds the checkpoint of registered model version s2d-teacher/1" in lines[0]
    assert "--overwrite-registered" in lines[0] and "Loading" not in err
    assert artifacts.manifest_sha256(stage) == mv.tags[lineage.MANIFEST_TAG]  # untouched
    runs = MlflowClient().search_runs([t.experiment_id], "tags.`s2d.stage` = 'teacher_rl'")
    assert len(runs) == 1  # the registered one: the refused run started none

    monkeypatch.delenv("S2D_OVERWRITE_REGISTERED", raising=False)
    rc = main([*cmd, "--overwrite-registered"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert artifacts.read_manifest(stage)["config_hash"] != "registered"
    with pytest.raises(ValueError, match=r"^models:/s2d-teacher/1: .*teacher_rl/model was republished .* refusing"):
        lineage.resolve_model_uri("models:/s2d-teacher/1")
    monkeypatch.delenv("S2D_OVERWRITE_REGISTERED", raising=False)
    rc = main(["kl_warmup", "--config", "tiny", "--root", str(tmp_path / "r2"), "--teacher", "models:/s2d-teacher/1",
               "--student", str(base), "--set", "tracking.experiment=pin"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: models:/s2d-teacher/1: "), err[-2000:]
    assert "was republished" in err and "Traceback" not in err
