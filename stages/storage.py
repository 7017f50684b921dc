"""Object stores: where artifacts live, chosen by URI: a local path or ``file://`` (the embedded
default) or ``s3://`` (boto3: AWS S3, MinIO, any S3-compatible endpoint).

Also the small things every writer needs: strict JSON (NaN/inf become null), in-progress file names that
carry the writer's pid and host so the next run can sweep what a killed writer left, private scratch
folders, sha256. A stalled S3 endpoint gets bounded timeouts and a total deadline per call
(:class:`S3Store`); conditional writes (``If-None-Match`` / ``If-Match``) serve the stage lock
(``stages/lock.py``). What is published and how it is read back is ``stages/artifacts.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

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


class LockLost(ArtifactError):
    """This run's stage lock is no longer its own (its lease lapsed and another run took it over, or it cannot be
    confirmed): the run must not write anything more into the stage folder."""


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def tmp_name(name: str) -> str:
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
        dead = pid.isdigit() and rest.startswith(_HOST + "-") and not pid_alive(int(pid))
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
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
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
    ``file://``), ``hub`` (a Hugging Face hub id ``org/name`` that is not a local path), ``registry``
    (``models:/<name>/<version>`` or ``@<alias>``, an MLflow registered version), or ``unsupported``."""
    if uri.startswith("s3://"):
        return "s3"
    if uri.startswith("models:/"):  # a registered model version (resolved by lineage.resolve_model_uri)
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

    @abstractmethod
    def delete_many(self, uris: list[str]) -> None:
        """Delete these objects (missing ones are fine)."""

    @abstractmethod
    def write_new(self, uri: str, data: bytes) -> bool:
        """Create ``uri`` atomically only if it does not exist; False (nothing written) when it does."""

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
        tmp = dst.with_name(tmp_name(dst.name))
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

    def _commit(self, uri: str, data: bytes, move) -> bool:
        """Write ``data`` to a synced temporary next to ``uri``, then ``move(tmp, dst)`` it into place."""
        dst = self._p(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(tmp_name(dst.name))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return move(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._commit(uri, data, os.replace)

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

    def delete_many(self, uris: list[str]) -> None:
        for uri in uris:
            self._p(uri).unlink(missing_ok=True)

    def write_new(self, uri: str, data: bytes) -> bool:
        def link(tmp, dst) -> bool:  # atomic, and fails when dst exists (a rename would replace it)
            try:
                os.link(tmp, dst)
            except FileExistsError:
                return False
            return True

        return self._commit(uri, data, link)

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
        from .redact import redact

        self.shown = redact(self.endpoint)  # what messages name: never the userinfo of an endpoint URL
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

        from .redact import redact

        try:
            yield
        except ArtifactError:
            raise
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                raise ArtifactError(f"{uri}: bucket '{self._split(uri)[0]}' does not exist (endpoint {self.shown})") from None
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactError(f"{uri}: missing (endpoint {self.shown})") from None
            raise StorageUnavailable(f"{uri}: S3 {what} failed at {self.shown}: {code or redact(str(e))}") from e
        except (BotoCoreError, RetriesExceededError, S3TransferFailedError, S3UploadFailedError, TimeoutError, OSError) as e:
            raise StorageUnavailable(f"{uri}: S3 {what} failed at {self.shown}: {redact(str(e))} "
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
        tmp = local.with_name(tmp_name(local.name))
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

    def delete_many(self, uris: list[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for u in uris:
            b, k = self._split(u)
            by_bucket.setdefault(b, []).append(k)
        for bucket, keys in by_bucket.items():
            with self._errors(f"s3://{bucket}/{keys[0]}", "delete"):
                for i in range(0, len(keys), 1000):
                    self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})

    def write_new(self, uri: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``); after a 412 the object is re-read: our own bytes there mean an
        earlier attempt of this call landed (its answer was lost) and count as written. An endpoint without
        conditional writes gets a plain PUT, with a warning."""
        bucket, key = self._split(uri)
        try:
            with self._errors(uri, "conditional write"):
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ArtifactError as e:
            if precondition_failed(e):
                return self.read_bytes(uri) == data
            if "NotImplemented" not in str(e):
                raise
        log.warning("%s: the endpoint does not support conditional writes; written unconditionally", uri)
        self.write_bytes(uri, data)
        return True

    # ---- lock objects: conditional PUTs (If-None-Match / If-Match) make acquire and renew compare-and-swap
    def create_if_absent(self, uri: str, data: bytes) -> str | None:
        """Write ``uri`` only if it does not exist; its ETag, or None when it exists."""
        bucket, key = self._split(uri)
        try:
            with self._errors(uri, "conditional write"):
                return self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except ArtifactError as e:
            if precondition_failed(e):
                return None
            raise

    def replace_if(self, uri: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``uri`` only if it is still the object ``etag`` names; the new ETag, or None."""
        bucket, key = self._split(uri)
        try:
            with self._errors(uri, "conditional write"):
                return self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)["ETag"]
        except ArtifactError as e:
            if precondition_failed(e):
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
            if not precondition_failed(e):  # taken over by someone else: theirs now, leave it
                raise


def precondition_failed(e: ArtifactError) -> bool:
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
