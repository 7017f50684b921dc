"""Fault injection: what breaks around a stage (storage, processes, numbers) and what must hold anyway.

Every test asserts the behaviour users expect AND that nothing published is wrong: a manifest only
ever names complete files with the right checksums, a failure never publishes, and a retry works.

    PYTHONPATH=$PWD python -m pytest -q tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import artifacts

REPO = Path(__file__).resolve().parents[1]


def _check_published(stage_uri: str) -> dict | None:
    """The stage's manifest, after checking every file it lists is there with its checksum (or None)."""
    m = artifacts.read_manifest(stage_uri)
    if m is not None:
        for sub in {rel.split("/")[0] for rel in m["files"]}:
            artifacts.fetch(artifacts.join(stage_uri, sub))
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
    artifacts._S3.clear()


def test_stalled_s3_endpoint_is_a_clear_error_within_the_deadline(stalled_endpoint, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(artifacts.ArtifactError) as e:
        artifacts.read_manifest("s3://bucket/runs/r1/teacher_rl")
    took = time.monotonic() - t0
    msg = str(e.value)
    assert stalled_endpoint in msg and "s3://bucket/runs/r1/teacher_rl/manifest.json" in msg and "S2D_S3_DEADLINE_S" in msg
    assert took < 30, f"a 3 s deadline took {took:.0f} s"  # botocore's defaults take ~8 min
    # uploads too (the transfer manager's worker threads)
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(artifacts.ArtifactError, match="s3://bucket/k/w.bin.*upload failed"):
        artifacts.store_for("s3://bucket/k").put_file(f, "s3://bucket/k/w.bin")


def test_stalled_s3_endpoint_stage_command_exits_with_one_line(stalled_endpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "S2D_S3_DEADLINE_S": "2"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "stages", "teacher_rl", "--config", "tiny", "--root", "s3://bucket/runs/x",
                        "--set", "tracking.enabled=false"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and stalled_endpoint in last and "manifest.json" in last
    assert time.monotonic() - t0 < 100
