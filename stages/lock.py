"""One writer per stage folder: :class:`StageLock` (``flock`` locally, a leased object on S3).

Faults it survives (tests/test_faults.py): a killed holder never blocks the next run (the kernel drops a
``flock``; an S3 lease lapses), a retry of the same Airflow task waits out its own killed try's lease,
two takers of a stale lease cannot both win (compare-and-swap).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .storage import (
    ArtifactError,
    LocalStore,
    LockHeld,
    NotWritable,
    S3Store,
    StorageUnavailable,
    dumps,
    join,
    log,
    store_for,
    sweep_tmp,
    tmp_name,
)

LOCK = ".lock"


def _seconds(var: str, default: float) -> float:
    """A duration setting from the environment; a bad value is an error naming the variable."""
    raw = os.environ.get(var) or str(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{var}={raw!r}: expected a number of seconds >= 0")
    return value


class StageLock:
    """Exclusive right to write ``<stage_uri>/``: a second run of the same stage into the same root refuses.

    Local (and shared file systems): ``flock`` on ``<stage>/.lock``, released by the kernel when the holder
    dies, so a killed run never blocks the next one. S3: a ``.lock`` object created with a conditional PUT
    (``If-None-Match: *``) and renewed by a heartbeat thread (``If-Match``) every third of its lease
    (``S2D_LOCK_LEASE_S``, default 120 s); a lock whose heartbeat is older than its lease belongs to a
    dead run and is taken over (again a compare-and-swap, so two takers cannot both win). The heartbeat's
    age is read from the server's clock (``Date`` minus ``LastModified``), so client clocks need not agree.

    A retry of the same Airflow task (same DAG, run and task id, from ``AIRFLOW_CTX_*``, which every
    runner sets) finding the lock of its own previous try waits for that try's lease to lapse instead of
    failing: a try killed with SIGKILL (a container killed, a node lost) cannot release it, and only one
    try of a task runs at a time. A previous try that still renews its lease (a zombie) is never taken
    over: after ``1.25 x lease`` the retry fails like any second writer. ``S2D_LOCK_WAIT_S`` sets how long
    any writer waits for a held lock (default 0 for other runs, the above for the same task).
    """

    def __init__(self, stage_uri: str, lease_s: float | None = None):
        self.uri = join(stage_uri, LOCK)
        self.stage_uri = stage_uri
        self.lease_s = lease_s or _seconds("S2D_LOCK_LEASE_S", 120.0)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "owner": uuid.uuid4().hex,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        task = [os.environ.get(f"AIRFLOW_CTX_{k}") for k in ("DAG_ID", "DAG_RUN_ID", "TASK_ID")]
        if all(task):  # the Airflow task this process is a try of
            self.info["task"] = "/".join(task)
            self.info["try"] = os.environ.get("AIRFLOW_CTX_TRY_NUMBER")
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _held_error(self, holder: dict) -> LockHeld:
        return LockHeld(f"{self.stage_uri} is being written by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}); wait for it to finish or stop it")

    def acquire(self) -> "StageLock":
        store = store_for(self.uri)
        if isinstance(store, S3Store):
            self._acquire_s3(store)
        else:
            self._acquire_local(LocalStore._p(self.uri))
        return self

    def _acquire_local(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            probe = path.with_name(tmp_name("write-probe"))  # the lock file may exist from a writable past
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise NotWritable(f"artifact folder {path.parent} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = {}
            with contextlib.suppress(ValueError, OSError):
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            os.close(fd)
            raise self._held_error(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, dumps(self.info).encode(), 0)
        self._fd = fd
        sweep_tmp(path.parent, all_of_them=True)  # we are the only writer now: any temporary is stale

    def _body(self) -> bytes:
        return dumps({**self.info, "heartbeat": time.time(), "lease_s": self.lease_s}).encode()

    def _patience(self, holder: dict, lease: float) -> float:
        """How long to wait for a held lock to be released or to lapse."""
        if os.environ.get("S2D_LOCK_WAIT_S"):
            return _seconds("S2D_LOCK_WAIT_S", 0.0)
        same_task = self.info.get("task") and holder.get("task") == self.info["task"]
        return 1.25 * lease + 5 if same_task else 0.0

    def _acquire_s3(self, store: "S3Store") -> None:
        try:
            etag = store.create_if_absent(self.uri, self._body())
        except StorageUnavailable as e:
            if "NotImplemented" not in str(e):
                raise
            # an S3-compatible server without conditional writes: run unlocked rather than not at all
            log.warning("%s: the endpoint does not support conditional writes; no stage lock", self.stage_uri)
            return
        deadline = None
        while etag is None:
            found = store.read_with_etag(self.uri)
            if found is None:  # released in between
                etag = store.create_if_absent(self.uri, self._body())
                if etag is None:
                    raise self._held_error({"pid": "?", "host": "another host", "since": "just now"})
                break
            try:
                holder = json.loads(found[0])
                age = found[2]  # since its last heartbeat, by the server's clock
                lease = float(holder.get("lease_s", self.lease_s))
            except (ValueError, KeyError, TypeError):
                holder, age, lease = {}, float("inf"), 0.0  # unreadable: nobody can renew it
            if age > lease:
                log.warning("%s: taking over the lock of pid %s on %s (no heartbeat for %.0f s > lease %.0f s)",
                            self.stage_uri, holder.get("pid"), holder.get("host"), age, lease)
                etag = store.replace_if(self.uri, self._body(), found[1])
                if etag is None:
                    raise self._held_error({"pid": "?", "host": "another host", "since": "just now"})
                break
            if deadline is None:
                deadline = time.monotonic() + self._patience(holder, lease)
                if time.monotonic() < deadline:
                    log.warning("%s: held by %s (pid %s on %s, heartbeat %.0f s ago); waiting up to %.0f s for it to "
                                "end or its lease to lapse", self.stage_uri,
                                f"try {holder.get('try')} of this task" if holder.get("task") == self.info.get("task")
                                else "another run", holder.get("pid"), holder.get("host"), age, deadline - time.monotonic())
            if time.monotonic() >= deadline:
                raise self._held_error(holder)
            time.sleep(max(0.5, min(5.0, lease - age + 1, deadline - time.monotonic())))
        self._etag = etag
        self._thread = threading.Thread(target=self._heartbeat, args=(store,), daemon=True, name="s2d-lock-heartbeat")
        self._thread.start()

    def _heartbeat(self, store: "S3Store") -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                etag = store.replace_if(self.uri, self._body(), self._etag)
            except ArtifactError as e:  # a blip: the lease has slack for two more tries
                log.warning("%s: lock heartbeat failed: %s", self.stage_uri, e)
                continue
            if etag is None:
                self.lost = True
                log.error("%s: lost the stage lock (taken over by another run after a missed lease)", self.stage_uri)
                return
            self._etag = etag

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if not self.lost:
                with contextlib.suppress(ArtifactError):
                    store_for(self.uri).delete_if(self.uri, self._etag)

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
