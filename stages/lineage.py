"""Lineage in MLflow: what the tracking store says about published checkpoints.

Plain functions of an ``MlflowClient`` (the :class:`stages.tracking.Tracker` runs them from its outbox):
find the run and logged model that published a URI, link a stage run's inputs to their producers,
*reconcile* a stage run with its manifest (metric history, final metrics, outputs as logged models,
status), register a checkpoint as a model version, and resolve ``models:/`` URIs back to checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time

from . import artifacts, storage
from .redact import redact

log = logging.getLogger("stages.tracking")

AIRFLOW_ENV = ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER")
# bounded HTTP requests for the stage process (MLflow's defaults retry one call for ~4 minutes)
# the MLflow 3.17 UI's classic (model training) view: a URL's ?workflowType= chooses it, not the experiment's tags
UI_VIEW = "workflowType=machine_learning"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}


def metric_name(key: str) -> str:
    return key.replace("@", "_at_")  # MLflow names allow no '@': avg@8 is logged as avg_at_8


def role_of(stage: str, key: str) -> str:
    """One name per model role in every stage (from the stage table): a GRPO stage's ``policy`` is the
    teacher or a student, the baseline's base student is a student."""
    from .registry import STAGES

    st = STAGES.get(stage.split("/")[0])
    role = st.inputs.get(key, key) if st else key
    return {"base_student": "student", "final_student": key}.get(role, role)


def short_uri(uri: str, root: str) -> str:
    """``teacher_rl/model`` for a checkpoint of this root; other URIs (hub ids, other roots) as given."""
    root = root.rstrip("/")
    return uri[len(root) + 1 :] if uri.startswith(root + "/") else uri


def model_name(stage: str, output: str) -> str:
    """Logged-model name of a stage output (MLflow allows no '/', ':' or '.' there)."""
    name = stage.replace("/", "-") if output == "model" else f"{stage.replace('/', '-')}-{output}"
    return name.replace(".", "_").replace(":", "_")


def transient(e: BaseException) -> bool:
    """Connection-level failure (server down, hung, restarting): keep the record and retry later.
    A server that answered with an MLflow error (bad value, missing run) is not retried."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, RestException):
        return e.get_http_status_code() >= 500
    if isinstance(e, MlflowException):
        msg = str(e)
        return msg.startswith("API request to") or "Response body" in msg or "status code 5" in msg
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy")
    )


def airflow_tags() -> dict:
    return {"airflow." + k.removeprefix("AIRFLOW_CTX_").lower(): os.environ[k] for k in AIRFLOW_ENV if os.environ.get(k)}


def quote(v: str) -> str:
    return v.replace("'", "\\'")


def find_stage_run(c, exp_id: str, stage: str, config_hash: str, root: str | None = None):
    f = f"tags.`s2d.stage` = '{quote(stage)}' and params.config_hash = '{config_hash}'"
    if root:
        f += f" and tags.`s2d.root` = '{quote(root)}'"
    found = c.search_runs([exp_id], f, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def find_logged_model(c, exp_id: str, uri: str):
    found = c.search_logged_models([exp_id], filter_string=f"tags.`s2d.uri` = '{quote(uri)}'", max_results=1,
                                   order_by=[{"field_name": "creation_time", "ascending": False}])
    return found[0] if found else None


def producer_of(c, exp_id: str, uri: str) -> tuple[str | None, str | None]:
    """(run id, logged model id) that published ``uri``, from its manifest and the tracking store."""
    found = artifacts.find_manifest(uri)
    if found is None:
        return None, None
    m = found[1]
    rid = m.get("mlflow_run_id")
    if rid is None and m.get("config_hash"):
        run = find_stage_run(c, exp_id, m["stage"], m["config_hash"])
        rid = run.info.run_id if run else None
    lm = find_logged_model(c, exp_id, uri) or find_logged_model(c, exp_id, artifacts.located(uri))
    return rid, lm.model_id if lm else None


def link_inputs(c, exp_id: str, rid: str, stage: str, root: str, inputs: dict) -> None:
    from mlflow.entities import LoggedModelInput, Param, RunTag

    tags, params, models = [], [], []
    for key, uri in inputs.items():
        role = role_of(stage, key)
        tags.append(RunTag(f"s2d.input.{role}", redact(short_uri(uri, root))))
        params.append(Param(f"input.{role}", redact(uri)[:6000]))
        prod_run, model_id = producer_of(c, exp_id, uri)
        if prod_run:
            tags.append(RunTag(f"s2d.input.{role}.run", prod_run))
        if model_id:
            tags.append(RunTag(f"s2d.input.{role}.model", model_id))
            models.append(LoggedModelInput(model_id))
    existing = c.get_run(rid).data.params
    c.log_batch(rid, params=[p for p in params if p.key not in existing], tags=tags)
    if models:
        c.log_inputs(rid, models=models)


def reconcile(c, exp_id: str, rid: str | None, manifest: dict, stage_uri: str, root: str,
               parent_run_id: str | None, history: list[dict] | None) -> str:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    stage = manifest["stage"]
    rid = rid or manifest.get("mlflow_run_id")
    run = None
    if rid:
        try:
            run = c.get_run(rid)
        except MlflowException as e:
            if transient(e):
                raise
    if run is None:
        run = find_stage_run(c, exp_id, stage, manifest["config_hash"], root)
    if run is None:  # the server was away for the whole stage: make its run now
        tags = {"mlflow.runName": stage, "s2d.stage": stage, "s2d.root": redact(root), **airflow_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(exp_id, run_name=stage, tags=tags)
        c.log_batch(run.info.run_id, params=[Param("stage", stage), Param("config_hash", manifest["config_hash"]),
                                             Param("root", redact(root))])
    rid = run.info.run_id
    if run.data.tags.get("s2d.published") == manifest.get("published_at") and run.info.status == "FINISHED":
        return rid  # already recorded
    tags = {}
    if parent_run_id and "mlflow.parentRunId" not in run.data.tags:
        tags["mlflow.parentRunId"] = parent_run_id
    if manifest.get("inputs") and not any(k.startswith("s2d.input.") for k in run.data.tags):
        link_inputs(c, exp_id, rid, stage, root, manifest["inputs"])
    # the step history: whatever the outbox could not send comes from the published metrics.jsonl
    if history is None and "metrics.jsonl" in manifest.get("files", {}):
        raw = storage.store_for(stage_uri).read_bytes(storage.join(stage_uri, "metrics.jsonl"))
        history = [json.loads(line) for line in raw.decode().splitlines() if line.strip()] if raw else []
    ts = int(time.time() * 1000)
    missing = []
    keys = {k for h in history or [] for k, v in h.items() if k != "step" and isinstance(v, (int, float))}
    for key in sorted(keys):
        have = {m.step for m in c.get_metric_history(rid, metric_name(key))}
        missing += [Metric(metric_name(key), float(h[key]), ts, h["step"]) for h in history
                    if key in h and h["step"] not in have and isinstance(h[key], (int, float))]
    final = {metric_name(f"final.{k}"): float(v) for k, v in manifest.get("metrics", {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # what the stage cost (stages/cost.py): cost.wall_s, cost.cpu_s, cost.teacher_tokens_scored, ...
    final |= {metric_name(f"cost.{k}"): float(v) for k, v in (manifest.get("cost") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    missing += [Metric(k, v, ts, 0) for k, v in final.items() if run.data.metrics.get(k) != v]
    for i in range(0, len(missing), 1000):
        c.log_batch(rid, metrics=missing[i : i + 1000])
    # outputs: short tags, full URIs as params, each checkpoint a logged model pointing at its URI
    outputs = manifest.get("outputs", {})
    tags |= {f"s2d.output.{k}": short_uri(v, root) for k, v in outputs.items()}
    out_params = [Param(f"output.{k}", redact(v)[:6000]) for k, v in outputs.items() if f"output.{k}" not in run.data.params]
    made: dict[str, str] = {}  # output -> its logged model id (an adapter's, for its merged checkpoint)
    for out, uri in outputs.items():
        lm = find_logged_model(c, exp_id, uri)
        kind = adapter_tags(c, exp_id, manifest, out, made)
        if lm is None or lm.source_run_id != rid or lm.tags.get("s2d.published") != manifest.get("published_at"):
            lm = c.create_logged_model(
                exp_id,
                name=model_name(stage, out),
                source_run_id=rid,
                model_type="s2d-checkpoint",
                tags={
                    "s2d.uri": uri,
                    "s2d.stage": stage,
                    "s2d.root": root,
                    "s2d.output": out,
                    "s2d.published": manifest.get("published_at", ""),
                    "mlflow.model.isExternal": "true",
                    **kind,
                },
                params={
                    "config_hash": manifest["config_hash"],
                    **{f"input.{role_of(stage, k)}": v[:6000] for k, v in manifest.get("inputs", {}).items()},
                    # stage import: where the checkpoint came from (the file's reference and sha256)
                    **{f"source.{k}": str(v)[:6000] for k, v in manifest.get("sources", {}).get(out, {}).items()},
                },
            )
            c.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
            c.log_outputs(rid, [LoggedModelOutput(lm.model_id, 0)])
        tags[f"s2d.output.{out}.model"] = lm.model_id
        made[out] = lm.model_id
    tags["s2d.manifest"] = short_uri(storage.join(stage_uri, artifacts.MANIFEST), root)
    reused = manifest.get("reused")
    if reused:  # outputs taken from the content-addressed store: who made them first
        tags |= {"s2d.reused_from": reused["from"], "s2d.reused.key": reused.get("key", ""),
                 **({"s2d.reused.run": reused["run"]} if reused.get("run") else {}),
                 **({"s2d.reused.root": reused["root"]} if reused.get("root") else {})}
    c.log_batch(rid, params=out_params, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])
    if run.info.status != "FINISHED":
        c.set_terminated(rid, status="FINISHED")
    c.set_tag(rid, "s2d.published", manifest.get("published_at", ""))  # last: marks the run complete
    return rid


def adapter_tags(c, exp_id: str, manifest: dict, out: str, made: dict[str, str]) -> dict:
    """Lineage tags of a LoRA output's logged model: an adapter names its base (URI, digest and the base's
    logged model when it has one); a merged checkpoint names the adapter it was merged from. The MLflow
    models then read base -> adapter -> merged."""
    adapters = manifest.get("adapters") or {}
    if out in adapters:
        base = adapters[out]["base"]
        tags = {"s2d.kind": "adapter", "s2d.base.uri": redact(base["uri"])[:5000], "s2d.base.digest": base["digest"],
                "s2d.lora.r": str(adapters[out]["lora"]["r"])}
        base_lm = find_logged_model(c, exp_id, base["uri"])
        if base_lm is not None:
            tags["s2d.base.model"] = base_lm.model_id
        return tags
    for name, a in adapters.items():
        if a.get("merged") == out:
            return {"s2d.kind": "merged", "s2d.merged_from.uri": redact(manifest["outputs"][name])[:5000],
                    **({"s2d.merged_from.model": made[name]} if name in made else {}),
                    "s2d.base.uri": redact(a["base"]["uri"])[:5000]}
    return {}


def register(c, exp_id: str, name: str, uri: str, tags: dict) -> object | None:
    """A version of registered model ``name`` for the checkpoint at ``uri`` (its logged model), unless
    one exists already for that logged model. The version's source is the artifact URI itself where the
    registry accepts it (object stores), else the logged model (``models:/<id>``, for local paths)."""
    from mlflow.exceptions import MlflowException

    lm = find_logged_model(c, exp_id, uri)
    if lm is None:
        log.warning("MLflow: no logged model for %s: not registered as %s", uri, name)
        return None
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, tags={"s2d.kind": "checkpoint"},
                                  description="sparse-to-dense checkpoints; see each version's s2d.* tags for lineage")
    for mv in c.search_model_versions(f"name = '{quote(name)}'", max_results=1000):
        if mv.model_id == lm.model_id or mv.tags.get("s2d.model") == lm.model_id:
            return mv
    found = artifacts.find_manifest(uri)
    if found is None:
        log.warning("MLflow: %s has no manifest: not registered as %s", uri, name)
        return None
    # the version pins the manifest (and through it every file's sha256): resolve_model_uri refuses it once the
    # files behind the URI change, and a run refuses to overwrite them (workflow.guard_registered)
    tags = {"s2d.uri": uri, "s2d.model": lm.model_id, "s2d.stage_uri": found[0],
            MANIFEST_TAG: artifacts.manifest_sha256(found[0]), **tags}
    source = uri if "://" in uri and not uri.startswith("file://") else f"models:/{lm.model_id}"
    return c.create_model_version(name, source, run_id=lm.source_run_id, tags=tags, model_id=lm.model_id,
                                  await_creation_for=0)


MANIFEST_TAG = "s2d.manifest_sha256"


def pinning_versions(c, root: str, stage_uri: str, digest: str) -> list:
    """Registered versions (of any model) whose checkpoint lies in ``stage_uri`` and that pin the manifest with
    sha256 ``digest`` (versions registered before pinning, without the tag, count too: they cannot be told apart)."""
    stage_uri = stage_uri.rstrip("/")
    out = []
    for mv in c.search_model_versions(f"tags.`s2d.root` = '{quote(root)}'", max_results=1000):
        src = mv.tags.get("s2d.uri") or ""
        if (src == stage_uri or src.startswith(stage_uri + "/")) and mv.tags.get(MANIFEST_TAG, digest) == digest:
            out.append(mv)
    return out


def run_href(exp_id: str, run_id: str) -> str:
    """A link to a run page of the MLflow UI, relative to the page it is on (the UI routes after ``#``,
    so it works under any host and prefix), opening in the classic view (``workflowType``)."""
    return f"#/experiments/{exp_id}/runs/{run_id}?{UI_VIEW}"


def version_href(name: str, version) -> str:
    return f"#/models/{name}/versions/{version}?{UI_VIEW}"


def describe_version(c, exp_id: str, mv, role: str) -> str:
    """The version's description (markdown, rendered by the MLflow UI), from its lineage tags: links a
    person can click to the run that trained it, the workflow's parent run and, for a student, the
    teacher's registered version; the checkpoint URI. Set when it differs (a version registered by an
    older release gets it on the next report)."""
    from mlflow.exceptions import MlflowException

    def name_of(run_id):
        try:
            return c.get_run(run_id).info.run_name or run_id
        except MlflowException:
            return run_id

    what = {"teacher": "The RL teacher", "student": "The final student"}.get(role, role)
    parent = mv.tags.get("s2d.parent_run")
    lines = [f"{what} of workflow run [{name_of(parent)}]({run_href(exp_id, parent)})." if parent else f"{what}.", ""]
    if mv.run_id:
        lines.append(f"- Trained by run: [{name_of(mv.run_id)}]({run_href(exp_id, mv.run_id)})")
    if "/" in mv.tags.get("s2d.teacher_version", ""):
        name, version = mv.tags["s2d.teacher_version"].rsplit("/", 1)
        lines.append(f"- Teacher: [{name} version {version}]({version_href(name, version)})")
    if mv.tags.get("s2d.uri"):
        lines.append(f"- Checkpoint: `{mv.tags['s2d.uri']}`")
    text = "\n".join(lines)
    if (mv.description or "") != text:
        c.update_model_version(mv.name, mv.version, description=text)
    return text


def version_of(c, exp_id: str, name: str, uri: str):
    """The registered version of ``name`` for the checkpoint at ``uri`` (the one registered for its newest
    logged model, else the newest whose ``s2d.uri`` is ``uri``); None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name = '{quote(name)}'", max_results=1000)
    except MlflowException as e:
        if transient(e):
            raise
        return None
    lm = find_logged_model(c, exp_id, uri)
    match = [mv for mv in versions if lm and (mv.model_id == lm.model_id or mv.tags.get("s2d.model") == lm.model_id)]
    match = match or [mv for mv in versions if mv.tags.get("s2d.uri") == uri]
    return max(match, key=lambda mv: int(mv.version)) if match else None


def alias_holder(c, name: str, alias: str):
    """The version of ``name`` holding ``alias``; None when no version does (or the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if transient(e):
            raise
        return None


def checkpoint_of(c, mv) -> str | None:
    """A version's checkpoint URI: its ``s2d.uri`` tag, else its source (a logged model's ``s2d.uri``)."""
    src = mv.tags.get("s2d.uri") or mv.source
    if src.startswith("models:/"):
        lm = c.get_logged_model(src.removeprefix("models:/"))
        src = lm.tags.get("s2d.uri") or src
    return None if src.startswith("models:/") else src


def resolve_model_uri(uri: str) -> str:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> the version's checkpoint URI
    (its ``s2d.uri`` tag, else its source). Other URIs are returned unchanged.

    A version registered with a pinned manifest (``s2d.manifest_sha256``) resolves only while the manifest
    behind the URI is still that one: files republished, deleted or rewritten since the registration are an
    error (a ``ValueError`` starting with the ``models:/`` URI: one line, exit 2), never another model
    silently served under the old version number. Each file is then checked against the manifest's sha256
    when the stage reads it."""
    if storage.uri_kind(uri) != "registry":
        return uri
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/").strip("/")
    c = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.rpartition("/")
            if not name or not version.isdigit():
                raise ValueError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
            mv = c.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"{uri}: not found in the model registry at {redact(c.tracking_uri)} "
                         f"({redact(str(e)).splitlines()[0][:200]})") from None
    src = checkpoint_of(c, mv)
    if src is None:
        raise ValueError(f"{uri}: version {mv.version} of {mv.name} points at no checkpoint URI (no s2d.uri tag)")
    pinned = mv.tags.get(MANIFEST_TAG)
    if pinned is None:
        log.warning("%s: version %s of %s was registered without a pinned manifest; its files are not checked "
                    "against the registration", uri, mv.version, mv.name)
        return src
    found = artifacts.find_manifest(src)
    now = artifacts.manifest_sha256(found[0]) if found else None
    if now != pinned:
        what = (
            "has no manifest any more" if now is None else f"was republished (manifest sha256 {now[:12]}, pinned {pinned[:12]})"
        )
        raise ValueError(f"{uri}: {src} {what} since version {mv.version} of {mv.name} was registered: refusing to "
                         "resolve it to other files; register the new checkpoint or use its URI")
    return src
