"""Alerts reach a person (issue 28 item 4): a failed run, a refused trigger, a kept champion (a failed gate), a
pending approval and a missed schedule slot, by e-mail (the SMTP provider's hook, through an Airflow connection)
and by webhook, received by a local SMTP sink and a local HTTP sink on 127.0.0.1. The last test runs real DAG
runs (``dag.test``): the DAG's failure callback sends them."""

import json
import os
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("airflow", reason="the DAG tests need the 'airflow' extra")
pytest.importorskip("airflow.providers.smtp")

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


class _SMTP(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: every message's envelope and data go to ``server.mails``."""

    def handle(self):
        self.wfile.write(b"220 sink ESMTP\r\n")
        mail = {"to": []}
        while True:
            line = self.rfile.readline(65536)
            if not line:
                return
            cmd = line.decode(errors="replace").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.wfile.write(b"250-sink\r\n250 8BITMIME\r\n")
            elif verb == "MAIL":
                mail["from"] = cmd.split(":", 1)[1].strip()
                self.wfile.write(b"250 OK\r\n")
            elif verb == "RCPT":
                mail["to"].append(cmd.split(":", 1)[1].strip().strip("<>"))
                self.wfile.write(b"250 OK\r\n")
            elif verb == "DATA":
                self.wfile.write(b"354 go on\r\n")
                data = []
                while (chunk := self.rfile.readline(65536)) not in (b".\r\n", b".\n", b""):
                    data.append(chunk)
                mail["data"] = b"".join(data).decode(errors="replace")
                self.server.mails.append(mail)
                mail = {"to": []}
                self.wfile.write(b"250 queued\r\n")
            elif verb == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 OK\r\n")


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def sinks(monkeypatch):
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTP)
    smtp.daemon_threads, smtp.mails = True, []
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    http.posts = []
    threads = [threading.Thread(target=srv.serve_forever, daemon=True) for srv in (smtp, http)]
    for t in threads:
        t.start()
    env = {"S2D_ALERT_EMAILS": "oncall@example.org,lead@example.org", "S2D_ALERT_SMTP_CONN_ID": "s2d_smtp",
           "AIRFLOW_CONN_S2D_SMTP": json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.server_address[1],
                                                "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0,
                                                          "from_email": "s2d@example.org", "timeout": 10}}),
           "S2D_ALERT_WEBHOOK": f"http://127.0.0.1:{http.server_address[1]}/hook?token=secret", "S2D_ALERT_TIMEOUT_S": "10"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(DAGS))
    yield {"mails": smtp.mails, "posts": http.posts, "env": env}
    for srv in (smtp, http):
        srv.shutdown()
        srv.server_close()


class _Run:
    dag_id, run_id = "sparse_to_dense", "scheduled__2026-12-01T03:00:00+00:00"

    def __init__(self, run_type="scheduled", run_after=None):
        self.run_type, self.run_after, self.logical_date = run_type, run_after, run_after


def test_every_event_reaches_mail_and_webhook(sinks, monkeypatch):
    import datetime

    import s2d_alerts as alerts
    import s2d_schedules
    from airflow.sdk.exceptions import AirflowSkipException

    # a kept champion (the gate failed) and a pending approval: promote's post-execute hook, dict or printed text
    kept = {"stage": "promote", "status": "kept", "version": "4", "champion": "2",
            "comparison": "Promotion gate: avg@16 on eval\n  decision: kept: the lower end ... does not exceed margin"}
    alerts.gate_outcome({"dag_run": _Run()}, kept)
    alerts.gate_outcome({"dag_run": _Run()}, "log\n" + json.dumps({**kept, "status": "awaiting approval", "version": "5"}))
    alerts.gate_outcome({"dag_run": _Run()}, {**kept, "status": "promoted"})  # nothing to say
    # a missed schedule slot: plan's pre-execute hook sends it, then skips the run
    now = datetime.datetime.now(datetime.timezone.utc)
    with pytest.raises(AirflowSkipException, match="missed slot"):
        s2d_schedules.skip_missed_slot({"dag_run": _Run("scheduled", now - datetime.timedelta(hours=3))})
    posts, mails = sinks["posts"], sinks["mails"]
    assert [p["event"] for p in posts] == ["gate_failed", "approval_needed", "missed_slot"]
    assert posts[0]["subject"] == "[s2d] sparse_to_dense: the new student was not promoted (version 4)"
    assert "does not exceed margin" in posts[0]["text"] and posts[0]["champion"] == "2" and posts[0]["run_id"] == _Run.run_id
    assert "Required actions" in posts[1]["text"] and "missed slot" in posts[2]["text"]
    assert len(mails) == 3 and all(m["to"] == ["oncall@example.org", "lead@example.org"] for m in mails)
    assert "Subject: [s2d] sparse_to_dense: the new student was not promoted (version 4)" in mails[0]["data"]
    assert "s2d@example.org" in mails[0]["from"]
    # only the events the deployment wants; a channel that does not answer costs a warning, never an error
    monkeypatch.setenv("S2D_ALERT_EVENTS", "run_failed")
    alerts.gate_outcome({"dag_run": _Run()}, kept)
    assert len(posts) == 3
    monkeypatch.setenv("S2D_ALERT_WEBHOOK", "http://127.0.0.1:9/nothing-listens")
    out = alerts.notify("run_failed", "x", "y")
    assert out["email"] == "sent" and out["webhook"].startswith("URLError") and "nothing-listens" not in out["webhook"]


def test_failed_run_and_refused_trigger_through_real_dag_runs(sinks, tmp_path):
    """``dag.test`` (the real task runner, SQLite): a refused trigger and a run whose stage command cannot start
    both fail; the DAG's failure callback tells them apart."""
    home = tmp_path / "airflow"
    env = {**os.environ, **sinks["env"], "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "S2D_ARTIFACT_BASE": str(tmp_path / "runs"), "S2D_WORKDIR": str(tmp_path),
           "S2D_STAGE_PYTHON": "/nonexistent/python", "S2D_RETRY_DELAY_S": "0"}
    env.pop("PYTHONPATH", None)
    assert subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                          capture_output=True, timeout=300).returncode == 0
    code = f"""
import json, sys
sys.path.insert(0, {str(DAGS)!r})
from airflow.dag_processing.dagbag import DagBag
for conf in json.loads(sys.argv[1]):
    dag = DagBag(dag_folder={str(DAGS)!r}).dags["sparse_to_dense"]
    dr = dag.test(run_conf=conf)
    print("RESULT " + str(dr.state), flush=True)
"""
    confs = [{"overrides": ["task.kind=evil.module:factory"]}, {"preset": "tiny"}]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(confs)], env=env, capture_output=True, text=True, timeout=900)
    assert [x.split("RESULT ", 1)[1] for x in proc.stdout.splitlines() if "RESULT " in x] == ["failed", "failed"], \
        (proc.stdout + proc.stderr)[-5000:]
    posts = sinks["posts"]
    assert [p["event"] for p in posts] == ["trigger_refused", "run_failed"], (posts, proc.stderr[-3000:])
    assert "task.kind" in posts[0]["text"] and posts[0]["subject"] == "[s2d] sparse_to_dense: trigger refused"
    # the stage command cannot start: plan fails, and the teardown after it (the task that failed last)
    assert posts[1]["subject"] == "[s2d] sparse_to_dense: run failed" and posts[1]["last_failed_task"] in ("plan", "close-runs")
    assert [m["data"].count("Subject: [s2d] sparse_to_dense") for m in sinks["mails"]] == [1, 1]
