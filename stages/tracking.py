"""MLflow tracking: one parent run per workflow run, one child run per stage.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``); unset, MLflow's local default
(``sqlite:///mlflow.db`` in the working directory) is used. Children are linked with the
``mlflow.parentRunId`` tag, which works across processes (Airflow tasks, containers).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from .config import Tracking

PARENT_ENV = "S2D_PARENT_RUN_ID"


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


class Tracker:
    """A thin wrapper over ``MlflowClient``; with tracking disabled every call is a no-op."""

    def __init__(self, cfg: Tracking):
        self.enabled = cfg.enabled
        self.run_id: str | None = None
        if not self.enabled:
            return
        import mlflow
        from mlflow import MlflowClient

        self.client = MlflowClient()
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        self.tracking_uri = mlflow.get_tracking_uri()

    def start(self, name: str, parent_run_id: str | None = None, tags: dict | None = None, resume_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        all_tags = {"mlflow.runName": name, **(tags or {})}
        for key in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TRY_NUMBER"):
            if os.environ.get(key):
                all_tags["airflow." + key.removeprefix("AIRFLOW_CTX_").lower()] = os.environ[key]
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def params(self, params: dict) -> None:
        if self.enabled and self.run_id:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict, step: int | None = None) -> None:
        if not (self.enabled and self.run_id):
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        # MLflow names allow no '@': avg@8 is logged as avg_at_8
        ms = [Metric(k.replace("@", "_at_"), float(v), ts, step or 0) for k, v in values.items() if isinstance(v, (int, float))]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def tags(self, values: dict) -> None:
        if self.enabled and self.run_id:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def dataset(self, name: str, digest: str, source: str, rows: int, context: str) -> None:
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="s2d", source=source, profile=f'{{"num_rows": {rows}}}')
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    def artifact(self, path: str) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifact(self.run_id, path)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def running(self):
        """End the run FINISHED on success, FAILED on an exception (KILLED on Ctrl-C)."""
        try:
            yield self
        except KeyboardInterrupt:
            self.end("KILLED")
            raise
        except BaseException:
            self.end("FAILED")
            raise
        else:
            self.end("FINISHED")
