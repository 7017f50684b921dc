"""Published artifacts: what a stage leaves under ``<root>/<stage>/`` and how readers trust it.

A stage publishes files first, ``manifest.json`` LAST. A folder without a manifest is unfinished and never
read. The manifest lists every file with its sha256; readers verify them. Resumable training state lives
under ``<root>/<stage>/_resume/`` and is versioned the same way (``latest.json`` written last), so a kill
at any moment leaves either the old state or the new one; a corrupted resume state gives the previous
state, or a fresh start, with a warning. Where the bytes live is ``stages/storage.py``; who may write a
stage folder is ``stages/lock.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .lock import LOCK, fence
from .redact import redact_obj
from .storage import (
    ArtifactError,
    CorruptManifest,
    LockLost,
    S3Store,
    StorageUnavailable,
    dumps,
    finite,
    join,
    log,
    sha256_file,
    store_for,
)

MANIFEST = "manifest.json"
RESUME = "_resume"


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


def manifest_sha256(stage_uri: str) -> str | None:
    """The full sha256 of the stage's manifest bytes: it pins every published file (the manifest lists each
    file's sha256, and readers verify them), so a registered version tagged with it pins its checkpoint."""
    raw = store_for(stage_uri).read_bytes(join(stage_uri, MANIFEST))
    return hashlib.sha256(raw).hexdigest() if raw is not None else None


def publish(work_dir: Path, stage_uri: str, manifest: dict) -> dict:
    """Upload every file of ``work_dir`` to ``stage_uri``, then write the manifest last.

    An earlier manifest is removed first, so a stage being overwritten never looks finished. Files of an
    earlier publish that the new manifest does not list (old shards, single-file weights next to a new
    sharded index, a chat template the new tokenizer lacks) are deleted before the new manifest is written:
    the folder holds what the manifest lists (plus ``.lock`` and ``_resume/``), so no reader globbing it finds
    a stale file. Every write is fenced on the stage lock this process holds (:func:`stages.lock.fence`),
    and the manifest is created only if absent (``If-None-Match`` / a hard link), so a run whose lock was
    taken over never overwrites the new holder's manifest.
    """
    store = store_for(stage_uri)
    stage_uri = stage_uri.rstrip("/")
    fence(stage_uri)
    store.delete_prefix(join(stage_uri, MANIFEST))
    files = {}
    for path in sorted(p for p in work_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(work_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        fence(stage_uri)
        store.put_file(path, join(stage_uri, rel))
    stale = _unlisted(store, stage_uri, files)
    if stale:
        fence(stage_uri)
        store.delete_many(stale)
        log.info("%s: removed %d file(s) of an earlier publish that the new manifest does not list", stage_uri, len(stale))
    # inputs, outputs, extras: a URI's userinfo or secret query value is never written down
    manifest = {**redact_obj(manifest), "files": files, "published_at": datetime.now(timezone.utc).isoformat()}
    fence(stage_uri)
    uri = join(stage_uri, MANIFEST)
    if not store.write_new(uri, dumps(manifest, indent=2, sort_keys=True).encode()):
        raise LockLost(f"{uri}: another run published this stage while this one was writing it; this run's "
                       "manifest is not written (the folder is the other run's)")
    return finite(manifest)


def _unlisted(store, stage_uri: str, files: dict) -> list[str]:
    """Objects under ``stage_uri`` that ``files`` does not list, except the lock, resume states and any nested
    folder that is itself a published stage (has its own manifest)."""
    found = store.list(stage_uri)
    rels = {u: u[len(stage_uri) + 1 :] for u in found}
    nested = {r.rsplit("/", 1)[0] + "/" for r in rels.values() if r.endswith("/" + MANIFEST)}
    return [u for u, r in rels.items()
            if r not in files and r != LOCK and r != MANIFEST and not r.startswith(RESUME + "/")
            and not any(r.startswith(n) for n in nested)]


def listed(uri: str) -> list[str]:
    """The files the owning manifest lists under ``uri``, relative to ``uri`` (what a reader may read there)."""
    found = find_manifest(uri)
    if found is None:
        raise ArtifactError(f"{uri}: no manifest.json here or one level up: the stage that writes it has not finished")
    stage_uri, manifest = found
    sub = uri.rstrip("/")[len(stage_uri) :].strip("/")
    return sorted(rel[len(sub) + 1 :] if sub else rel for rel in manifest["files"] if not sub or rel.startswith(sub + "/"))


def find_manifest(uri: str) -> tuple[str, dict] | None:
    """The stage folder and manifest that own ``uri`` (the folder itself or one level up)."""
    for cand in (uri.rstrip("/"), uri.rstrip("/").rsplit("/", 1)[0]):
        m = read_manifest(cand)
        if m is not None:
            return cand, m
    return None


def located(uri: str) -> str:
    """Where the files of output ``uri`` (``<stage>/<name>``) are: the URI its manifest's ``outputs`` names
    for it, which is elsewhere when the stage took it from the content-addressed store (``teacher_data``
    reused); ``uri`` itself otherwise."""
    found = find_manifest(uri)
    if found is None:
        return uri
    stage_uri, m = found
    name = uri.rstrip("/")[len(stage_uri):].strip("/")
    if not name or any(rel.startswith(name + "/") for rel in m.get("files", {})):
        return uri  # the manifest lists its files here (a copied or moved stage folder included)
    there = m.get("outputs", {}).get(name)
    return there if there and there.rstrip("/") != uri.rstrip("/") else uri


def content_digest(uri: str) -> str | None:
    """A digest of what a published output holds (its files' relative paths and sha256 from the owning
    manifest), independent of where and when it was published; None when no manifest owns ``uri``."""
    uri = located(uri)
    found = find_manifest(uri)
    if found is None:
        return None
    stage_uri, m = found
    sub = uri.rstrip("/")[len(stage_uri):].strip("/")
    files = sorted((rel[len(sub) + 1:] if sub else rel, meta["sha256"]) for rel, meta in m["files"].items()
                   if not sub or rel.startswith(sub + "/"))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:24] if files else None


def shared_store(root: str, configured: str | None = None) -> str:
    """The content-addressed store work is shared through across runs (``<store>/<stage>/<key>/``):
    ``configured``, else env ``S2D_SHARED_STORE``, else ``<S2D_ARTIFACT_BASE>/_shared`` for a root under
    that base, else ``_shared`` next to the root (the CLI's ``runs/default`` -> ``runs/_shared``)."""
    import os

    if configured or os.environ.get("S2D_SHARED_STORE"):
        return (configured or os.environ["S2D_SHARED_STORE"]).rstrip("/")
    root = root.rstrip("/")
    base = (os.environ.get("S2D_ARTIFACT_BASE") or os.environ.get("S2D_ARTIFACT_ROOT") or "").rstrip("/")
    if base and root.startswith(base + "/"):
        return join(base, "_shared")
    parent, _, last = root.rpartition("/")
    if not parent or parent.endswith(":/") or not last:  # a bare folder name, or a bucket itself
        return join(root, "_shared")
    return join(parent, "_shared")


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
    """A verified local folder for an artifact folder URI (e.g. ``<root>/teacher_rl/model``) that holds
    exactly the files the owning manifest lists there (``only``: a subset of them), so ``from_pretrained``
    or a glob over it never picks up a file the manifest does not list.

    Files are checked against the owning stage's manifest; a missing manifest means the stage did
    not finish, and any checksum mismatch is an error. A local stage folder is read in place when it holds
    nothing else; otherwise (a file left by an older publish or put there by hand) the listed files are
    linked into a cache folder and that is returned. S3 files are downloaded into a cache folder, from which
    files the manifest does not list are removed.
    """
    found = find_manifest(uri)
    if found is None:
        raise ArtifactError(f"{uri}: no manifest.json here or one level up: the stage that writes it has not finished")
    stage_uri, manifest = found
    sub = uri.rstrip("/")[len(stage_uri) :].strip("/")
    in_sub = {rel: meta for rel, meta in manifest["files"].items() if not sub or rel.startswith(sub + "/")}
    wanted = in_sub if only is None else {rel: meta for rel, meta in in_sub.items() if only(rel)}  # e.g. tokenizer files
    if not wanted:
        raise ArtifactError(f"{uri}: the manifest of {stage_uri} lists no files under '{sub}'")
    store = store_for(uri)
    in_place = store.local_path(stage_uri)
    cache = (cache_dir or Path(tempfile.gettempdir()) / "s2d-cache") / hashlib.sha256(stage_uri.encode()).hexdigest()[:16]
    if in_place is not None:
        extra = _extra_files(in_place, sub, in_sub)
        if extra:
            log.warning("%s: %d file(s) there are not listed in its manifest (e.g. %s): reading a copy of the listed "
                        "ones", join(stage_uri, sub) if sub else stage_uri, len(extra), extra[0])
            base, link_from = cache, in_place
        else:
            base, link_from = in_place, None
    else:
        base, link_from = cache, None
    for rel, meta in wanted.items():
        local = base / rel
        try:
            if link_from is not None:
                _link(link_from / rel, local, join(stage_uri, rel))
            elif in_place is None and not (local.exists() and sha256_file(local) == meta["sha256"]):
                store.get_file(join(stage_uri, rel), local)
            if not local.is_file():
                raise ArtifactError(f"{join(stage_uri, rel)}: missing")
        except ArtifactError as e:
            if not str(e).endswith("missing") and "missing (endpoint" not in str(e):
                raise
            raise ArtifactError(
                f"{join(stage_uri, rel)}: listed in its manifest but missing (deleted after publishing?)"
            ) from None
        if sha256_file(local) != meta["sha256"]:
            raise ArtifactError(f"{join(stage_uri, rel)}: checksum mismatch with its manifest (corrupted or overwritten)")
    if base == cache:  # a cache folder: nothing there that the manifest does not list
        for rel in _extra_files(cache, sub, in_sub if only is None else manifest["files"]):
            (cache / sub / rel if sub else cache / rel).unlink(missing_ok=True)
    return base / sub if sub else base


def _extra_files(folder: Path, sub: str, listed_files: dict) -> list[str]:
    """Files under ``folder/sub`` that ``listed_files`` (paths relative to ``folder``) does not list; the lock,
    resume states and unfinished temporaries of a live writer are not counted."""
    top = folder / sub if sub else folder
    if not top.is_dir():
        return []
    out = []
    for p in sorted(top.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or rel in listed_files or rel == LOCK or rel.startswith(RESUME + "/") or rel == MANIFEST:
            continue
        if ".tmp-" in p.name and p.name.startswith("."):
            continue
        out.append(p.relative_to(top).as_posix())
    return out


def _link(src: Path, dst: Path, uri: str) -> None:
    """``dst`` is ``src``'s content: a hard link (no copy) where the file system allows it."""
    if not src.is_file():
        raise ArtifactError(f"{uri}: missing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------- resumable training state


def save_state(stage_uri: str, name: str, step: int, state_dir: Path, meta: dict) -> None:
    """Publish a training state for ``name`` at ``step``; ``latest.json`` is written last.

    The state it replaces stays (``previous.json`` points at it) until the next save, so a state found
    corrupted on resume can fall back one save instead of starting over. Each save writes a folder of its own
    (``step-<n>-<random>``, named in the pointer), so a run stalled past its lease whose upload was already in
    flight when the lock was taken over never overwrites the new holder's state, and on :class:`LockLost` it
    removes what this save wrote (its folder; a pointer only while it still holds this save's bytes).
    """
    store = store_for(stage_uri)
    base = join(stage_uri, RESUME, name)
    part = f"step-{step:08d}-{os.urandom(4).hex()}"
    written: dict[str, bytes] = {}
    try:
        files = {}
        for path in sorted(p for p in state_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(state_dir).as_posix()
            files[rel] = sha256_file(path)
            fence(stage_uri)  # a run whose stage lock was taken over writes nothing (stages/lock.py)
            store.put_file(path, join(base, part, rel))
        keep = {part}
        old = store.read_bytes(join(base, "latest.json"))
        try:
            old_part = _state_part(json.loads(old)) if old is not None else None
        except (ValueError, KeyError, TypeError):
            old_part = None  # a corrupted pointer is not worth keeping
        if old_part is not None:  # never this save's own folder: each save's name is new
            fence(stage_uri)
            written[join(base, "previous.json")] = old
            store.write_bytes(join(base, "previous.json"), old)
            keep.add(old_part)
        pointer = dumps({"step": step, "dir": part, "files": files, **meta}).encode()
        fence(stage_uri)
        written[join(base, "latest.json")] = pointer
        store.write_bytes(join(base, "latest.json"), pointer)
        fence(stage_uri)
    except LockLost:
        _unwrite(store, join(base, part), written)
        raise
    for uri in store.list(base):  # states older than the previous one are garbage
        other = uri[len(base) + 1 :].split("/", 1)[0]
        if other.startswith("step-") and other not in keep:
            fence(stage_uri)
            store.delete_prefix(join(base, other))


def _state_part(meta: dict) -> str:
    """The folder a resume pointer names (pointers written before per-save folders name only the step)."""
    return meta.get("dir") or f"step-{int(meta['step']):08d}"


def _unwrite(store, folder: str, written: dict[str, bytes]) -> None:
    """Best effort, after this process lost its stage lock mid-save: remove this save's own folder (no other
    writer uses its name) and each pointer it wrote that still holds exactly its bytes (conditionally, by
    ETag, on S3), so the new holder's files are never touched."""
    try:
        store.delete_prefix(folder)
        for uri, data in written.items():
            if isinstance(store, S3Store):
                got = store.read_with_etag(uri)
                if got is not None and got[0] == data:
                    store.delete_if(uri, got[1])
            elif store.read_bytes(uri) == data:
                store.delete_many([uri])
    except Exception as e:  # noqa: BLE001 - the error that matters is the lost lock, raised next
        log.warning("%s: could not remove what this save wrote after losing the stage lock (%s)", folder, e)


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
            step_uri = join(base, _state_part(meta))
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
    fence(stage_uri)
    store_for(stage_uri).delete_prefix(join(stage_uri, RESUME))
