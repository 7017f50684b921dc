"""The one training loop every stage shares: :class:`Trainer` (optimizer, LR warmup, gradient clipping,
progress bar, metrics cadence, resumable state every ``checkpoint_every`` steps), and the distributed
pieces it needs: the process's ``Accelerator``, gradient averaging, ZeRO-3 weight gathering.

One code path for one process and many: every stage runs with an ``accelerate.Accelerator`` (plain when
not launched; DDP-style or DeepSpeed ZeRO under ``accelerate launch``, see ``infra/accelerate/``).
Gradients are averaged (DeepSpeed: by its engine; otherwise one all-reduce after backward), and only the
main process writes resume states.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_model, save_file, save_model
from tqdm.auto import tqdm

from . import artifacts, lora
from .config import Config, Optim

if TYPE_CHECKING:
    from .runtime import StageRun

log = logging.getLogger("stages")
ADAPTER_STATE = "adapter.safetensors"  # a LoRA stage's resume state: the adapter's weights, not the base's


class Divergence(RuntimeError):
    """A non-finite loss or gradient norm: the stage stops before the optimizer step and publishes nothing."""


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


def autocast(cfg: Config, device: torch.device | str):
    """The stage's mixed-precision context (``cfg.autocast``): matmuls in bf16 under ``torch.autocast``, weights and
    optimizer state stay in ``cfg.dtype``, the chunked log-softmax heads upcast to float32. Wraps every training step
    (rollout, forward, loss) and the rollouts and C2 of evaluation; backward runs outside it."""
    if cfg.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, cfg.autocast))


def _zero_stage(acc) -> int | None:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


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


class Trainer:
    """The one training loop: optimizer, LR warmup, gradient clipping, progress bar, metrics cadence,
    and resumable state every ``checkpoint_every`` steps.

    ``step_fn(step)`` does the stage's work (rollout -> score -> loss) and calls :meth:`update` for
    each optimizer step; it returns a metrics dict (``"stop": True`` ends training early).
    """

    def __init__(self, run: "StageRun", name: str, model, optim: Optim, steps: int, metric_prefix: str = ""):
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
        with torch.autocast(self.run.device.type, enabled=False):  # backward ops take the forward's dtypes
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
        if lora.adapter_of(self.model) is not None:  # a LoRA stage's state: the adapter's weights only
            save_file(lora.trainable_state(self.model), str(d / ADAPTER_STATE))
        else:
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
        adapter = lora.adapter_of(self.model) is not None

        def check(folder: Path, meta: dict) -> None:  # parse everything before touching the model
            if meta.get("config_hash") != self.run.config_hash:
                raise _OtherConfig(f"written by another config ({meta.get('config_hash')})")
            from safetensors.torch import load_file

            if adapter:
                loaded["model"] = load_file(str(folder / ADAPTER_STATE))
                shapes = {k: v.shape for k, v in lora.trainable_state(self.model).items()}
                if set(shapes) != set(loaded["model"]):
                    raise ValueError("an adapter state of other modules than this model's adapter")
            else:
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
            if adapter:
                lora.load_trainable_state(self.model, loaded["model"])
            else:
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
            with autocast(self.run.cfg, self.run.device):
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
