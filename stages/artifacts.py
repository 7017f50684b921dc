"""Artifact storage: where stages publish checkpoints, rollouts and manifests.

A stage publishes under ``<root>/<stage>/``: files first, ``manifest.json`` LAST. A folder without a
manifest is unfinished and never read. The manifest lists every file with its sha256; readers verify
them. Resumable training state lives under ``<root>/<stage>/_resume/`` and is versioned the same way
(``latest.json`` written last), so a kill at any moment leaves either the old state or the new one.

Backends are chosen by URI: a local path or ``file://`` (the embedded default) or ``s3://``.

Faults this module survives (tests/test_faults.py): a stalled S3 endpoint (bounded timeouts and a
total deadline per call), two runs of one stage (a lock per stage folder, local or on S3, that a
killed holder does not keep), a kill at any moment (stale ``.tmp-*`` files and scratch folders are
swept by the next run), a corrupted resume state (the previous state, or a fresh start, with a
warning), and non-finite metrics (every JSON written here is strict: NaN/inf become null).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path

MANIFEST = "manifest.json"
RESUME = "_resume"
LOCK = ".lock"
SCRATCH_PREFIX = "s2d-"

log = logging.getLogger("stages")


class ArtifactError(RuntimeError):
    """Missing, unfinished or corrupted artifact."""


class CorruptManifest(ArtifactError):
    """A manifest (or resume pointer) that is not this project's JSON."""


class StorageUnavailable(ArtifactError):
    """The store did not answer (timeouts, connection, server errors): retry later; nothing is known to be wrong."""


class NotWritable(ArtifactError):
    """The artifact root (or a stage folder in it) cannot be written."""


class LockHeld(ArtifactError):
    """Another live run holds the stage folder's lock."""


def finite(obj):
    """``obj`` with every NaN/inf float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON: non-finite floats as null, never the bare ``NaN`` that other parsers reject."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_name(name: str) -> str:
    """Name of an in-progress write next to ``name``; carries the writer's pid and host for :func:`sweep_tmp`."""
    return f".{name}.tmp-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}"


def sweep_tmp(folder: Path, all_of_them: bool = False) -> int:
    """Remove ``.tmp-*`` files left in ``folder`` (recursively) by killed writers: those of a dead pid on
    this host, or all of them when the caller holds the folder's lock. Returns how many were removed."""
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.rglob(".*.tmp-*"):
        pid, _, rest = p.name.rsplit(".tmp-", 1)[1].partition("-")
        dead = pid.isdigit() and rest.startswith(_HOST + "-") and not _pid_alive(int(pid))
        if p.is_file() and (all_of_them or dead):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    if n:
        log.warning("%s: removed %d unfinished temporary file(s) left by an interrupted run", folder, n)
    return n


def make_scratch(label: str) -> Path:
    """A private local scratch folder, named with this pid so the next run can sweep it if we are killed."""
    sweep_scratch()
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{label.replace('/', '-')}-{os.getpid()}-"))


def sweep_scratch(tmp: Path | None = None) -> int:
    """Remove scratch folders of processes that no longer run (kill -9 cannot clean up after itself)."""
    n = 0
    for p in (tmp or Path(tempfile.gettempdir())).glob(f"{SCRATCH_PREFIX}*-*-*"):
        pid = p.name.rsplit("-", 2)[-2]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    if n:
        log.warning("removed %d scratch folder(s) of killed runs from %s", n, tmp or tempfile.gettempdir())
    return n


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def uri_kind(uri: str) -> str:
    """What a checkpoint or artifact URI names: ``s3`` (``s3://bucket/key``), ``local`` (a path or
    ``file://``), ``hub`` (a Hugging Face hub id ``org/name`` that is not a local path), ``registry`` (``models:/<name>/<version>``
    or ``@<alias>``, an MLflow registered version), or ``unsupported``."""
    if uri.startswith("s3://"):
        return "s3"
    if uri.startswith("models:/"):  # a registered model version (resolved by tracking.resolve_model_uri)
        return "registry"
    if uri.startswith("file://"):
        return "local"
    if "://" in uri:
        return "unsupported"
    if not Path(uri).exists() and uri.count("/") == 1 and not uri.startswith((".", "/")):
        return "hub"
    return "local"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


class Store(ABC):
    """Minimal object-store interface; every method takes a full URI."""

    @abstractmethod
    def put_file(self, local: Path, uri: str) -> None: ...

    @abstractmethod
    def get_file(self, uri: str, local: Path) -> None: ...

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic: readers see the old object or the new one, never a partial one."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """URIs of all objects under ``prefix`` (recursive)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    def local_path(self, uri: str) -> Path | None:
        """A path readable in place, for backends that have one (no copy needed)."""
        return None


class LocalStore(Store):
    @staticmethod
    def _p(uri: str) -> Path:
        return Path(uri.removeprefix("file://"))

    def put_file(self, local: Path, uri: str) -> None:
        dst = self._p(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(_tmp_name(dst.name))
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, uri: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._p(uri), local)
        except FileNotFoundError:
            raise ArtifactError(f"{uri}: missing") from None

    def read_bytes(self, uri: str) -> bytes | None:
        p = self._p(uri)
        return p.read_bytes() if p.is_file() else None

    def write_bytes(self, uri: str, data: bytes) -> None:
        dst = self._p(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(_tmp_name(dst.name))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        root = self._p(prefix)
        if not root.is_dir():
            return []
        return sorted(join(prefix, str(p.relative_to(root))) for p in root.rglob("*") if p.is_file())

    def delete_prefix(self, prefix: str) -> None:
        p = self._p(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def local_path(self, uri: str) -> Path | None:
        return self._p(uri)


class S3Store(Store):
    """S3-compatible object store (AWS S3, MinIO) through boto3.

    Endpoint and credentials come from the environment, never from configs or params:
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto), ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` or an instance/pod role. Large files go through
    boto3's transfer manager (multipart, parallel parts, streamed from/to disk); every call retries
    with exponential backoff (botocore "standard" mode). A single PUT is atomic on S3, which is what
    makes ``manifest.json`` a commit marker.

    A stalled endpoint (accepts connections, never answers) must not hang a stage: every attempt has
    a connect and a read timeout (``S2D_S3_TIMEOUT_S``, default 15 s: the longest silence tolerated,
    not the longest transfer) and every call a total deadline over its retries (``S2D_S3_DEADLINE_S``,
    default 60 s; a call ends at most one timeout after it). Failures are :class:`ArtifactError`\\ s that
    name the endpoint and the object.
    """

    def __init__(self, max_attempts: int = 5, multipart_mb: int = 64, timeout_s: float | None = None,
                 deadline_s: float | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.timeout_s = timeout_s or float(os.environ.get("S2D_S3_TIMEOUT_S", "15"))
        self.deadline_s = deadline_s or float(os.environ.get("S2D_S3_DEADLINE_S", "60"))
        cfg = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, s3={"addressing_style": "path"},
                     connect_timeout=self.timeout_s, read_timeout=self.timeout_s)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, config=cfg)
        self.endpoint = self.client.meta.endpoint_url
        # botocore has no deadline over retries: before each attempt, give up once the call's time is spent
        self.client.meta.events.register("before-send.s3", self._check_deadline)
        self.transfer = TransferConfig(multipart_threshold=multipart_mb << 20, multipart_chunksize=multipart_mb << 20,
                                       max_concurrency=4)

    def _check_deadline(self, request, **_) -> None:
        ctx = request.context if request.context is not None else {}
        t0 = ctx.setdefault("s2d_started", time.monotonic())
        if time.monotonic() - t0 > self.deadline_s:
            raise TimeoutError(f"no answer within the {self.deadline_s:g} s deadline (S2D_S3_DEADLINE_S)")

    @contextlib.contextmanager
    def _errors(self, uri: str, what: str):
        """Turn transport and service errors into one clear error naming the endpoint and the object."""
        from boto3.exceptions import RetriesExceededError, S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ArtifactError:
            raise
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                raise ArtifactError(f"{uri}: bucket '{self._split(uri)[0]}' does not exist (endpoint {self.endpoint})") from None
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactError(f"{uri}: missing (endpoint {self.endpoint})") from None
            raise StorageUnavailable(f"{uri}: S3 {what} failed at {self.endpoint}: {code or e}") from e
        except (BotoCoreError, RetriesExceededError, S3TransferFailedError, S3UploadFailedError, TimeoutError, OSError) as e:
            raise StorageUnavailable(f"{uri}: S3 {what} failed at {self.endpoint}: {e} "
                                f"(timeouts: S2D_S3_TIMEOUT_S={self.timeout_s:g}, S2D_S3_DEADLINE_S={self.deadline_s:g})") from e

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ArtifactError(f"{uri}: no bucket in S3 URI")
        return bucket, key

    def put_file(self, local: Path, uri: str) -> None:
        bucket, key = self._split(uri)
        with self._errors(uri, "upload"):
            self.client.upload_file(str(local), bucket, key, Config=self.transfer)

    def get_file(self, uri: str, local: Path) -> None:
        bucket, key = self._split(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(_tmp_name(local.name))
        try:
            with self._errors(uri, "download"):
                self.client.download_file(bucket, key, str(tmp), Config=self.transfer)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, uri: str) -> bytes | None:
        bucket, key = self._split(uri)
        with self._errors(uri, "read"):
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._split(uri)
        with self._errors(uri, "write"):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def list(self, prefix: str) -> list[str]:
        bucket, key = self._split(prefix)
        key = key.rstrip("/") + "/"
        out = []
        with self._errors(prefix, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)

    def delete_prefix(self, prefix: str) -> None:
        bucket, key = self._split(prefix)
        keys = [self._split(u)[1] for u in self.list(prefix)]
        with self._errors(prefix, "delete"):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                keys.append(key)  # the prefix is itself an object
            except self.client.exceptions.ClientError:
                pass
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})

    # ---- lock objects: conditional PUTs (If-None-Match / If-Match) make acquire and renew compare-and-swap
    def create_if_absent(self, uri: str, data: bytes) -> str | None:
        """Write ``uri`` only if it does not exist; its ETag, or None when it exists."""
        bucket, key = self._split(uri)
        try:
            with self._errors(uri, "conditional write"):
                return self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except ArtifactError as e:
            if _precondition_failed(e):
                return None
            raise

    def replace_if(self, uri: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``uri`` only if it is still the object ``etag`` names; the new ETag, or None."""
        bucket, key = self._split(uri)
        try:
            with self._errors(uri, "conditional write"):
                return self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)["ETag"]
        except ArtifactError as e:
            if _precondition_failed(e):
                return None
            raise

    def read_with_etag(self, uri: str) -> tuple[bytes, str, float] | None:
        """The object's bytes, ETag and age in seconds, by the server's clock (client clocks may disagree)."""
        from email.utils import parsedate_to_datetime

        bucket, key = self._split(uri)
        with self._errors(uri, "read"):
            try:
                r = self.client.get_object(Bucket=bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                return None
            now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            return r["Body"].read(), r["ETag"], (now - r["LastModified"]).total_seconds()

    def delete_if(self, uri: str, etag: str) -> None:
        bucket, key = self._split(uri)
        try:
            with self._errors(uri, "delete"):
                self.client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except ArtifactError as e:
            if not _precondition_failed(e):  # taken over by someone else: theirs now, leave it
                raise


def _precondition_failed(e: ArtifactError) -> bool:
    from botocore.exceptions import ClientError

    cause = e.__cause__
    return isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
        "PreconditionFailed", "ConditionalRequestConflict", "412", "409")


_S3: dict[tuple, S3Store] = {}


def store_for(uri: str) -> Store:
    if uri.startswith("s3://"):
        key = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S2D_S3_MULTIPART_MB",
                                                "S2D_S3_TIMEOUT_S", "S2D_S3_DEADLINE_S"))
        if key not in _S3:
            _S3[key] = S3Store(multipart_mb=int(os.environ.get("S2D_S3_MULTIPART_MB", "64")))
        return _S3[key]
    if uri_kind(uri) in ("unsupported", "registry"):
        raise ArtifactError(f"unsupported artifact URI scheme: {uri} (use a local path, file:// or s3://)")
    return LocalStore()


# ---------------------------------------------------------------- manifests


def _parse_json(raw: bytes, uri: str, what: str = "manifest") -> dict:
    try:
        out = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptManifest(f"{uri}: {what} is not valid JSON ({e}): corrupted or not written by this project") from None
    if not isinstance(out, dict):
        raise CorruptManifest(f"{uri}: {what} is not a JSON object")
    return out


def read_manifest(stage_uri: str) -> dict | None:
    uri = join(stage_uri, MANIFEST)
    raw = store_for(stage_uri).read_bytes(uri)
    if raw is None:
        return None
    m = _parse_json(raw, uri)
    if not isinstance(m.get("files"), dict):
        raise CorruptManifest(f"{uri}: manifest has no 'files' table: corrupted or not written by this project")
    return m


def manifest_digest(stage_uri: str) -> str | None:
    raw = store_for(stage_uri).read_bytes(join(stage_uri, MANIFEST))
    return hashlib.sha256(raw).hexdigest()[:16] if raw is not None else None


def publish(work_dir: Path, stage_uri: str, manifest: dict) -> dict:
    """Upload every file of ``work_dir`` to ``stage_uri``, then write the manifest last.

    An earlier manifest is removed first, so a stage being overwritten never looks finished.
    """
    store = store_for(stage_uri)
    store.delete_prefix(join(stage_uri, MANIFEST))
    files = {}
    for path in sorted(p for p in work_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(work_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        store.put_file(path, join(stage_uri, rel))
    manifest = {**manifest, "files": files, "published_at": datetime.now(timezone.utc).isoformat()}
    store.write_bytes(join(stage_uri, MANIFEST), dumps(manifest, indent=2, sort_keys=True).encode())
    return finite(manifest)


def find_manifest(uri: str) -> tuple[str, dict] | None:
    """The stage folder and manifest that own ``uri`` (the folder itself or one level up)."""
    for cand in (uri.rstrip("/"), uri.rstrip("/").rsplit("/", 1)[0]):
        m = read_manifest(cand)
        if m is not None:
            return cand, m
    return None


def check_files(uri: str) -> None:
    """Cheap, before any download: every file the owning manifest lists under ``uri`` exists with its size
    (local) or exists (S3). Checksums are verified by :func:`fetch`."""
    found = find_manifest(uri)
    if found is None:
        raise ArtifactError(f"{uri}: no manifest.json here or one level up: the stage that writes it has not finished")
    stage_uri, manifest = found
    sub = uri.rstrip("/")[len(stage_uri) :].strip("/")
    store = store_for(stage_uri)
    present = set(store.list(join(stage_uri, sub) if sub else stage_uri))
    for rel, meta in manifest["files"].items():
        if sub and not rel.startswith(sub + "/"):
            continue
        f = join(stage_uri, rel)
        local = store.local_path(f)
        if f not in present or (local is not None and local.stat().st_size != meta.get("size", local.stat().st_size)):
            what = "missing" if f not in present else f"{local.stat().st_size} bytes, not {meta['size']}"
            raise ArtifactError(f"{f}: listed in its manifest but {what} (deleted or overwritten after publishing?)")


def fetch(uri: str, cache_dir: Path | None = None, only=None) -> Path:
    """A verified local folder for an artifact folder URI (e.g. ``<root>/teacher_rl/model``).

    Files are checked against the owning stage's manifest; a missing manifest means the stage did
    not finish, and any checksum mismatch is an error.
    """
    found = find_manifest(uri)
    if found is None:
        raise ArtifactError(f"{uri}: no manifest.json here or one level up: the stage that writes it has not finished")
    stage_uri, manifest = found
    sub = uri.rstrip("/")[len(stage_uri) :].strip("/")
    wanted = {rel: meta for rel, meta in manifest["files"].items() if not sub or rel.startswith(sub + "/")}
    if only is not None:  # a subset, e.g. only a checkpoint's tokenizer files
        wanted = {rel: meta for rel, meta in wanted.items() if only(rel)}
    if not wanted:
        raise ArtifactError(f"{uri}: the manifest of {stage_uri} lists no files under '{sub}'")
    store = store_for(uri)
    in_place = store.local_path(stage_uri)
    if in_place is not None:
        base = in_place
    else:
        base = (cache_dir or Path(tempfile.gettempdir()) / "s2d-cache") / hashlib.sha256(stage_uri.encode()).hexdigest()[:16]
    for rel, meta in wanted.items():
        local = base / rel
        try:
            if in_place is None and not (local.exists() and sha256_file(local) == meta["sha256"]):
                store.get_file(join(stage_uri, rel), local)
            if not local.is_file():
                raise ArtifactError(f"{join(stage_uri, rel)}: missing")
        except ArtifactError as e:
            if not str(e).endswith("missing") and "missing (endpoint" not in str(e):
                raise
            raise ArtifactError(f"{join(stage_uri, rel)}: listed in its manifest but missing (deleted after publishing?)") from None
        if sha256_file(local) != meta["sha256"]:
            raise ArtifactError(f"{join(stage_uri, rel)}: checksum mismatch with its manifest (corrupted or overwritten)")
    return base / sub if sub else base


# ---------------------------------------------------------------- resumable training state


def save_state(stage_uri: str, name: str, step: int, state_dir: Path, meta: dict) -> None:
    """Publish a training state for ``name`` at ``step``; ``latest.json`` is written last.

    The state it replaces stays (``previous.json`` points at it) until the next save, so a state found
    corrupted on resume can fall back one save instead of starting over.
    """
    store = store_for(stage_uri)
    base = join(stage_uri, RESUME, name)
    step_uri = join(base, f"step-{step:08d}")
    files = {}
    for path in sorted(p for p in state_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(state_dir).as_posix()
        files[rel] = sha256_file(path)
        store.put_file(path, join(step_uri, rel))
    keep = {f"step-{step:08d}"}
    old = store.read_bytes(join(base, "latest.json"))
    try:
        old_step = json.loads(old)["step"] if old is not None else None
    except (ValueError, KeyError, TypeError):
        old_step = None  # a corrupted pointer is not worth keeping
    if old_step is not None and old_step != step:
        store.write_bytes(join(base, "previous.json"), old)
        keep.add(f"step-{old_step:08d}")
    store.write_bytes(join(base, "latest.json"), dumps({"step": step, "files": files, **meta}).encode())
    for uri in store.list(base):  # states older than the previous one are garbage
        part = uri[len(base) + 1 :].split("/", 1)[0]
        if part.startswith("step-") and part not in keep:
            store.delete_prefix(join(base, part))


def load_state(stage_uri: str, name: str, dest: Path, check=None) -> dict | None:
    """Download the latest good state of ``name`` into ``dest``; None when there is none.

    A state whose pointer is not JSON, whose files are missing or differ from their checksums, or that
    ``check(dest, meta)`` rejects (raises) is skipped with a warning: the previous state is tried, then
    a fresh start. A bad state must never block a stage: every retry would fail the same way.
    """
    store = store_for(stage_uri)
    base = join(stage_uri, RESUME, name)
    for pointer in ("latest.json", "previous.json"):
        uri = join(base, pointer)
        try:
            raw = store.read_bytes(uri)
            if raw is None:
                continue
            meta = _parse_json(raw, uri, "resume pointer")
            step_uri = join(base, f"step-{int(meta['step']):08d}")
            shutil.rmtree(dest, ignore_errors=True)
            for rel, digest in meta["files"].items():
                try:
                    store.get_file(join(step_uri, rel), dest / rel)
                except ArtifactError:
                    raise ArtifactError(f"{join(step_uri, rel)}: missing") from None
                if sha256_file(dest / rel) != digest:
                    raise ArtifactError(f"{join(step_uri, rel)}: checksum mismatch")
            if check is not None:
                check(dest, meta)
            return meta
        except StorageUnavailable:
            raise  # the store did not answer: the state may be fine, never discard it for that
        except Exception as e:  # noqa: BLE001 - whatever is wrong with a state, the next one may be good
            log.warning("%s: resume state %s is unusable (%s); %s", stage_uri, pointer, e,
                        "trying the previous one" if pointer == "latest.json" else "starting over")
    return None


def clear_state(stage_uri: str) -> None:
    store_for(stage_uri).delete_prefix(join(stage_uri, RESUME))


# ---------------------------------------------------------------- one writer per stage folder


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
            probe = path.with_name(_tmp_name("write-probe"))  # the lock file may exist from a writable past
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
