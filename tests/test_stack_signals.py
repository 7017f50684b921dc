"""However a person or a supervisor stops `make stack`, nothing is left: no process of
infra/local-stack.sh, of Airflow or of MLflow, both ports free.

Each case starts a real `make stack` (the repository's Makefile and infra/local-stack.sh) in its own
session, the way a person or a supervisor does, and stops it one way: TERM, INT, HUP, QUIT or KILL to
the make process alone, Ctrl-C (INT to the terminal's foreground process group), and closing the
terminal (an interactive bash in a pseudo-terminal runs `make stack`; the terminal's master side is
closed). The Airflow and MLflow commands are stand-ins (a venv whose ``airflow`` and ``mlflow``
answer the health checks like the real ones and leave the process shapes the real ones leave: a worker
that ignores TERM, like the scheduler's executor workers, and one that left the process tree in a
new session), so every case takes seconds; tests/test_browser.py stops the real stack by TERM to make.
"""

import fcntl
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
if sys.platform != "linux":
    pytest.skip("the stack's process tracking reads /proc", allow_module_level=True)

STUB = r'''#!{python}
"""Stand-in for `{name}`: serves the health check on --port, leaves the process shapes of the real one."""
import http.server, json, os, signal, subprocess, sys, time

args = sys.argv[1:]
if args[:1] in (["db"], ["pools"]):
    time.sleep(0.2)
    sys.exit(0)


def child(code):
    return subprocess.Popen([sys.executable, "-c", code])


# a worker that ignores TERM (the scheduler's executor workers do), and one that left the tree: a new
# session, re-parented to init by a double fork (what a daemonizing helper does)
child("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)")
child("import os, time\nos.setsid()\nif os.fork(): os._exit(0)\ntime.sleep(3600)")
if "--port" in args:
    port = int(args[args.index("--port") + 1])
    if args[0] == "api-server":
        home = os.environ["AIRFLOW_HOME"]
        with open(os.path.join(home, "simple_auth_manager_passwords.json.generated"), "w") as f:
            json.dump({{"admin": "stub"}}, f)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{{}}")

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
time.sleep(3600)
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    d = tmp_path_factory.mktemp("venv")
    (d / "bin").mkdir()
    for name in ("airflow", "mlflow"):
        f = d / "bin" / name
        f.write_text(STUB.format(python=sys.executable, name=name))
        f.chmod(0o755)
    (d / "bin" / "python").symlink_to(sys.executable)
    (d / ".installed").touch()
    return d


def marked(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment holds the test's mark."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if f"S2D_TEST_MARK={mark}".encode() in (p / "environ").read_bytes().split(b"\0"):
                if (p / "stat").read_text().split(") ", 1)[1][0] != "Z":
                    out.append(int(p.name))
        except OSError:
            continue
    return out


def port_free(port: int) -> bool:
    """Nothing listens there: a server can bind it (with SO_REUSEADDR, as servers do: the health checks'
    closed connections may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def make_env(d: Path, venv: Path, mark: str, ap: int, mp: int) -> tuple[list[str], dict]:
    home = d / "airflow"
    home.mkdir()
    (home / ".ready").touch()
    env = {"HOME": str(d), "PATH": "/usr/bin:/bin", "S2D_TEST_MARK": mark, "AIRFLOW_PORT": str(ap),
           "MLFLOW_PORT": str(mp), "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db", "MLFLOW_ARTIFACTS": str(d / "mlruns"),
           "S2D_ARTIFACT_BASE": str(d / "runs"), "STARTUP_TIMEOUT": "60", "TERM": "dumb"}
    # -o: the stand-in venv is never (re)installed
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "-o", f"{venv}/.installed", "stack", f"VENV={venv}",
           f"AIRFLOW_HOME={home}", f"S2D_WORKDIR={d}"]
    return cmd, env


def wait_ready(d: Path, alive, log) -> None:
    ready = d / "airflow" / "stack-logs" / "ready"
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert alive(), log()
        assert time.monotonic() < deadline, log()
        time.sleep(0.2)
    time.sleep(1)  # the workers of the stand-ins are started


WAYS = ["TERM to make", "INT to make", "HUP to make", "QUIT to make", "KILL to make", "Ctrl-C", "terminal closed"]


@pytest.mark.parametrize("way", WAYS)
def test_make_stack_stops_every_way(way, venv, tmp_path):
    mark = uuid.uuid4().hex
    ap, mp = free_port(), free_port()
    cmd, env = make_env(tmp_path, venv, mark, ap, mp)
    t0 = time.monotonic()
    if way == "terminal closed":  # a person's terminal: an interactive bash in a pty runs make; the window closes
        master, slave = pty.openpty()

        def ctty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        proc = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], stdin=slave, stdout=slave, stderr=slave, env=env,
                                preexec_fn=ctty, cwd=tmp_path)
        os.close(slave)
        os.write(master, (" ".join(cmd) + " >stack.log 2>&1\n").encode())
        log = (tmp_path / "stack.log")
        alive = lambda: proc.poll() is None  # noqa: E731
    else:
        log = tmp_path / "stack.log"
        proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        alive = lambda: proc.poll() is None  # noqa: E731
    try:
        _stop(way, proc, alive, log, tmp_path, mark, ap, mp, t0, master if way == "terminal closed" else None)
    finally:  # a failed case leaves nothing behind either
        for p in marked(mark):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def _stop(way, proc, alive, log, tmp_path, mark, ap, mp, t0, master):
    wait_ready(tmp_path, alive, lambda: log.read_text()[-3000:] if log.exists() else "no log")
    before = marked(mark)
    titles = subprocess.run(["ps", "-ww", "-o", "args=", "-p", ",".join(map(str, before))], capture_output=True, text=True).stdout
    assert "local-stack.sh" in titles and "api-server" in titles and "mlflow" in titles, titles
    assert not port_free(ap) and not port_free(mp)

    if way == "terminal closed":
        os.close(master)
    elif way == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, getattr(signal, "SIG" + way.split()[0]))
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.3)
    print(f"{way}: {len(before)} processes, all gone {time.monotonic() - t0:.1f} s after the start")
    assert not left, subprocess.run(["ps", "-ww", "-o", "pid,ppid,pgid,sid,args", "-p", ",".join(map(str, left))],
                                    capture_output=True, text=True).stdout + log.read_text()[-2000:]
    assert port_free(ap) and port_free(mp)
