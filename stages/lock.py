"""One writer per stage folder: :class:`StageLock` (``flock`` locally, a leased object on S3), and the fence
every write into a stage folder passes (:func:`fence`).

Faults it survives (tests/test_faults.py): a killed holder never blocks the next run (the kernel drops a
``flock``; an S3 lease lapses), a retry of the same Airflow task waits out its own killed try's lease,
two takers of a stale lease cannot both win (compare-and-swap), a holder stalled past its lease (SIGSTOP,
a paused VM) whose lock was taken over fails at its next write instead of overwriting the new holder's
files, a renewal whose answer was lost is recognised as our own (owner id) instead of as a takeover.
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
    LockLost,
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
# the locks this process holds, by stage URI: artifacts.publish / save_state / clear_state fence on them
_HELD: dict[str, "StageLock"] = {}
_HELD_MU = threading.Lock()


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


def fence(uri: str) -> None:
    """Before any write under ``uri``: raise :class:`LockLost` unless every lock this process holds on a stage
    folder containing ``uri`` is still its own (see :meth:`StageLock.check`). No lock held: nothing to check."""
    uri = uri.rstrip("/")
    with _HELD_MU:
        held = [lk for s, lk in _HELD.items() if uri == s or uri.startswith(s + "/")]
    for lk in held:
        lk.check()


def lock_store(lease_s: float) -> S3Store:
    """The store the lock's own calls go through: single attempt (a conditional PUT is never retried blindly:
    a retry of a PUT that succeeded would get 412 and read as a takeover) and one call bounded by a sixth of
    the lease (connect + read timeout of ``lease/12`` each), so a renewal that hangs ends well before the next
    one is due (every third of the lease) and the lease sees several tries before it lapses."""
    base = float(os.environ.get("S2D_S3_TIMEOUT_S", "15"))
    timeout = max(1.0, min(base, lease_s / 12))
    return S3Store(max_attempts=0, timeout_s=timeout, deadline_s=timeout)  # botocore: 0 retries = one attempt


class StageLock:
    """Exclusive right to write ``<stage_uri>/``: a second run of the same stage into the same root refuses.

    Local (and shared file systems): ``flock`` on ``<stage>/.lock``, released by the kernel when the holder
    dies, so a killed run never blocks the next one. S3: a ``.lock`` object created with a conditional PUT
    (``If-None-Match: *``) and renewed by a heartbeat thread (``If-Match``) every third of its lease
    (``S2D_LOCK_LEASE_S``, default 120 s); a lock whose heartbeat is older than its lease belongs to a
    dead run and is taken over (again a compare-and-swap, so two takers cannot both win). The heartbeat's
    age is read from the server's clock (``Date`` minus ``LastModified``), so client clocks need not agree.

    Fencing (S3): every write into the stage folder first calls :meth:`check` (through :func:`fence`). It
    fails with :class:`LockLost` when the heartbeat found the lock taken over, or when the last confirmed
    renewal is older than the heartbeat's schedule allows (the process was stopped: SIGSTOP, a paused VM,
    a long GC) and an immediate renewal shows it is no longer ours or cannot confirm it within the lease.
    A renewal answered 412 re-reads the lock: our own owner id there means our previous PUT did land (its
    answer was lost), so the lock is kept. Each lock call is one attempt bounded by a sixth of the lease
    (:func:`lock_store`); a heartbeat that fails for any reason other than a storage error marks the lock
    lost (it never dies silently).

    A retry of the same Airflow task (same DAG, run and task id, from ``AIRFLOW_CTX_*``, which every
    runner sets) finding the lock of its own previous try waits for that try's lease to lapse instead of
    failing: a try killed with SIGKILL (a container killed, a node lost) cannot release it, and only one
    try of a task runs at a time. A previous try that still renews its lease (a zombie) is never taken
    over: after ``1.25 x lease`` the retry fails like any second writer. ``S2D_LOCK_WAIT_S`` sets how long
    any writer waits for a held lock (default 0 for other runs, the above for the same task; a local
    ``flock`` waits only when it is set).
    """

    def __init__(self, stage_uri: str, lease_s: float | None = None):
        self.uri = join(stage_uri, LOCK)
        self.stage_uri = stage_uri.rstrip("/")
        self.lease_s = lease_s or _seconds("S2D_LOCK_LEASE_S", 120.0)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "owner": uuid.uuid4().hex,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        task = [os.environ.get(f"AIRFLOW_CTX_{k}") for k in ("DAG_ID", "DAG_RUN_ID", "TASK_ID")]
        if all(task):  # the Airflow task this process is a try of
            self.info["task"] = "/".join(task)
            self.info["try"] = os.environ.get("AIRFLOW_CTX_TRY_NUMBER")
        self._fd: int | None = None
        self._etag: str | None = None
        self._store: S3Store | None = None
        self._renewed = 0.0  # monotonic time the last confirmed renewal was SENT (a conservative view of the lease)
        self._mu = threading.Lock()  # one renewal at a time (heartbeat thread / a fence)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.lost_why = ""

    def _held_error(self, holder: dict) -> LockHeld:
        return LockHeld(f"{self.stage_uri} is being written by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}); wait for it to finish or stop it")

    def acquire(self) -> "StageLock":
        if isinstance(store_for(self.uri), S3Store):
            self._store = lock_store(self.lease_s)
            self._acquire_s3(self._store)
        else:
            self._acquire_local(LocalStore._p(self.uri))
        with _HELD_MU:
            _HELD[self.stage_uri] = self
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
        deadline = time.monotonic() + (_seconds("S2D_LOCK_WAIT_S", 0.0) if os.environ.get("S2D_LOCK_WAIT_S") else 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
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

    def _ours(self, store: "S3Store") -> str | None:
        """After a 412: the lock object's ETag when it holds OUR owner id (our earlier PUT landed, its answer
        was lost), else None (another run's)."""
        found = store.read_with_etag(self.uri)
        if found is None:
            return None
        try:
            owner = json.loads(found[0]).get("owner")
        except (ValueError, AttributeError):
            return None
        return found[1] if owner == self.info["owner"] else None

    def _acquire_s3(self, store: "S3Store") -> None:
        sent = time.monotonic()
        try:
            etag = store.create_if_absent(self.uri, self._body()) or self._ours(store)
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
                sent = time.monotonic()
                etag = store.create_if_absent(self.uri, self._body()) or self._ours(store)
                if etag is None:
                    raise self._held_error({"pid": "?", "host": "another host", "since": "just now"})
                break
            try:
                holder = json.loads(found[0])
                age = found[2]  # since its last heartbeat, by the server's clock
                lease = float(holder.get("lease_s", self.lease_s))
            except (ValueError, KeyError, TypeError, AttributeError):
                holder, age, lease = {}, float("inf"), 0.0  # unreadable: nobody can renew it
            if age > lease:
                log.warning("%s: taking over the lock of pid %s on %s (no heartbeat for %.0f s > lease %.0f s)",
                            self.stage_uri, holder.get("pid"), holder.get("host"), age, lease)
                sent = time.monotonic()
                etag = store.replace_if(self.uri, self._body(), found[1]) or self._ours(store)
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
        self._etag, self._renewed = etag, sent
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="s2d-lock-heartbeat")
        self._thread.start()

    # ---------------------------------------------------------------- renewal and fencing
    @property
    def _call_bound(self) -> float:
        """The longest one lock call can take: connect + read timeout."""
        return 2 * self._store.timeout_s if self._store is not None else 0.0

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost, self.lost_why = True, why
            log.error("%s: lost the stage lock (%s); this run writes nothing more there", self.stage_uri, why)

    def _renew(self) -> None:
        """One renewal (If-Match on the last ETag). Sets ``lost`` when the lock is another run's, when no
        renewal has been confirmed for a whole lease, or on any unexpected error; never raises."""
        with self._mu:
            if self.lost or self._store is None:
                return
            sent = time.monotonic()
            try:
                etag = self._store.replace_if(self.uri, self._body(), self._etag) or self._ours(self._store)
            except ArtifactError as e:  # a blip: the lease has slack for more tries, unless it is spent
                if time.monotonic() - self._renewed > self.lease_s:
                    self._lose(f"no renewal confirmed for {time.monotonic() - self._renewed:.0f} s > lease "
                               f"{self.lease_s:g} s; last error: {e}")
                else:
                    log.warning("%s: lock heartbeat failed: %s", self.stage_uri, e)
                return
            except Exception as e:  # noqa: BLE001 - the heartbeat must never die silently
                self._lose(f"heartbeat failed: {type(e).__name__}: {e}")
                return
            if etag is None:
                self._lose("taken over by another run after a missed lease")
                return
            self._etag, self._renewed = etag, sent

    def _heartbeat(self) -> None:
        try:
            while True:
                due = self._renewed + self.lease_s / 3 - time.monotonic()
                # on schedule: at the next third of the lease; late (a failed try): again soon
                if self._stop.wait(due if due > 0 else self.lease_s / 12):
                    return
                self._renew()
                if self.lost:
                    return
        except BaseException as e:  # noqa: BLE001 - whatever kills the thread marks the lock lost, loudly
            self._lose(f"heartbeat thread died: {type(e).__name__}: {e}")

    def check(self) -> None:
        """Raise :class:`LockLost` unless the lock is still ours (call before every write into the folder).

        A ``flock`` is ours until this process dies. An S3 lease: not marked lost by the heartbeat, and either
        renewed on schedule (within a third of the lease plus one call) or renewed right now; a renewal that
        cannot be confirmed before the lease would lapse is a loss too (another run may already write)."""
        if self._store is None or self._thread is None:
            return  # flock, or an endpoint without conditional writes (unlocked, warned at acquire)
        if not self.lost and time.monotonic() - self._renewed > self.lease_s / 3 + self._call_bound:
            self._renew()  # we may have been stopped: confirm before writing
            if not self.lost and time.monotonic() - self._renewed > self.lease_s - self._call_bound:
                self._lose(f"cannot confirm the lease: last renewal {time.monotonic() - self._renewed:.0f} s ago "
                           f"(lease {self.lease_s:g} s)")
        if self.lost:
            raise LockLost(f"{self.stage_uri}: this run lost its stage lock ({self.lost_why}); it stops without "
                           "writing anything more there (another run may be publishing the stage)")

    def release(self) -> None:
        with _HELD_MU:
            if _HELD.get(self.stage_uri) is self:
                del _HELD[self.stage_uri]
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
                    self._store.delete_if(self.uri, self._etag)

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
