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

import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager

from . import lineage
from .config import Tracking
from .lineage import HTTP_DEFAULTS, airflow_tags, metric_name, quote, transient
from .redact import redact

log = logging.getLogger("stages.tracking")

PARENT_ENV = "S2D_PARENT_RUN_ID"
RETRY_S = float(os.environ.get("S2D_MLFLOW_RETRY_S", "10"))  # probe interval while the server is away
IDLE_S = 30.0  # an idle sender thread ends after this long (a new record starts another)
MAX_BUFFERED = 100_000  # metric points kept while offline; the oldest go first (metrics.jsonl keeps all)
# the MLflow 3 UI opens an experiment of this kind on its runs (the classic ML view), not on GenAI traces
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached and ``tracking.required`` is set."""


def probe(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking server answers, else why not. Non-HTTP stores (sqlite) are local."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=(timeout, timeout))
        return None
    except requests.RequestException as e:
        return f"{type(e).__name__}: {redact(str(e))[:200]}"


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
        self.shown_uri = redact(self.tracking_uri)  # for messages: never a password inside the URI
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
                raise TrackingUnavailable(f"MLflow tracking server {self.shown_uri} is unreachable ({self.error}); "
                                          "start it, fix MLFLOW_TRACKING_URI, or set tracking.required=false to train "
                                          "without it (records are sent when it is back)")
            log.warning("MLflow at %s is unreachable (%s): training goes on, records are kept and sent when it is back",
                        self.shown_uri, self.error)
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
                    log.warning("MLflow at %s is back: sending %d buffered records", self.shown_uri, len(self._ops))
                self.error = None
                fn(self.client)
                tries = 0
                with self._cv:
                    self._points -= self._ops.popleft()[2]
            except Exception as e:  # noqa: BLE001 - tracking must never take the stage down
                tries += 1
                if transient(e) and tries < 5:
                    if not self.error:
                        log.warning("MLflow at %s stopped answering (%s): training goes on, records are kept",
                                    self.shown_uri, redact(str(e))[:300])
                    self.error = redact(str(e))[:300] or type(e).__name__
                else:
                    log.warning("MLflow refused %s: %s", desc, redact(str(e))[:300])
                    self.lost.append(f"{desc}: {redact(str(e))[:200]}")
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
    def experiment(self, c) -> str:
        """The experiment id (``tracking.experiment``, created with the classic-ML tags when missing); call
        with the client inside a record (:meth:`call`)."""
        if self.experiment_id is None:
            exp = c.get_experiment_by_name(self.cfg.experiment)
            self.experiment_id = exp.experiment_id if exp else c.create_experiment(self.cfg.experiment, tags=EXPERIMENT_TAGS)
            if exp and any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
                for k, v in EXPERIMENT_TAGS.items():
                    c.set_experiment_tag(self.experiment_id, k, v)
        return self.experiment_id

    def attach(self, run_id: str | None) -> None:
        """Send this tracker's records to an existing run (the workflow's parent run, opened elsewhere)."""
        self.run_id = run_id

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
        all_tags = {k: redact(str(v)) for k, v in {"mlflow.runName": name, **airflow_tags(), **(tags or {})}.items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id

        def create(c):
            if self.run_id is None:
                self.run_id = c.create_run(self.experiment(c), run_name=name, tags=all_tags).info.run_id

        self._put(f"create run {name}", create)
        if params:
            self.params(params)
        self.flush(0 if self.error else wait)
        return self.run_id

    def params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]  # a URI's password is never a param
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

        tags = [RunTag(k, redact(str(v))) for k, v in values.items()]
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
            self._put("input lineage", lambda c: self.run_id and lineage.link_inputs(c, self.experiment(c), self.run_id,
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
            self.run_id = lineage.reconcile(c, self.experiment(c), self.run_id, manifest, stage_uri, root, parent_run_id, history)

        self._put(f"reconcile {manifest['stage']}", rec)
        left = self.flush(timeout)
        if left or self.dropped:
            log.warning(
                "MLflow at %s did not record %s of stage %s (%s)%s; it is published, and the next run of "
                "the stage (a skip) records them",
                self.shown_uri,
                ", ".join(dict.fromkeys(left)) or "nothing",
                manifest["stage"],
                self.error or "no answer in time",
                f"; {self.dropped} metric points dropped from a full buffer (all are in metrics.jsonl)" if self.dropped else "",
            )
        return self.run_id


def close_runs(cfg: Tracking, root: str, status: str) -> list[str]:
    """End every run of ``root`` still RUNNING (the parent and its stages) with ``status``; the ids closed."""
    t = Tracker(cfg)
    if not t.enabled:
        return []

    def close(c):
        runs = c.search_runs([t.experiment(c)], f"tags.`s2d.root` = '{quote(root)}' and attributes.status = 'RUNNING'",
                             max_results=1000)
        for r in runs:
            c.set_terminated(r.info.run_id, status=status)
        return [r.info.run_id for r in runs]

    out = t.call(f"close runs of {root}", close)
    if out is None:
        raise TrackingUnavailable(
            f"MLflow tracking server {t.shown_uri} did not answer ({t.error}): runs of {root} not closed"
        )
    return out
