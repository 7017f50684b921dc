"""Which machine-dependent factors change the draws: the same bootstrap under different torch settings.

    # paper-cpu bootstrap, shortened (40 + 40 steps: about a minute per variant on 2 quiet cores)
    python bench/determinism.py
    python bench/determinism.py --set bootstrap.teacher_steps=500 --set bootstrap.student_steps=500   # as long as the preset

Each variant runs the bootstrap stage of ``bench/configs/paper-cpu.yaml`` in a fresh process (so its
environment variables take effect before torch loads): one torch thread twice (is a command repeatable on
one machine?), two threads (intra-op parallelism), and one thread with torch's kernels limited to AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, MKL ``MKL_CBWR=AVX2``: what an AVX2-only CPU runs). It reports
a hash of the trained weights and the evaluation of both base models. Results:
``<out>/determinism.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine, preset_path  # noqa: E402

VARIANTS = {
    "1 thread": ({}, 1),
    "1 thread, again": ({}, 1),
    "2 threads": ({}, 2),
    "1 thread, AVX2 kernels": (
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2"},
        1,
    ),
}
SHORT = ["bootstrap.teacher_steps=40", "bootstrap.student_steps=40", "eval.problems=100"]


def child(preset: str, overrides: list[str], root: str) -> dict:
    """Run the bootstrap once in this process; weight hashes and eval metrics."""
    import torch

    from stages import workflow
    from stages.config import load_config

    cfg = load_config(preset, overrides)
    manifest, _ = workflow.run_stage(cfg, root, "bootstrap", {})
    out = {"metrics": {k: v for k, v in manifest["metrics"].items() if ".eval." in k}, "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for role in ("teacher", "student"):  # the checksum of the weights file, from the stage's manifest
        rel = next(r for r in manifest["files"] if r.startswith(role + "/") and r.endswith(".safetensors"))
        out[f"{role}_sha"] = manifest["files"][rel]["sha256"][:12]
        out[f"{role}_file"] = str(Path(root) / "bootstrap" / rel)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = preset_path(args.preset)
    overrides = SHORT + args.overrides
    if args.child:
        print("RESULT " + json.dumps(child(preset, overrides, args.child)), flush=True)
        return 0
    from safetensors.torch import load_file

    rows, ref_w = {}, {}
    for name in args.variants:
        env, threads = VARIANTS[name]
        with tempfile.TemporaryDirectory(prefix="s2d-det-") as root:
            cmd = [sys.executable, __file__, "--preset", args.preset, "--child", root,
                   *[a for o in args.overrides + [f"torch_threads={threads}", "tracking.enabled=false"] for a in ("--set", o)]]
            proc = subprocess.run(cmd, env=os.environ | env | {"OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            rows[name] = r = json.loads(line[7:])
            for role in ("teacher", "student"):  # how far the weights moved: max |w - w_first| over all tensors
                w = load_file(r.pop(f"{role}_file"))
                ref_w.setdefault(role, w)
                r[f"{role}_max_abs_diff"] = max(float((w[k] - ref_w[role][k]).abs().max()) for k in w)
        print(name, rows[name], flush=True)
    ref = rows[args.variants[0]]
    lines = [
        "# Determinism: the same bootstrap under different torch settings",
        "",
        f"Command: `python bench/determinism.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Machine: {machine()}. Overrides: {overrides}.",
        "",
        "| variant | torch threads | kernels | teacher weights | student weights | max abs weight diff to the first (teacher, student) "  # noqa: E501
        "| teacher avg@k | student avg@k | same as first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        m = r["metrics"]
        t = next(v for k, v in m.items() if k.startswith("teacher.eval.avg@"))
        s = next(v for k, v in m.items() if k.startswith("student.eval.avg@"))
        same = r["teacher_sha"] == ref["teacher_sha"] and r["student_sha"] == ref["student_sha"]
        lines.append(f"| {name} | {r['torch_threads']} | {r['cpu_capability']} | {r['teacher_sha']} | {r['student_sha']} | "
                     f"{r['teacher_max_abs_diff']:.2e}, {r['student_max_abs_diff']:.2e} | "
                     f"{t:.3f} | {s:.3f} | {'yes' if same else 'no'} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "determinism.md").write_text(md)
    (out / "determinism.json").write_text(json.dumps({"overrides": overrides, "rows": rows, "machine": machine()}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
