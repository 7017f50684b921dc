"""Artifact storage: where stages publish checkpoints, rollouts and manifests.

A stage publishes under ``<root>/<stage>/``: files first, ``manifest.json`` LAST. A folder without a
manifest is unfinished and never read. The manifest lists every file with its sha256; readers verify
them. Resumable training state lives under ``<root>/<stage>/_resume/`` and is versioned the same way
(``latest.json`` written last), so a kill at any moment leaves either the old state or the new one.

Backends are chosen by URI: a local path or ``file://`` (the embedded default) or ``s3://``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path

MANIFEST = "manifest.json"
RESUME = "_resume"


class ArtifactError(RuntimeError):
    """Missing, unfinished or corrupted artifact."""


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def uri_kind(uri: str) -> str:
    """What a checkpoint or artifact URI names: ``s3`` (``s3://bucket/key``), ``local`` (a path or
    ``file://``), ``hub`` (a Hugging Face hub id ``org/name`` that is not a local path), or ``unsupported``."""
    if uri.startswith("s3://"):
        return "s3"
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
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)

    def get_file(self, uri: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(uri), local)

    def read_bytes(self, uri: str) -> bytes | None:
        p = self._p(uri)
        return p.read_bytes() if p.is_file() else None

    def write_bytes(self, uri: str, data: bytes) -> None:
        dst = self._p(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)

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
    """

    def __init__(self, max_attempts: int = 8, multipart_mb: int = 64):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cfg = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, s3={"addressing_style": "path"})
        self.client = boto3.client("s3", endpoint_url=endpoint, config=cfg)
        self.transfer = TransferConfig(multipart_threshold=multipart_mb << 20, multipart_chunksize=multipart_mb << 20,
                                       max_concurrency=4)

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ArtifactError(f"{uri}: no bucket in S3 URI")
        return bucket, key

    def put_file(self, local: Path, uri: str) -> None:
        bucket, key = self._split(uri)
        self.client.upload_file(str(local), bucket, key, Config=self.transfer)

    def get_file(self, uri: str, local: Path) -> None:
        bucket, key = self._split(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        self.client.download_file(bucket, key, str(tmp), Config=self.transfer)
        os.replace(tmp, local)

    def read_bytes(self, uri: str) -> bytes | None:
        bucket, key = self._split(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except self.client.exceptions.NoSuchBucket:
            raise ArtifactError(f"{uri}: bucket '{bucket}' does not exist") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._split(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def list(self, prefix: str) -> list[str]:
        bucket, key = self._split(prefix)
        key = key.rstrip("/") + "/"
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)

    def delete_prefix(self, prefix: str) -> None:
        bucket, key = self._split(prefix)
        keys = [self._split(u)[1] for u in self.list(prefix)]
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            keys.append(key)  # the prefix is itself an object
        except self.client.exceptions.ClientError:
            pass
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})


_S3: dict[str | None, S3Store] = {}


def store_for(uri: str) -> Store:
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint not in _S3:
            _S3[endpoint] = S3Store(multipart_mb=int(os.environ.get("S2D_S3_MULTIPART_MB", "64")))
        return _S3[endpoint]
    if uri_kind(uri) == "unsupported":
        raise ArtifactError(f"unsupported artifact URI scheme: {uri} (use a local path, file:// or s3://)")
    return LocalStore()


# ---------------------------------------------------------------- manifests


def read_manifest(stage_uri: str) -> dict | None:
    raw = store_for(stage_uri).read_bytes(join(stage_uri, MANIFEST))
    return json.loads(raw) if raw is not None else None


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
    store.write_bytes(join(stage_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def find_manifest(uri: str) -> tuple[str, dict] | None:
    """The stage folder and manifest that own ``uri`` (the folder itself or one level up)."""
    for cand in (uri.rstrip("/"), uri.rstrip("/").rsplit("/", 1)[0]):
        m = read_manifest(cand)
        if m is not None:
            return cand, m
    return None


def fetch(uri: str, cache_dir: Path | None = None) -> Path:
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
        if in_place is None and not (local.exists() and sha256_file(local) == meta["sha256"]):
            store.get_file(join(stage_uri, rel), local)
        if not local.exists() or sha256_file(local) != meta["sha256"]:
            raise ArtifactError(f"{join(stage_uri, rel)}: checksum mismatch with its manifest (corrupted or overwritten)")
    return base / sub if sub else base


# ---------------------------------------------------------------- resumable training state


def save_state(stage_uri: str, name: str, step: int, state_dir: Path, meta: dict) -> None:
    """Publish a training state for ``name`` at ``step``; ``latest.json`` is written last."""
    store = store_for(stage_uri)
    base = join(stage_uri, RESUME, name)
    step_uri = join(base, f"step-{step:08d}")
    files = {}
    for path in sorted(p for p in state_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(state_dir).as_posix()
        files[rel] = sha256_file(path)
        store.put_file(path, join(step_uri, rel))
    store.write_bytes(join(base, "latest.json"), json.dumps({"step": step, "files": files, **meta}).encode())
    for uri in store.list(base):  # older states are garbage once latest.json points past them
        part = uri[len(base) + 1 :].split("/", 1)[0]
        if part.startswith("step-") and part != f"step-{step:08d}":
            store.delete_prefix(join(base, part))


def load_state(stage_uri: str, name: str, dest: Path) -> dict | None:
    """Download the latest verified state of ``name`` into ``dest``; None when there is none."""
    store = store_for(stage_uri)
    base = join(stage_uri, RESUME, name)
    raw = store.read_bytes(join(base, "latest.json"))
    if raw is None:
        return None
    latest = json.loads(raw)
    step_uri = join(base, f"step-{latest['step']:08d}")
    for rel, digest in latest["files"].items():
        store.get_file(join(step_uri, rel), dest / rel)
        if sha256_file(dest / rel) != digest:
            raise ArtifactError(f"{join(step_uri, rel)}: resume state is corrupted (checksum mismatch)")
    return latest


def clear_state(stage_uri: str) -> None:
    store_for(stage_uri).delete_prefix(join(stage_uri, RESUME))
