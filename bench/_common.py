"""Helpers the bench scripts share: the machine a result came from, preset paths, paired statistics."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preset_path(preset: str) -> str:
    """``cpu`` -> bench/configs/paper-cpu.yaml; a YAML path is used as given."""
    return preset if preset.endswith((".yaml", ".yml")) else str(REPO / "bench" / "configs" / f"paper-{preset}.yaml")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU, cores, the kernels torch dispatches to (AVX512 vs AVX2 changes float results), versions, git."""
    import torch
    import transformers

    try:
        git = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "stages", "bench/configs", "bench/paper_table.py"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        git += " (modified)" if dirty else ""
    except OSError:
        git = "unknown"
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "git": git, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# two-sided 95% t quantiles by degrees of freedom (scipy is not a dependency)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    return _T95[max(k for k in _T95 if k <= df)] if df < 30 else 1.96


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a_i - b_i with a 95% t-interval; ``resolved`` when it excludes 0."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan, "resolved": False}
    m = statistics.mean(d)
    if n == 1:
        return {"n": 1, "mean": m, "lo": math.nan, "hi": math.nan, "resolved": False}
    half = t95(n - 1) * statistics.stdev(d) / math.sqrt(n)
    return {"n": n, "mean": m, "lo": m - half, "hi": m + half, "resolved": (m - half > 0) or (m + half < 0)}


def peak_alloc_bytes(fn) -> tuple[int, object]:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, above what was allocated when it started,
    and ``fn``'s result: torch's own allocation records (``torch.profiler`` with ``profile_memory``; each
    ``[memory]`` event carries the allocator's running total), so it counts every tensor on the CPU, freed
    or not, in forward and backward alike. Deterministic, unlike RSS."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0, out
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start, out
