"""Plumbing every stage shares: inputs, skip-if-done, sampling, tracking, publishing (the training loop
with resume is ``stages/trainer.py``).

A stage module reads as its algorithm, top to bottom, and calls into here for everything else::

    run = StageRun("kl_warmup", cfg, root, inputs={"teacher": uri, "student": uri})
    if run.finished: return run.finished             # same config + same inputs already published
    teacher, student, tok = run.load_teacher_student(teacher_uri, student_uri)
    trainer = run.trainer("student", student, optim, steps)   # resumes from <root>/<stage>/_resume
    with run.tracking(trainer, datasets):             # the stage's MLflow child run
        history = trainer.fit(step_fn)                # step_fn: run.rollout_maker.sample -> loss -> trainer.update
        metrics = eval_metrics(run.rollout_maker, student, tok, eval_set)
        return run.publish({"model": student}, tok, metrics=metrics, extra=..., history=history)

One code path for one process and many: every stage runs with an ``accelerate.Accelerator`` (plain when
not launched; DDP-style or DeepSpeed ZeRO under ``accelerate launch``, see ``infra/accelerate/``). Under
several processes each rank samples its slice of every rollout batch and the slices are gathered, so every
rank trains on the same full batch; gradients are averaged (DeepSpeed: by its engine; otherwise one
all-reduce after backward), and only the main process writes resume states, artifacts and MLflow records.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import shutil
import time
import weakref
from pathlib import Path

import torch

from . import artifacts, cost, lora, models, prompting, storage
from .config import Config, InputError, Optim
from .plots import plot_history
from .rollout import Rollouts, Sampler, concat
from .task_contract import Problem
from .tasks import make_task
from .tracking import Tracker
from .trainer import Trainer, autocast, full_weights, make_accelerator

log = logging.getLogger("stages")


def seed_for(*parts) -> int:
    """A stable 63-bit seed from any parts (stage name, step, ...): resume replays the same draws."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


class RolloutMaker:
    """Sampling for one stage, all a scorer needs: prompts encoded, rows split across processes and
    gathered, the engine ``sampling.engine`` names (made on first use), seeds that replay on resume."""

    def __init__(self, cfg: Config, stage: str, accelerator, device: torch.device, task):
        self.cfg, self.stage, self.accelerator, self.device, self.task = cfg, stage, accelerator, device, task
        self.sampler: Sampler | None = None

    def encode(self, tok, problems: list[Problem]) -> list[list[int]]:
        """Prompt ids, through the chat template when ``task.chat_template`` says so (sampling, training
        and evaluation all encode here)."""
        return prompting.encode(tok, problems, self.cfg.task.chat_template)

    def sample(self, model, tok, problems: list[Problem], step: int, salt: str = "", greedy: bool = False,
               temperature: float | None = None, max_new_tokens: int | None = None) -> Rollouts:
        """Rollouts for ``problems`` (at the sampling settings unless given: evaluation's own). Under several
        processes each rank generates a contiguous slice of the rows (the uniforms are per row, so the
        tokens do not depend on the split) and every rank gets the gathered batch."""
        s = self.cfg.sampling
        if self.sampler is None:
            from .engines import make_sampler
            from .models import stop_ids

            # the generation config's EOS ids too: an instruct model may end its turn with another token
            self.sampler = make_sampler(s, stop_ids(tok, model), tok.pad_token_id, str(self.device))
        # evaluation draws do not depend on the stage, so one checkpoint scores the same everywhere
        scope = () if salt.startswith("eval") else (self.stage,)
        prompts = self.encode(tok, problems)
        acc = self.accelerator
        lo, hi = 0, len(prompts)
        if acc.num_processes > 1:
            w, r = acc.num_processes, acc.process_index
            lo, hi = r * len(prompts) // w, (r + 1) * len(prompts) // w
        ro = None
        if hi > lo:
            with full_weights(model), autocast(self.cfg, self.device):
                ro = self.sampler.generate(model, prompts[lo:hi], temperature=temperature or s.temperature,
                                           max_new_tokens=max_new_tokens or s.max_new_tokens, greedy=greedy,
                                           seed=seed_for(self.cfg.seed, *scope, salt, step), first_row=lo)
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = [p for p in gather_object([None if ro is None else ro.to("cpu")]) if p is not None]
            ro = (concat(parts, tok.pad_token_id) if len(parts) > 1 else parts[0]).to(self.device)
        cost.generated(ro, salt)  # the whole batch (every rank holds it after the gather)
        return ro


class StageRun:
    """One stage's execution: where it writes, whether it is already done, tracking, publishing.

    A stage module uses it top to bottom: load models, ``trainer()``, ``with tracking():`` train and
    score, ``publish(models, tokenizer, metrics=..., extra=..., history=...)``. Results leave through
    ``publish``'s arguments; nothing outside this class writes its attributes.
    """

    def __init__(self, stage: str, cfg: Config, root: str, inputs: dict[str, str] | None = None,
                 parent_run_id: str | None = None):
        self.stage, self.cfg, self.root, self.parent_run_id = stage, cfg, root, parent_run_id
        self.uri = storage.join(root, stage)
        self.inputs = inputs or {}
        self.task = make_task(cfg.task)
        self.config_hash = self._identity()
        self.finished = self._published()
        self.work, self._cleanup = self._scratch()
        self.started = time.perf_counter()
        self.accelerator = make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process
        self._gpus = self.accelerator.num_processes if cfg.device.startswith("cuda") else 0
        self.meter = None if self.finished else cost.Meter(self.device, self._gpus)  # what the stage costs (cost.py)
        self.tracker = None if self.finished else self._tracker()
        if not self.finished:
            self.check_splits()
        torch.set_num_threads(cfg.torch_threads or torch.get_num_threads())
        self.rollout_maker = RolloutMaker(cfg, stage, self.accelerator, self.device, self.task)

    def _identity(self) -> str:
        """The config hash that decides "already published" (:func:`stages.workflow.stage_identity`)."""
        from .workflow import stage_identity

        return stage_identity(self.cfg, self.stage, self.inputs, self.task)

    def recheck(self) -> None:
        """Decide "already published" again, now that this run holds the stage lock: a run that waited for
        the lock (``S2D_LOCK_WAIT_S``, an Airflow retry waiting out its previous try) finds what the holder
        published meanwhile and skips instead of training and republishing it."""
        finished = self._published()
        if finished is not None and self.finished is None:
            self.close()  # nothing to write: the scratch folder goes
            self.work, self._cleanup, self.tracker = None, None, None
        elif finished is None and self.finished is not None:  # removed or changed meanwhile: run it after all
            self.work, self._cleanup = self._make_scratch()
            self.tracker = self._tracker()
            self.check_splits()
            self.meter = cost.Meter(self.device, self._gpus)
        self.finished = finished

    def _published(self) -> dict | None:
        """The stage's manifest when it was published with this config hash, else None."""
        try:
            m = artifacts.read_manifest(self.uri)
        except storage.CorruptManifest as e:  # our own output, damaged: not finished, publishing rewrites it
            log.warning("%s; the stage runs again", e)
            m = None
        return m if m and m.get("config_hash") == self.config_hash else None

    def _scratch(self):
        """Local scratch for what is being written; nothing when the stage is already published. Removed by
        close(), publish(), garbage collection or interpreter exit (SIGTERM included, see ``stages/cli.py``);
        after a kill -9 the next run sweeps it (its name carries our pid)."""
        if self.finished:
            storage.sweep_scratch()
            return None, None
        return self._make_scratch()

    def _make_scratch(self):
        work = storage.make_scratch(self.stage)
        return work, weakref.finalize(self, shutil.rmtree, str(work), True)

    def _tracker(self) -> Tracker:
        """The stage's tracker; only the main process records (the others get a disabled one)."""
        cfg = self.cfg.tracking
        return Tracker(cfg if self.is_main else cfg.model_copy(update={"enabled": False}))

    def check_splits(self) -> None:
        """Empty data splits are found here, before any model loads or MLflow run starts."""
        from .registry import STAGES

        spec = STAGES.get(self.stage.split("/")[0])
        # a stage trains on its splits (together: direct_grpo uses two) and evaluates on eval
        for group in spec.groups() if spec else []:
            if not any(self.task.problems(split) for split in group):
                raise InputError(f"{self.stage}: the task split{'s' if len(group) > 1 else ''} {' and '.join(group)} "
                                 f"{'are' if len(group) > 1 else 'is'} empty (task.sizes / task.files)")

    def close(self) -> None:
        """Remove the scratch folder (idempotent)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ models
    def trains(self, role: str) -> bool:
        """Whether this stage trains the model of ``role`` (``teacher`` / ``student``)."""
        from .registry import STAGES

        spec = STAGES.get(self.stage.split("/")[0])
        return bool(spec and spec.trains == role)

    def lora_seed(self, role: str) -> int:
        """The seed of a fresh adapter's initial weights (the same on a rerun or a resume)."""
        return seed_for(self.cfg.seed, self.stage, role, "lora") % 2**63

    def load_model(self, uri: str, role: str, trained: bool | None = None):
        """Load a checkpoint: a published artifact (verified) or, when no manifest exists, a hub id or plain folder.
        A published LoRA adapter loads as its base + the adapter; a role this stage trains with
        ``models.<role>.lora`` set gets an adapter to train (``stages/lora.py``)."""
        trained = self.trains(role) if trained is None else trained
        got = lora.load(self, uri, role, self.load_model, trained)
        if got is not None:
            model, tok = got
            model.to(self.device)
            return model, tok
        spec = getattr(self.cfg.models, role, None)
        found = artifacts.find_manifest(uri) if storage.uri_kind(uri) != "hub" else None
        path = artifacts.fetch(uri) if found else uri
        model, tok = models.load(path, spec, self.cfg.dtype, role=role)
        if trained and spec is not None and spec.lora is not None:
            lora.attach_new(model, spec.lora, role, uri, lora.base_digest(uri), str(path), self.lora_seed(role))
        model.to(self.device)
        return model, tok

    @property
    def device(self) -> torch.device:
        """This process's device: the config's (``cpu``) or, on GPUs, the one accelerate assigned."""
        return torch.device("cpu") if self.cfg.device == "cpu" else self.accelerator.device

    def load_teacher_student(self, teacher_uri: str, student_uri: str):
        """Both models for distillation, after checking they share one tokenizer; the teacher frozen."""
        teacher, t_tok = self.load_model(teacher_uri, "teacher")
        student, tok = self.load_model(student_uri, "student")
        models.check_compatible(t_tok, tok, teacher, student)
        return self.frozen(teacher), student, tok

    def frozen(self, model):
        """``model`` for inference only (a teacher): no gradients, eval mode, and under bf16 autocast held in bf16.
        A frozen model needs no float32 master copy; autocast caches its bf16 weight casts only for weights that
        require grad, so a float32 frozen model would be cast again at every forward (every decoded token)."""
        model.requires_grad_(False).eval()
        return model.to(torch.bfloat16) if self.cfg.autocast == "bfloat16" else model

    def trainer(self, name: str, model, optim: Optim, steps: int, metric_prefix: str = "") -> "Trainer":
        """The training loop for ``model``, restored from its last saved state when one exists."""
        trainer = Trainer(self, name, model, optim, steps, metric_prefix)
        trainer.restore()
        return trainer

    # ------------------------------------------------------------ tracking
    @contextlib.contextmanager
    def tracking(self, trainer: "Trainer | None" = None, datasets: dict[str, list[Problem]] | None = None,
                 context: str = "training"):
        """The stage's MLflow child run for the block: created (params, input lineage, dataset inputs) or,
        when ``trainer`` resumed a state, reopened; ended FINISHED, or FAILED on an exception. Never blocks
        on an unreachable server: records are kept and sent when it is back (see ``tracking``)."""
        resume_run_id = (trainer.resumed or {}).get("mlflow_run_id") if trainer else None
        params = {"stage": self.stage, "config_hash": self.config_hash, "root": self.root, "preset": self.cfg.name}
        section = getattr(self.cfg, self.stage, None)
        if section is not None:
            params.update({f"{self.stage}.{k}": v for k, v in _flatten(section.model_dump()).items()})
        params.update({"seed": self.cfg.seed, "sampling.temperature": self.cfg.sampling.temperature,
                       "sampling.max_new_tokens": self.cfg.sampling.max_new_tokens})
        self.tracker.start(self.stage, self.parent_run_id, tags={"s2d.stage": self.stage, "s2d.root": self.root},
                           resume_run_id=resume_run_id, params=None if resume_run_id else params)
        if not resume_run_id:
            self.tracker.link_inputs(self.stage, self.root, self.inputs)
            for split, problems in (datasets or {}).items():
                digest = hashlib.sha256("\n".join(p.id + p.prompt for p in problems).encode()).hexdigest()[:16]
                self.tracker.dataset(f"{self.cfg.task.kind}/{split}", digest, f"task:{self.cfg.task.kind}:{split}",
                                     len(problems), context)
        with self.tracker.running():
            yield self

    @property
    def run_id(self) -> str | None:
        """The stage's MLflow run id; None until the tracking server has created the run."""
        return self.tracker.run_id if self.tracker else None

    # ------------------------------------------------------------ publish
    @property
    def rollout_file(self) -> Path:
        return self.work / "out" / "rollouts.jsonl"

    def record_rollouts(self, step: int, problems: list[Problem], texts: list[str], rewards: list[float] | None = None) -> None:
        """Append this step's rollouts (published as ``rollouts.jsonl``, kept in the resume state)."""
        self.rollout_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rollout_file, "a") as f:
            for i, (p, t) in enumerate(zip(problems, texts)):
                row = {"step": step, "problem_id": p.id, "prompt": p.prompt, "completion": t}
                if rewards is not None:
                    row["reward"] = rewards[i]
                f.write(storage.dumps(row) + "\n")

    def publish(self, models_out: dict, tokenizer, *, metrics: dict, extra: dict | None = None,
                history: list[dict] | None = None, outputs: dict[str, str] | None = None,
                elsewhere: dict[str, str] | None = None) -> dict:
        """Write the stage's outputs (checkpoints ``models_out``, ``metrics.jsonl`` and curves from
        ``history``), then the manifest (``metrics`` and ``extra`` in it) last; record them in MLflow.
        ``outputs``: other folders the stage wrote under its out/ (name -> path there, e.g. Parquet data);
        ``elsewhere``: outputs published under another manifest (name -> URI, e.g. the shared store's),
        which readers find through :func:`stages.artifacts.located`."""
        acc = self.accelerator
        out = self.work / "out"
        adapters, more = {}, {}
        for name, model in models_out.items():
            with full_weights(model):  # under ZeRO-3 every rank takes part in gathering the weights
                if self.is_main and lora.adapter_of(model) is not None:  # the adapter (+ merged with publish_merged)
                    extra_out, adapters[name] = lora.publish_outputs(model, tokenizer, out, name, models.save)
                    more |= extra_out
                elif self.is_main:
                    models.save(model, tokenizer, out / name)
        if not self.is_main:  # the main process publishes; the others return what it published
            acc.wait_for_everyone()
            self.close()
            return artifacts.read_manifest(self.uri)
        out.mkdir(parents=True, exist_ok=True)
        if history is not None:
            with open(out / "metrics.jsonl", "w") as f:
                for r in history:
                    f.write(storage.dumps(r) + "\n")
            plot_history(history, out / "curves.png", f"{self.stage} ({self.cfg.name})")
        manifest = {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "outputs": {name: storage.join(self.uri, name) for name in models_out}
                       | {name: storage.join(self.uri, rel) for name, rel in {**(outputs or {}), **more}.items()}
                       | (elsewhere or {}),
            "metrics": metrics,
            "mlflow_run_id": self.run_id,
            "wall_time_s": round(time.perf_counter() - self.started, 1),
            **(extra or {}),
            **({"adapters": adapters} if adapters else {}),
        }
        if self.meter is not None:  # last: the reading covers everything the stage did before publishing
            manifest["cost"] = self.meter.read(manifest.get("labeled_examples", 0), self.cfg.cost.usd_per_accelerator_hour)
        manifest = artifacts.publish(out, self.uri, manifest)
        artifacts.clear_state(self.uri)
        if self.tracker and self.tracker.enabled:
            # after the manifest: an unreachable server costs a warning, never the stage (a skip repairs it)
            for name in ("metrics.jsonl", "curves.png"):
                if (out / name).exists():
                    self.tracker.artifact(str(out / name))
            self.tracker.reconcile(manifest, self.uri, self.root, self.parent_run_id, history)
        self.close()
        acc.wait_for_everyone()
        return manifest

    # ------------------------------------------------------------ data
    def batch_of(self, problems: list[Problem], n: int, step: int, salt: str = "") -> list[Problem]:
        """Problems for ``step``: consecutive slices of a seeded permutation, reshuffled each epoch."""
        if not problems:
            raise ValueError(f"{self.stage}: the data split is empty")
        out = []
        for i in range(step * n, step * n + n):
            epoch, j = divmod(i, len(problems))
            out.append(problems[self._order(len(problems), salt, epoch)[j]])
        return out

    @functools.lru_cache(maxsize=8)
    def _order(self, size: int, salt: str, epoch: int) -> list[int]:
        order = list(range(size))
        random.Random(seed_for(self.cfg.seed, self.stage, salt, epoch)).shuffle(order)
        return order


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
