"""Plumbing every stage shares: inputs, skip-if-done, sampling, the training loop with resume, publishing.

A stage module reads as its algorithm, top to bottom, and calls into here for everything else::

    run = StageRun("kl_warmup", cfg, root, inputs={"teacher": uri, "student": uri})
    if run.finished: return run.finished             # same config + same inputs already published
    teacher, student, tok = run.load_teacher_student(teacher_uri, student_uri)
    trainer = run.trainer("student", student, optim, steps)   # resumes from <root>/<stage>/_resume
    with run.tracking(trainer, datasets):             # the stage's MLflow child run
        history = trainer.fit(step_fn)                # step_fn: run.rollouts.sample -> loss -> trainer.update
        metrics = score(run.rollouts, student, tok, eval_set)
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
import math
import os
import random
import shutil
import time
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from . import artifacts, models, prompting
from .config import Config, InputError, Optim
from .rollout import Rollouts, Sampler, concat
from .tasks import Problem, data_digest, make_task, stage_splits
from .tracking import Tracker, plot_history

log = logging.getLogger("stages")


class Divergence(RuntimeError):
    """A non-finite loss or gradient norm: the stage stops before the optimizer step and publishes nothing."""


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

            self.sampler = make_sampler(s, tok.eos_token_id, tok.pad_token_id, str(self.device))
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
            with full_weights(model):
                ro = self.sampler.generate(model, prompts[lo:hi], temperature=temperature or s.temperature,
                                           max_new_tokens=max_new_tokens or s.max_new_tokens, greedy=greedy,
                                           seed=seed_for(self.cfg.seed, *scope, salt, step), first_row=lo)
        if acc.num_processes == 1:
            return ro
        from accelerate.utils import gather_object

        parts = [p for p in gather_object([None if ro is None else ro.to("cpu")]) if p is not None]
        return (concat(parts, tok.pad_token_id) if len(parts) > 1 else parts[0]).to(self.device)


class StageRun:
    """One stage's execution: where it writes, whether it is already done, tracking, publishing.

    A stage module uses it top to bottom: load models, ``trainer()``, ``with tracking():`` train and
    score, ``publish(models, tokenizer, metrics=..., extra=..., history=...)``. Results leave through
    ``publish``'s arguments; nothing outside this class writes its attributes.
    """

    def __init__(self, stage: str, cfg: Config, root: str, inputs: dict[str, str] | None = None,
                 parent_run_id: str | None = None):
        self.stage, self.cfg, self.root = stage, cfg, root
        self.uri = artifacts.join(root, stage)
        self.inputs = inputs or {}
        # inputs are identified by URI and by the digest of the manifest that published them
        ident = {k: f"{v}@{_input_digest(v)}" for k, v in self.inputs.items()}
        # ... and by the problems it reads: editing a data file (or a task plugin) in place re-runs it
        self.task = make_task(cfg.task)
        ident["task_data"] = data_digest(self.task, stage_splits(stage, cfg))
        self.config_hash = cfg.stage_hash(stage, ident)
        try:
            m = artifacts.read_manifest(self.uri)
        except artifacts.CorruptManifest as e:  # our own output, damaged: not finished, publishing rewrites it
            log.warning("%s; the stage runs again", e)
            m = None
        self.finished = m if m and m.get("config_hash") == self.config_hash else None
        # local scratch for what is being written; nothing when the stage is already published. Removed
        # by close(), publish(), garbage collection or interpreter exit (SIGTERM included, see __main__);
        # after a kill -9 the next run sweeps it (its name carries our pid)
        self.work = None if self.finished else artifacts.make_scratch(stage)
        if self.finished:
            artifacts.sweep_scratch()
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.work), True) if self.work else None
        self.started = time.perf_counter()
        self.parent_run_id = parent_run_id
        self.accelerator = make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process
        tracking = cfg.tracking if self.is_main else cfg.tracking.model_copy(update={"enabled": False})
        self.tracker = Tracker(tracking) if not self.finished else None
        if not self.finished:
            self.check_splits()
        torch.set_num_threads(cfg.torch_threads or torch.get_num_threads())
        self.rollouts = RolloutMaker(cfg, stage, self.accelerator, self.device, self.task)

    def check_splits(self) -> None:
        """Empty data splits are found here, before any model loads or MLflow run starts."""
        from .registry import STAGES

        spec = STAGES.get(self.stage.split("/")[0])
        # a stage trains on its splits (together: direct_grpo uses two) and evaluates on eval
        for group in [spec.splits, ("eval",)] if spec else []:
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
    def load_model(self, uri: str, role: str):
        """Load a checkpoint: a published artifact (verified) or, when no manifest exists, a hub id or plain folder."""
        spec = getattr(self.cfg.models, role, None)
        found = artifacts.find_manifest(uri) if artifacts.uri_kind(uri) != "hub" else None
        path = artifacts.fetch(uri) if found else uri
        model, tok = models.load(path, spec, self.cfg.dtype, role=role)
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
        teacher.requires_grad_(False).eval()
        return teacher, student, tok

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
                f.write(artifacts.dumps(row) + "\n")

    def publish(self, models_out: dict, tokenizer, *, metrics: dict, extra: dict | None = None,
                history: list[dict] | None = None, outputs: dict[str, str] | None = None) -> dict:
        """Write the stage's outputs (checkpoints ``models_out``, ``metrics.jsonl`` and curves from
        ``history``), then the manifest (``metrics`` and ``extra`` in it) last; record them in MLflow.
        ``outputs``: other folders the stage wrote under its out/ (name -> path there, e.g. Parquet data)."""
        acc = self.accelerator
        out = self.work / "out"
        for name, model in models_out.items():
            with full_weights(model):  # under ZeRO-3 every rank takes part in gathering the weights
                if self.is_main:
                    models.save(model, tokenizer, out / name)
        if not self.is_main:  # the main process publishes; the others return what it published
            acc.wait_for_everyone()
            self.close()
            return artifacts.read_manifest(self.uri)
        out.mkdir(parents=True, exist_ok=True)
        if history is not None:
            with open(out / "metrics.jsonl", "w") as f:
                for r in history:
                    f.write(artifacts.dumps(r) + "\n")
            plot_history(history, out / "curves.png", f"{self.stage} ({self.cfg.name})")
        manifest = {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "outputs": {name: artifacts.join(self.uri, name) for name in models_out}
                       | {name: artifacts.join(self.uri, rel) for name, rel in (outputs or {}).items()},
            "metrics": metrics,
            "mlflow_run_id": self.run_id,
            "wall_time_s": round(time.perf_counter() - self.started, 1),
            **(extra or {}),
        }
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


def full_weights(model):
    """Full weights of ``model`` on this device for the block: DeepSpeed ZeRO-3 keeps only a shard per rank,
    so they are gathered for the duration (``deepspeed.zero.GatheredParameters``, as TRL's
    ``unwrap_model_for_generation`` does; a collective, every rank takes part); otherwise nothing to do."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by ZeRO-3
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def make_accelerator(cfg: Config):
    """The process's ``Accelerator``: plain when not launched, the launcher's setup (DDP, DeepSpeed) when
    started by ``accelerate launch``. In a Ray Train worker (stages/ray_train.py) Ray has already created the
    process group and set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``: accelerate adopts it (MULTI_CPU with gloo on
    the CPU, MULTI_GPU with NCCL on GPUs) without initialising another, so nothing here differs."""
    from accelerate import Accelerator

    # cpu=True would switch a DeepSpeed launch off; under DeepSpeed on a CPU (DS_ACCELERATOR=cpu, as in the
    # tests of the ZeRO-3 path) the device is the CPU anyway
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    return Accelerator(cpu=cfg.device == "cpu" and not deepspeed)


def _zero_stage(acc) -> int | None:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def _input_digest(uri: str) -> str:
    found = artifacts.find_manifest(uri)
    return artifacts.manifest_digest(found[0]) if found else "external"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    """Average gradients over processes in one flat all-reduce (what DDP would do, without its wrapper:
    the stages call the decoder and the output head separately, outside a wrapped forward)."""
    import torch.distributed as dist

    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class _OtherConfig(ValueError):
    """A resume state written under another config: not resumable, not corrupted either."""


def decode(tok, rollouts: Rollouts) -> list[str]:
    return tok.batch_decode(rollouts.completion_ids(), skip_special_tokens=True)


def teacher_forced(tok, prompts: list[list[int]], completions: list[str], prompt_len: int | None = None) -> Rollouts:
    """A :class:`Rollouts` batch for given texts (completion + EOS), for supervised losses."""
    comp = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    P = prompt_len or max(len(p) for p in prompts)
    N = max(len(c) for c in comp)
    B = len(prompts)
    ids = torch.full((B, P + N), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((B, P + N), dtype=torch.long)
    cmask = torch.zeros((B, P + N), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comp)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(c)] = torch.tensor(c)
        attn[i, P - len(p) : P + len(c)] = 1
        cmask[i, P : P + len(c)] = 1
    zeros = torch.zeros((B, P + N))
    return Rollouts(ids, attn, cmask, zeros, zeros.clone(), P, temperature=1.0)


class Trainer:
    """The one training loop: optimizer, LR warmup, gradient clipping, progress bar, metrics cadence,
    and resumable state every ``checkpoint_every`` steps.

    ``step_fn(step)`` does the stage's work (rollout -> score -> loss) and calls :meth:`update` for
    each optimizer step; it returns a metrics dict (``"stop": True`` ends training early).
    """

    def __init__(self, run: StageRun, name: str, model, optim: Optim, steps: int, metric_prefix: str = ""):
        self.run, self.name, self.model, self.optim_cfg, self.steps = run, name, model, optim, steps
        self.prefix = metric_prefix
        if run.cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW: one kernel for all parameters on CUDA
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, weight_decay=optim.weight_decay,
                                           fused=run.device.type == "cuda" or None)
        self.acc = run.accelerator
        self.engine = None
        if _zero_stage(self.acc) is not None:
            # DeepSpeed: its engine owns backward, gradient averaging, clipping and the optimizer step.
            # No dataloader is prepared, so the micro-batch size it asks for is set here.
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = 1
            ds["gradient_accumulation_steps"] = 1
            ds["gradient_clipping"] = optim.grad_clip
            self.engine, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.step = 0
        self.history: list[dict] = []
        self.resumed: dict | None = None  # the state restored at start (its step, history, MLflow run id)
        self.saved_step: int | None = None  # the step of the newest resume state in the store
        self.state: dict = {}  # small JSON-able extras a stage wants restored (e.g. early-stop info)

    def update(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss``; returns the gradient norm before clipping.

        A non-finite loss or gradient norm raises :class:`Divergence` before the optimizer steps: the
        weights stay those of the last good step, nothing is published, and the last resume state stays
        for a retry (clipping cannot repair a NaN gradient, it spreads it to every weight)."""
        self._check_finite("loss", loss)
        if self.engine is not None:
            self.acc.backward(loss)  # DeepSpeed: backward, average, clip and step in one call
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        loss.backward()
        if self.acc.num_processes > 1:  # every rank trained on the same gathered batch: average anyway
            _all_reduce_mean([p.grad for p in self.params if p.grad is not None])
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        self._check_finite("gradient norm", norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        v = float(value.detach())
        if math.isfinite(v):
            return
        self.optimizer.zero_grad(set_to_none=True)
        kept = (f"the resume state of step {self.saved_step} kept" if self.saved_step is not None else
                f"no resume state yet (one every {self.run.cfg.checkpoint_every} steps)")
        raise Divergence(f"{self.run.stage}: {what} is {v} at step {self.step + 1} ({self.name}, lr "
                         f"{self.optimizer.param_groups[0]['lr']:.3g}): stopped before the optimizer step, nothing "
                         f"published, {kept}; lower the learning rate or raise the clipping and retry")

    def _set_lr(self) -> None:
        warm = self.optim_cfg.warmup_steps
        scale = min(1.0, (self.step + 1) / warm) if warm else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = self.optim_cfg.lr * scale

    # -------------------------------------------------------- resume
    def save(self) -> None:
        if self.engine is not None:
            # DeepSpeed's optimizer state is sharded per rank: not written here yet (a killed DeepSpeed
            # stage restarts from its inputs); see README "GPU path"
            log.warning("%s: no resume state under DeepSpeed (step %d)", self.run.stage, self.step)
            return
        if not self.run.is_main:  # replicas hold the same weights and optimizer state
            self.acc.wait_for_everyone()
            return
        d = self.run.work / "state" / self.name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        save_model(self.model, str(d / "model.safetensors"))  # handles tied embeddings
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
        if self.run.rollout_file.exists():
            shutil.copyfile(self.run.rollout_file, d / "rollouts.jsonl")
        meta = {"config_hash": self.run.config_hash, "history": self.history, "state": self.state,
                "mlflow_run_id": self.run.run_id}
        artifacts.save_state(self.run.uri, self.name, self.step, d, meta)
        self.saved_step = self.step
        self.acc.wait_for_everyone()

    def restore(self) -> dict | None:
        if self.engine is not None:
            return None
        d = self.run.work / "restore" / self.name
        loaded = {}

        def check(folder: Path, meta: dict) -> None:  # parse everything before touching the model
            if meta.get("config_hash") != self.run.config_hash:
                raise _OtherConfig(f"written by another config ({meta.get('config_hash')})")
            from safetensors.torch import load_file

            loaded["model"] = load_file(str(folder / "model.safetensors"))
            shapes = {k: v.shape for k, v in self.model.state_dict().items()}
            bad = [k for k, t in loaded["model"].items() if shapes.get(k) != t.shape]
            if bad:
                raise ValueError(f"tensors that do not fit this model: {bad[:3]}")
            loaded["optim"] = torch.load(folder / "optimizer.pt", weights_only=True)
            if not isinstance(meta.get("history"), list) or not isinstance(meta.get("step"), int):
                raise ValueError("resume pointer lacks step/history")

        latest = artifacts.load_state(self.run.uri, self.name, d, check=check)
        if latest is None:
            return None
        device = str(next(self.model.parameters()).device)
        try:
            load_model(self.model, str(d / "model.safetensors"), device=device)
            self.optimizer.load_state_dict(loaded["optim"])
        except Exception as e:  # noqa: BLE001 - e.g. shapes of another model: start over, loudly
            log.warning("%s: resume state of step %s does not fit this model (%s); starting over",
                        self.run.stage, latest["step"], " ".join(str(e).split())[:200])
            return None
        if (d / "rollouts.jsonl").exists():
            self.run.rollout_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(d / "rollouts.jsonl", self.run.rollout_file)
        self.step = self.saved_step = latest["step"]
        self.resumed = latest
        log.info("%s: resumed %s from step %d", self.run.stage, self.name, self.step)
        self.history = latest["history"]
        self.state = latest.get("state", {})
        return latest

    # -------------------------------------------------------- loop
    def fit(self, step_fn) -> list[dict]:
        every = self.run.cfg.checkpoint_every
        tracker = self.run.tracker
        bar = tqdm(total=self.steps, initial=self.step, desc=f"{self.run.stage}:{self.name}", dynamic_ncols=True, leave=False)
        self.model.train()
        while self.step < self.steps:
            self._set_lr()
            t0 = time.perf_counter()
            metrics = step_fn(self.step)
            metrics["step_time_s"] = time.perf_counter() - t0
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            stop = bool(metrics.pop("stop", False))
            self.step += 1
            self.history.append({"step": self.step, **metrics})
            if tracker:
                tracker.metrics({self.prefix + k: v for k, v in metrics.items()}, self.step)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("reward", "loss", "kl", "c2")})
            if stop:
                log.info("%s: stopping early at step %d", self.run.stage, self.step)
                break
            if self.step % every == 0 and self.step < self.steps:
                self.save()
        bar.close()
        self.model.eval()
        return self.history
