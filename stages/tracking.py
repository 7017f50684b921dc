"""MLflow tracking: one parent run per workflow run, one child run per stage, one logged model per
published checkpoint, registered versions for the final student and the RL teacher.

Tracking never stops or slows training. Every call made while a stage trains is put in a bounded
outbox and sent by a background thread; when the server is unreachable (down, dying, or a socket that
never answers) the thread keeps the records, probes the server every ``RETRY_S`` seconds and sends them
when it is back. Each HTTP request is bounded (``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
``..._MAX_RETRIES`` / ``..._BACKOFF_*``, defaults set below for the stage process, the environment
overrides them). When a stage publishes, its run is *reconciled* from the manifest: buffered metrics,
the metric history (``metrics.jsonl``), final metrics, input/output lineage, logged models, status
FINISHED. The manifest is published first, so a server that is still down costs a warning, never
the stage; a later run of the stage (a skip) reconciles again, which also repairs a run left RUNNING
by a kill just after the manifest. ``tracking.required: true`` makes an unreachable server at start a
fast error instead.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``); unset, MLflow's local default
(``sqlite:///mlflow.db`` in the working directory) is used. Children are linked with the
``mlflow.parentRunId`` tag, which works across processes (Airflow tasks, containers).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager

from . import artifacts
from .config import Tracking

log = logging.getLogger("stages.tracking")

PARENT_ENV = "S2D_PARENT_RUN_ID"
# bounded HTTP requests for the stage process (MLflow's defaults retry one call for ~4 minutes)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}
RETRY_S = float(os.environ.get("S2D_MLFLOW_RETRY_S", "10"))  # probe interval while the server is away
IDLE_S = 30.0  # an idle sender thread ends after this long (a new record starts another)
MAX_BUFFERED = 100_000  # metric points kept while offline; the oldest go first (metrics.jsonl keeps all)
# the MLflow 3 UI opens an experiment of this kind on its runs (the classic ML view), not on GenAI traces
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
AIRFLOW_ENV = ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER")


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached and ``tracking.required`` is set."""


PLOTTED = ("reward", "loss", "kl", "forward_kl", "c2", "entropy")


def plot_history(history: list[dict], path, title: str) -> bool:
    """Training curves (reward, loss, KL, C2, entropy per step) as one PNG; False when nothing to plot."""
    keys = [k for k in PLOTTED if any(k in h for h in history)]
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


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


def _transient(e: BaseException) -> bool:
    """Connection-level failure (server down, hung, restarting): keep the record and retry later.
    A server that answered with an MLflow error (bad value, missing run) is not retried."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, RestException):
        return e.get_http_status_code() >= 500
    if isinstance(e, MlflowException):
        msg = str(e)
        return msg.startswith("API request to") or "Response body" in msg or "status code 5" in msg
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__module__.startswith(("requests", "urllib3", "sqlalchemy"))


def probe(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking server answers, else why not. Non-HTTP stores (sqlite) are local."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=(timeout, timeout))
        return None
    except requests.RequestException as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


class Tracker:
    """MLflow records of one run (a stage's child run or the workflow's parent), sent in the background.

    With tracking disabled every call is a no-op. Calls return at once; :meth:`flush` waits (bounded)
    for what is queued. ``run_id`` is None until the server has created the run.
    """

    def __init__(self, cfg: Tracking):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        if not self.enabled:
            return
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.lost: list[str] = []  # records the server refused (logged as warnings)
        self.dropped = 0  # metric points dropped from a full outbox
        self._ops: deque = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._wake = False
        self._points = 0  # metric points in the outbox
        self._attempts = 0  # sends and probes finished: lets flush stop early while the server is away
        self.error = probe(self.tracking_uri)
        if self.error:
            if cfg.required:
                raise TrackingUnavailable(f"MLflow tracking server {self.tracking_uri} is unreachable ({self.error}); "
                                          "start it, fix MLFLOW_TRACKING_URI, or set tracking.required=false to train "
                                          "without it (records are sent when it is back)")
            log.warning("MLflow at %s is unreachable (%s): training goes on, records are kept and sent when it is back",
                        self.tracking_uri, self.error)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the outbox
    def _put(self, desc: str, fn, metrics: int = 0) -> None:
        with self._cv:
            if self._thread is None:  # the sender runs while there is something to send (then idles out)
                self._thread = threading.Thread(target=self._work, name="mlflow-outbox", daemon=True)
                self._thread.start()
            self._ops.append((desc, fn, metrics))
            self._points += metrics
            if metrics and self._points > MAX_BUFFERED:  # full: the oldest metric record goes
                for i, op in enumerate(self._ops):
                    if op[2]:
                        del self._ops[i]
                        self.dropped += op[2]
                        self._points -= op[2]
                        break
            self._cv.notify_all()

    def _work(self) -> None:
        tries = 0
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._ops, timeout=IDLE_S):
                    self._thread = None
                    return
                if self.error:  # offline: wait, then probe before sending anything
                    self._cv.wait_for(lambda: self._wake, timeout=RETRY_S)
                    self._wake = False
                desc, fn, _ = self._ops[0]
                self._busy = True
            try:
                if self.error and (why := probe(self.tracking_uri)):
                    self.error = why
                    continue
                if self.error:
                    log.warning("MLflow at %s is back: sending %d buffered records", self.tracking_uri, len(self._ops))
                self.error = None
                fn(self.client)
                tries = 0
                with self._cv:
                    self._points -= self._ops.popleft()[2]
            except Exception as e:  # noqa: BLE001 - tracking must never take the stage down
                tries += 1
                if _transient(e) and tries < 5:
                    if not self.error:
                        log.warning("MLflow at %s stopped answering (%s): training goes on, records are kept",
                                    self.tracking_uri, str(e)[:300])
                    self.error = str(e)[:300] or type(e).__name__
                else:
                    log.warning("MLflow refused %s: %s", desc, str(e)[:300])
                    self.lost.append(f"{desc}: {str(e)[:200]}")
                    tries = 0
                    with self._cv:
                        self._points -= self._ops.popleft()[2]
            finally:
                with self._cv:
                    self._busy = False
                    self._attempts += 1
                    self._cv.notify_all()

    def pending(self) -> list[str]:
        with self._cv:
            return [d for d, _, _ in self._ops] if self.enabled else []

    def flush(self, timeout: float | None = None) -> list[str]:
        """Wait until everything queued is sent (at most ``timeout`` s, default
        ``tracking.flush_timeout_s``); returns what is still unsent."""
        if not self.enabled:
            return []
        deadline = time.monotonic() + (self.cfg.flush_timeout_s if timeout is None else timeout)
        with self._cv:
            self._wake = True  # an offline outbox probes now rather than at its next interval
            self._cv.notify_all()
            start = self._attempts
            while (self._ops or self._busy) and (left := deadline - time.monotonic()) > 0:
                # the server is away and was tried again since this flush began: do not wait for it
                if self.error and self._attempts > start and not self._busy:
                    break
                self._cv.wait(timeout=min(left, 0.5))
            return [d for d, _, _ in self._ops]

    def call(self, desc: str, fn, timeout: float | None = None):
        """Run ``fn(client)`` through the outbox and wait (bounded) for its result; None when the
        server did not answer in time (the call stays queued and runs when it is back)."""
        if not self.enabled:
            return None
        box: dict = {}
        self._put(desc, lambda c: box.setdefault("out", fn(c)))
        self.flush(timeout)
        return box.get("out")

    # ------------------------------------------------------------ records
    def _experiment(self, c) -> str:
        if self.experiment_id is None:
            exp = c.get_experiment_by_name(self.cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else c.create_experiment(self.cfg.experiment, tags=EXPERIMENT_TAGS)
            if exp and any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
                for k, v in EXPERIMENT_TAGS.items():
                    c.set_experiment_tag(self.experiment_id, k, v)
        return self.experiment_id

    def start(self, name: str, parent_run_id: str | None = None, tags: dict | None = None,
              resume_run_id: str | None = None, params: dict | None = None, wait: float | None = None) -> str | None:
        """Create the run (or reopen ``resume_run_id``); waits at most ``wait`` s for its id (default:
        the flush timeout while the server answers, none while it is away)."""
        if not self.enabled:
            return None
        if resume_run_id:
            self.run_id = resume_run_id
            self._put("reopen run", lambda c: c.update_run(resume_run_id, status="RUNNING"))
            return resume_run_id
        all_tags = {"mlflow.runName": name, **airflow_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id

        def create(c):
            if self.run_id is None:
                self.run_id = c.create_run(self._experiment(c), run_name=name, tags=all_tags).info.run_id

        self._put(f"create run {name}", create)
        if params:
            self.params(params)
        self.flush(0 if self.error else wait)
        return self.run_id

    def params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._put("params", lambda c, batch=items[i : i + 100]: self.run_id and c.log_batch(self.run_id, params=batch))

    def metrics(self, values: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(metric_name(k), float(v), ts, step or 0) for k, v in values.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if ms:
            self._put(f"metrics of step {step or 0}", lambda c: self.run_id and c.log_batch(self.run_id, metrics=ms), len(ms))

    def tags(self, values: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in values.items()]
        self._put("tags", lambda c: self.run_id and c.log_batch(self.run_id, tags=tags))

    def dataset(self, name: str, digest: str, source: str, rows: int, context: str) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="s2d", source=source, profile=f'{{"num_rows": {rows}}}')
        self._put(f"dataset {name}", lambda c: self.run_id and c.log_inputs(
            self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])]))

    def artifact(self, path: str) -> None:
        if self.enabled:
            self._put(f"artifact {os.path.basename(path)}", lambda c: self.run_id and c.log_artifact(self.run_id, path))

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            self._put(f"artifact {name}", lambda c: self.run_id and c.log_text(self.run_id, text, name))

    def link_inputs(self, stage: str, root: str, inputs: dict[str, str]) -> None:
        """Tag each input with its role (uniform across stages), the producing run and its logged model,
        and log that model as an input of this run; the full URIs go to params ``input.<role>``."""
        if self.enabled and inputs:
            self._put("input lineage", lambda c: self.run_id and _link_inputs(c, self._experiment(c), self.run_id,
                                                                               stage, root, inputs))

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._put(f"end run {status}", lambda c: self.run_id and c.set_terminated(self.run_id, status=status))

    @contextmanager
    def running(self):
        """End the run FINISHED on success, FAILED on an exception (KILLED on Ctrl-C)."""
        try:
            yield self
        except KeyboardInterrupt:
            self.end("KILLED")
            self.flush(5)
            raise
        except BaseException:
            self.end("FAILED")
            self.flush(5)
            raise
        else:
            self.end("FINISHED")

    # ------------------------------------------------------------ publish
    def reconcile(self, manifest: dict, stage_uri: str, root: str, parent_run_id: str | None = None,
                  history: list[dict] | None = None, timeout: float | None = None) -> str | None:
        """Make the stage's run say what the manifest says (idempotent): the run (found by id or by
        stage + config hash, created when the server was away the whole time), its parent, inputs,
        metric history, final metrics, outputs as logged models, status FINISHED. Waits (bounded);
        when the server is still away, warns what is not recorded. Returns the run id."""
        if not self.enabled:
            return None

        def rec(c):
            self.run_id = _reconcile(c, self._experiment(c), self.run_id, manifest, stage_uri, root, parent_run_id, history)

        self._put(f"reconcile {manifest['stage']}", rec)
        left = self.flush(timeout)
        if left or self.dropped:
            log.warning("MLflow at %s did not record %s of stage %s (%s)%s; it is published, and the next run of "
                        "the stage (a skip) records them", self.tracking_uri, ", ".join(dict.fromkeys(left)) or "nothing",
                        manifest["stage"], self.error or "no answer in time",
                        f"; {self.dropped} metric points dropped from a full buffer (all are in metrics.jsonl)" if self.dropped else "")
        return self.run_id


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
    lm = find_logged_model(c, exp_id, uri)
    return rid, lm.model_id if lm else None


def _link_inputs(c, exp_id: str, rid: str, stage: str, root: str, inputs: dict) -> None:
    from mlflow.entities import LoggedModelInput, Param, RunTag

    tags, params, models = [], [], []
    for key, uri in inputs.items():
        role = role_of(stage, key)
        tags.append(RunTag(f"s2d.input.{role}", short_uri(uri, root)))
        params.append(Param(f"input.{role}", uri[:6000]))
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


def _reconcile(c, exp_id: str, rid: str | None, manifest: dict, stage_uri: str, root: str,
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
            if _transient(e):
                raise
    if run is None:
        run = find_stage_run(c, exp_id, stage, manifest["config_hash"], root)
    if run is None:  # the server was away for the whole stage: make its run now
        tags = {"mlflow.runName": stage, "s2d.stage": stage, "s2d.root": root, **airflow_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = c.create_run(exp_id, run_name=stage, tags=tags)
        c.log_batch(run.info.run_id, params=[Param("stage", stage), Param("config_hash", manifest["config_hash"]),
                                             Param("root", root)])
    rid = run.info.run_id
    if run.data.tags.get("s2d.published") == manifest.get("published_at") and run.info.status == "FINISHED":
        return rid  # already recorded
    tags = {}
    if parent_run_id and "mlflow.parentRunId" not in run.data.tags:
        tags["mlflow.parentRunId"] = parent_run_id
    if manifest.get("inputs") and not any(k.startswith("s2d.input.") for k in run.data.tags):
        _link_inputs(c, exp_id, rid, stage, root, manifest["inputs"])
    # the step history: whatever the outbox could not send comes from the published metrics.jsonl
    if history is None and "metrics.jsonl" in manifest.get("files", {}):
        raw = artifacts.store_for(stage_uri).read_bytes(artifacts.join(stage_uri, "metrics.jsonl"))
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
    missing += [Metric(k, v, ts, 0) for k, v in final.items() if run.data.metrics.get(k) != v]
    for i in range(0, len(missing), 1000):
        c.log_batch(rid, metrics=missing[i : i + 1000])
    # outputs: short tags, full URIs as params, each checkpoint a logged model pointing at its URI
    outputs = manifest.get("outputs", {})
    tags |= {f"s2d.output.{k}": short_uri(v, root) for k, v in outputs.items()}
    out_params = [Param(f"output.{k}", v[:6000]) for k, v in outputs.items() if f"output.{k}" not in run.data.params]
    for out, uri in outputs.items():
        lm = find_logged_model(c, exp_id, uri)
        if lm is None or lm.source_run_id != rid or lm.tags.get("s2d.published") != manifest.get("published_at"):
            lm = c.create_logged_model(exp_id, name=model_name(stage, out), source_run_id=rid, model_type="s2d-checkpoint",
                                       tags={"s2d.uri": uri, "s2d.stage": stage, "s2d.root": root, "s2d.output": out,
                                             "s2d.published": manifest.get("published_at", ""), "mlflow.model.isExternal": "true"},
                                       params={"config_hash": manifest["config_hash"],
                                               **{f"input.{role_of(stage, k)}": v[:6000] for k, v in manifest.get("inputs", {}).items()}})
            c.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
            c.log_outputs(rid, [LoggedModelOutput(lm.model_id, 0)])
        tags[f"s2d.output.{out}.model"] = lm.model_id
    tags["s2d.manifest"] = short_uri(artifacts.join(stage_uri, artifacts.MANIFEST), root)
    c.log_batch(rid, params=out_params, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if run.info.status != "FINISHED":
        c.set_terminated(rid, status="FINISHED")
    c.set_tag(rid, "s2d.published", manifest.get("published_at", ""))  # last: marks the run complete
    return rid


# ---------------------------------------------------------------- registry, closing, resolving


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
    tags = {"s2d.uri": uri, "s2d.model": lm.model_id, **tags}
    source = uri if "://" in uri and not uri.startswith("file://") else f"models:/{lm.model_id}"
    return c.create_model_version(name, source, run_id=lm.source_run_id, tags=tags, model_id=lm.model_id,
                                  await_creation_for=0)


def close_runs(cfg: Tracking, root: str, status: str) -> list[str]:
    """End every run of ``root`` still RUNNING (the parent and its stages) with ``status``; the ids closed."""
    t = Tracker(cfg)
    if not t.enabled:
        return []

    def close(c):
        runs = c.search_runs([t._experiment(c)], f"tags.`s2d.root` = '{quote(root)}' and attributes.status = 'RUNNING'",
                             max_results=1000)
        for r in runs:
            c.set_terminated(r.info.run_id, status=status)
        return [r.info.run_id for r in runs]

    out = t.call(f"close runs of {root}", close)
    if out is None:
        raise TrackingUnavailable(f"MLflow tracking server {t.tracking_uri} did not answer ({t.error}): runs of {root} not closed")
    return out


def resolve_model_uri(uri: str) -> str:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> the version's checkpoint URI
    (its ``s2d.uri`` tag, else its source). Other URIs are returned unchanged."""
    if artifacts.uri_kind(uri) != "registry":
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
        raise ValueError(f"{uri}: not found in the model registry at {c.tracking_uri} ({str(e).splitlines()[0][:200]})") from None
    src = mv.tags.get("s2d.uri") or mv.source
    if src.startswith("models:/"):
        lm = c.get_logged_model(src.removeprefix("models:/"))
        src = lm.tags.get("s2d.uri") or src
    if src.startswith("models:/"):
        raise ValueError(f"{uri}: version {mv.version} of {mv.name} points at no checkpoint URI (no s2d.uri tag)")
    return src
