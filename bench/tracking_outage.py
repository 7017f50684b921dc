"""What an MLflow outage costs a stage, and the lineage the registry gives back.

    python bench/tracking_outage.py [--out DIR]

1. The same stage command (``bootstrap``, small test settings) three times: tracking server up, a port
   where nothing listens, a socket that accepts and never answers. Wall time of each, as a ratio to
   "up" (measured in this command), and the time from the manifest's publication to the command's exit
   (what tracking adds to publishing). The outage runs must still publish.
2. The whole workflow on a real ``mlflow server``, then the lineage a user reads from the registered
   final-student version alone, printed as ``MlflowClient`` returns it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import TEST_OVERRIDES, free_port, wait_http  # noqa: E402

BIN = Path(sys.executable).parent
OVERRIDES = [o for o in TEST_OVERRIDES if not o.startswith("tracking.")] + ["tracking.experiment=bench"]


def mlflow_server(d: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--serve-artifacts",
                          "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                          "--workers", "1"], env=env, stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=180)
    return p, url


def hung_socket() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(sock.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def stage(cmd: str, root: Path, uri: str) -> tuple[float, float]:
    """(command wall time, seconds from the manifest's publication to the command's exit: MLflow's share
    of publishing, the reconcile included)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [sys.executable, "-m", "stages", cmd, "--config", "tiny", "--root", str(root),
            *[a for o in OVERRIDES for a in ("--set", o)]]
    t0 = time.perf_counter()
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    dt, end = time.perf_counter() - t0, datetime.now(timezone.utc)
    if r.returncode != 0 or not (root / cmd / "manifest.json").exists():
        raise SystemExit(f"error: {cmd} with tracking at {uri} did not publish:\n{r.stderr[-3000:]}")
    published = datetime.fromisoformat(json.loads((root / cmd / "manifest.json").read_text())["published_at"])
    return dt, (end - published).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="folder for tracking_outage.json (default: none)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s2d-tracking-bench-"))
    server, url = mlflow_server(work)
    try:
        times = {"up": stage("bootstrap", work / "up", url),
                 "nothing listening": stage("bootstrap", work / "down", f"http://127.0.0.1:{free_port()}"),
                 "hung socket": stage("bootstrap", work / "hung", hung_socket())}
        print("| tracking server | bootstrap command wall time (s) | ratio to up | manifest -> exit (s) |\n|---|---|---|---|")
        for k, (v, tail) in times.items():
            print(f"| {k} | {v:.1f} | {v / times['up'][0]:.2f} | {tail:.1f} |")

        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
               "AIRFLOW_CTX_DAG_ID": "sparse_to_dense", "AIRFLOW_CTX_DAG_RUN_ID": "manual__bench"}
        subprocess.run([sys.executable, "-m", "stages", "workflow", "--config", "tiny", "--root", str(work / "wf"),
                        *[a for o in OVERRIDES for a in ("--set", o)]], env=env, check=True, capture_output=True, timeout=3600)
        from mlflow import MlflowClient

        c = MlflowClient(url)
        mv = c.get_model_version("s2d-student", "1")
        run = c.get_run(mv.run_id)
        lineage = {"version": {"name": mv.name, "version": mv.version, "source": mv.source, "run_id": mv.run_id,
                               "model_id": mv.model_id, "tags": dict(sorted(mv.tags.items()))},
                   "run": {"name": run.info.run_name, "status": run.info.status,
                           "s2d tags": {k: v for k, v in sorted(run.data.tags.items()) if k.startswith("s2d.")},
                           "model inputs": [m.model_id for m in run.inputs.model_inputs],
                           "datasets": [f"{d.dataset.name}@{d.dataset.digest}" for d in run.inputs.dataset_inputs]}}
        chain, rid = [], mv.run_id
        while rid:  # walk the student's inputs back to the base model, run by run
            r = c.get_run(rid)
            out = r.data.tags.get("s2d.output.model") or r.data.tags.get("s2d.output.student")
            chain.append(f"{r.info.run_name} ({out} <- {r.data.tags.get('s2d.input.student', 'nothing: built here')})")
            rid = r.data.tags.get("s2d.input.student.run")
        lineage["student chain"] = chain
        print(json.dumps(lineage, indent=2))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "tracking_outage.json").write_text(json.dumps({"times_s": times, "lineage": lineage}, indent=2))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
