"""What a stage cost: wall time, process CPU seconds, accelerator seconds, peak memory, tokens generated,
tokens scored by the teacher, labeled examples; optionally money (``cost.usd_per_accelerator_hour``).

A :class:`Meter` starts when a :class:`stages.runtime.StageRun` starts and is read when it publishes; the
reading goes into the manifest (``cost``), the stage's MLflow run (``cost.*`` metrics) and the summary's
cost table. Token counts come from process-wide counters the sampling and teacher code bump
(:func:`add`); the meter reports the difference, so a workflow running every stage in one process still
gets per-stage numbers. Peak resident memory is the kernel's high-water mark of this process, reset at
the meter's start where Linux allows it (``/proc/self/clear_refs``), else the process's lifetime peak
(``peak_rss_reset: false`` in the reading then says so).

Under several processes (``accelerate launch``) the main process measures itself: CPU and memory are
its own; accelerator seconds are wall time x the processes holding an accelerator.
"""

from __future__ import annotations

import resource
import threading
import time

COUNTERS = ("tokens_generated", "eval_tokens_generated", "teacher_tokens_scored")  # generated: by any model (the
# student, or the teacher writing rollouts), evaluation included; eval_: the part spent on evaluation
_counts = dict.fromkeys(COUNTERS, 0)
_lock = threading.Lock()
# the columns of the summary's cost table, in order: key in a reading -> header
COLUMNS = {"wall_s": "wall s", "cpu_s": "CPU s", "accelerator_s": "accel s", "peak_rss_mb": "peak RSS MB",
           "tokens_generated": "tokens generated", "teacher_tokens_scored": "teacher tokens scored",
           "labeled_examples": "labeled", "usd": "$"}


def add(counter: str, n: int) -> None:
    """Count ``n`` more of ``counter`` (one of :data:`COUNTERS`) in this process."""
    with _lock:
        _counts[counter] += int(n)


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def generated(ro, salt: str = "") -> None:
    """A sampled batch: its completion tokens are generated tokens (evaluation draws also counted apart)."""
    n = int(ro.completion.sum())
    add("tokens_generated", n)
    if salt.startswith("eval"):
        add("eval_tokens_generated", n)


def teacher_scored(ro) -> None:
    """The teacher gave log-probs for every completion token of ``ro``."""
    add("teacher_tokens_scored", int(ro.completion.sum()))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _hwm_mb() -> float | None:
    """The resident-set high-water mark of this process (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class Meter:
    """Resources one stage uses, from :meth:`start` to :meth:`read`."""

    def __init__(self, device=None, accelerators: int = 0):
        self.device, self.accelerators = device, accelerators
        self.start()

    def start(self) -> None:
        self.t0, self.cpu0, self.counts0 = time.perf_counter(), _cpu_s(), counts()
        self.rss_reset = _reset_hwm()
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def _cuda(self) -> bool:
        return self.accelerators > 0 and self.device is not None and getattr(self.device, "type", "") == "cuda"

    def read(self, labeled_examples: int = 0, usd_per_accelerator_hour: float | None = None) -> dict:
        wall = time.perf_counter() - self.t0
        rss = _hwm_mb()
        if rss is None:  # no /proc: the lifetime peak (KiB on Linux)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        now = counts()
        out = {"wall_s": round(wall, 2), "cpu_s": round(_cpu_s() - self.cpu0, 2),
               "accelerators": self.accelerators, "accelerator_s": round(wall * self.accelerators, 2),
               "peak_rss_mb": round(rss, 1), "peak_rss_reset": self.rss_reset,
               **{k: now[k] - self.counts0[k] for k in COUNTERS}, "labeled_examples": int(labeled_examples)}
        if self._cuda():
            import torch

            out["peak_accelerator_mem_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if usd_per_accelerator_hour is not None:
            out["usd"] = round(out["accelerator_s"] / 3600 * usd_per_accelerator_hour, 4)
        return out


def total(readings: list[dict]) -> dict:
    """The sum of several readings (numbers only; the peaks are maxima)."""
    out: dict = {}
    for r in readings:
        for k, v in r.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out[k] = max(out.get(k, v), v) if k.startswith("peak_") else out.get(k, 0) + v
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
