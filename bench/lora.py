"""LoRA vs full fine-tuning on this machine: peak memory and samples/s of GRPO (stage teacher_rl on the
teacher) and on-policy distillation (stage 2b: the student trains, the teacher scores), and what publishing
costs (bytes and seconds of the adapter vs the full checkpoint).

    python bench/lora.py --teacher /tmp/perf-models/teacher --student /tmp/perf-models/student --out bench/results
    python bench/lora.py --tiny --out /tmp/lora-bench            # the tests' tiny models (no real checkpoint)

Each (stage, mode) runs in its own process (peak RSS from ``wait4``: the whole process, model loading
included), modes interleaved (full, lora, full, lora, ...) so that a change of the machine's load hits both;
the 1-minute load average is recorded before each run. samples/s is the stage's own metric (sampling +
scoring + update of one step, the first step left out), averaged over steps. Publish: writing the model
folder (``models.save`` / ``lora.save_adapter``) plus ``artifacts.publish`` (hashing and copying every
file of the stage into the local root, manifest last), timed in the child; and the bytes of the weights.
Writes ``lora.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from stages.config import load_config
from stages.runtime import StageRun
from stages.registry import STAGES
stage, root, teacher, student, sets = {stage!r}, {root!r}, {teacher!r}, {student!r}, {sets!r}
cfg = load_config("tiny", sets)
inputs = {{"policy": teacher}} if stage == "teacher_rl" else {{"teacher": teacher, "student": student}}
import stages.artifacts, stages.lora, stages.models
timing = {{"write_s": 0.0, "upload_s": 0.0}}
def timed(mod, name, key):
    real = getattr(mod, name)
    def f(*a, **k):
        t0 = time.perf_counter(); r = real(*a, **k); timing[key] += time.perf_counter() - t0; return r
    setattr(mod, name, f)
timed(stages.models, "save", "write_s")  # the full checkpoint folder
timed(stages.lora, "save_adapter", "write_s")  # the adapter folder
timed(stages.artifacts, "publish", "upload_s")  # hashing and copying every file into the root, manifest last
m = STAGES[stage].fn()(StageRun(stage, cfg, root, inputs=inputs), *inputs.values())
print("RESULT " + json.dumps({{**timing, "adapters": m.get("adapters"),
                              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

COMMON = ["tracking.enabled=false", "torch_threads=1", "checkpoint_every=1000", "task.chat_template=auto",
          "task.sizes={bootstrap: 10, teacher_rl: 64, prompts: 64, student_rl: 10, validation: 10, eval: 4}",
          "eval.problems=1", "eval.samples=1", "eval.greedy=false", "eval.c2_prompts=2", "sampling.temperature=1.0"]
STAGE_SETS = {
    "teacher_rl": ["teacher_rl.prompts_per_step=2", "teacher_rl.group_size=4", "teacher_rl.optim.lr=1e-5"],
    "onpolicy_distill": ["onpolicy_distill.prompts_per_step=8", "onpolicy_distill.optim.lr=1e-5"],
}
ROLE = {"teacher_rl": "teacher", "onpolicy_distill": "student"}


def run_one(stage: str, mode: str, work: Path, teacher: str, student: str, steps: int, new_tokens: int, r: int,
            tiny_sets: list[str]) -> dict:
    root = work / f"{stage}-{mode}-{time.time_ns()}"
    sets = COMMON + tiny_sets + STAGE_SETS[stage] + [f"{stage}.steps={steps}", f"sampling.max_new_tokens={new_tokens}"]
    if mode == "lora":
        sets.append(f"models.{ROLE[stage]}.lora={{r: {r}, alpha: {2 * r}}}")
    code = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), stage=stage, root=str(root), teacher=teacher,
                        student=student, sets=sets)
    load = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} {mode} failed:\n{err[-3000:]}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    hist = [json.loads(x) for x in (root / stage / "metrics.jsonl").read_text().splitlines()]
    sps = [h["samples_per_s"] for h in hist[1:]] or [h["samples_per_s"] for h in hist]
    model_dir = root / stage / "model"
    return {"stage": stage, "mode": mode, "load_1min": load, "wall_s": wall, "rss_mb": res["rss_mb"],
            "samples_per_s": statistics.mean(sps), "step_s": statistics.mean(h["step_time_s"] for h in hist[1:] or hist),
            "publish_s": res["write_s"] + res["upload_s"], "write_s": res["write_s"], "upload_s": res["upload_s"],
            "published_bytes": sum(f.stat().st_size for f in model_dir.iterdir()),
            "weights_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
            "trainable_params": (res["adapters"] or {}).get("model", {}).get("trainable_params")}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for stage in STAGE_SETS:
        s = {}
        for mode in ("full", "lora"):
            rs = [r for r in rows if r["stage"] == stage and r["mode"] == mode]
            if not rs:
                continue
            s[mode] = {
                k: statistics.median(r[k] for r in rs)
                for k in (
                    "rss_mb",
                    "samples_per_s",
                    "step_s",
                    "publish_s",
                    "write_s",
                    "published_bytes",
                    "weights_bytes",
                    "load_1min",
                )
            }
            s[mode]["repeats"] = len(rs)
            s[mode]["trainable_params"] = rs[0]["trainable_params"]
        if "full" in s and "lora" in s:
            f, lo = s["full"], s["lora"]
            s["ratio_lora_over_full"] = {k: lo[k] / f[k] for k in ("rss_mb", "samples_per_s", "publish_s", "write_s",
                                                                    "weights_bytes")}
        out[stage] = s
    return out


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.json").write_text(json.dumps(result, indent=1))
    a = result["args"]
    lines = [f"# LoRA vs full fine-tuning ({a['models']}; CPU, {a['repeats']} interleaved repeats, medians)", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, shared: 1-minute load average "
             f"{min(r['load_1min'] for r in result['rows']):.1f}-{max(r['load_1min'] for r in result['rows']):.1f} "
             "at the start of the runs (2 cores: every figure is slowed by the other jobs, both modes alike).", "",
             f"LoRA r={a['r']}, alpha={2 * a['r']}, the default target modules (q/k/v/o/gate/up/down); {a['steps']} steps "
             f"of {a['new_tokens']} new tokens; GRPO 2 prompts x 4 samples per step, 2b 8 prompts per step.", "",
             "| stage | mode | trainable params | peak RSS MB | samples/s | step s | write s | publish s (write + upload) "
             "| published weights |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, s in result["summary"].items():
        for mode in ("full", "lora"):
            if mode in s:
                m = s[mode]
                lines.append(f"| {stage} | {mode} | {m['trainable_params'] or 'all'} | {m['rss_mb']:.0f} | "
                             f"{m['samples_per_s']:.3f} | {m['step_s']:.1f} | {m['write_s']:.2f} | {m['publish_s']:.2f} | "
                             f"{m['weights_bytes'] / 1e6:.2f} MB |")
    lines += ["", "| stage | LoRA/full: peak RSS | samples/s | write time | publish time | published weights |",
              "|---|---|---|---|---|---|"]
    for stage, s in result["summary"].items():
        if "ratio_lora_over_full" in s:
            q = s["ratio_lora_over_full"]
            lines.append(
                f"| {stage} | {q['rss_mb']:.2f}x | {q['samples_per_s']:.2f}x | {q['write_s']:.3f}x | {q['publish_s']:.3f}x | "
                f"{q['weights_bytes']:.4f}x |"
            )
    lines += ["", "Every run (in order):", "", "| stage | mode | load | RSS MB | samples/s | publish s | wall s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['mode']} | {r['load_1min']:.1f} | {r['rss_mb']:.0f} | {r['samples_per_s']:.3f} | "
              f"{r['publish_s']:.2f} | {r['wall_s']:.0f} |" for r in result["rows"]]
    (out / "lora.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="teacher checkpoint folder (e.g. the converted SmolLM2-135M-Instruct)")
    p.add_argument("--student", help="student checkpoint folder (e.g. its 10-layer cut)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny models instead (made here)")
    p.add_argument("--work", default="/tmp/s2d-bench-lora")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--stages", default="teacher_rl,onpolicy_distill")
    a = p.parse_args()
    from _common import machine

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tiny_sets = []
    if a.tiny:
        from stages.config import TinyArch
        from stages.models import char_tokenizer, save, tiny_qwen3

        tok = char_tokenizer()
        a.teacher, a.student = str(work / "teacher"), str(work / "student")
        save(tiny_qwen3(TinyArch(hidden_size=128, layers=2, heads=2, kv_heads=1, intermediate_size=256), tok, 0), tok, a.teacher)
        save(tiny_qwen3(TinyArch(hidden_size=64, layers=2, heads=1, kv_heads=1, intermediate_size=128), tok, 1), tok, a.student)
        tiny_sets = ["task.chat_template=never"]
    rows = []
    for i in range(a.repeats):
        for stage in a.stages.split(","):
            for mode in (("full", "lora") if i % 2 == 0 else ("lora", "full")):
                r = run_one(stage, mode, work, a.teacher, a.student, a.steps, a.new_tokens, a.r, tiny_sets)
                print(json.dumps(r), flush=True)
                rows.append(r)
    result = {"command": "python bench/lora.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "args": {**vars(a), "models": "tiny test models" if a.tiny else f"{a.teacher} / {a.student}"},
              "rows": rows, "summary": summarize(rows)}
    write(Path(a.out), result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
