"""A stage as a Ray Train job vs the plain stage command, on this machine (local Ray runtime, CPU, gloo).

    python bench/ray_stage.py --out bench/results            # about 6 minutes on 2 CPU cores

Same command, same config, one run each (a ratio, measured in this one command):
- overhead: ``python -m stages teacher_rl`` plain vs ``S2D_ENGINE=ray S2D_RAY_WORKERS=1`` (wall time ratio);
- rollout generation with 1 vs 2 Ray Train workers (rows split across ranks; generated tokens per second
  over the run's steps, from the stage's metrics.jsonl) and the 2-worker stage's wall time;
- recovery: a 2-worker run whose rank-1 worker is SIGKILLed after the first resume state: seconds from
  the kill to the restarted worker group announcing itself, and to the published manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Ray's token authentication with a token of this run's own (a new local Ray runtime would otherwise write one to ~/.ray)
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
OVERRIDES = ["tracking.enabled=false", "torch_threads=1", "checkpoint_every=2",
             "task.sizes={bootstrap: 2000, teacher_rl: 200, prompts: 400, student_rl: 200, validation: 40, eval: 40}",
             "bootstrap.teacher_steps=20", "bootstrap.student_steps=4", "bootstrap.batch_size=16",
             "teacher_rl.steps=8", "teacher_rl.prompts_per_step=8", "teacher_rl.group_size=8",
             "eval.problems=8", "eval.samples=2", "eval.c2_prompts=8"]


def cmd(stage: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "stages", stage, "--config", "tiny", "--root", str(root),
            *[a for o in OVERRIDES for a in ("--set", o)]]


def env(**extra) -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
         "RAY_USAGE_STATS_ENABLED": "0", **RAY_AUTH, **extra}
    for k in ("S2D_ENGINE", "S2D_GPUS", "LOCAL_RANK", "RAY_ADDRESS"):
        if k not in extra:
            e.pop(k, None)
    return e


def run_stage(root: Path, boot: Path, **extra) -> dict:
    shutil.copytree(boot, root)
    t0 = time.perf_counter()
    out = subprocess.run(cmd("teacher_rl", root), env=env(**extra), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"error: teacher_rl failed ({extra}):\n{out.stderr[-3000:]}")
    hist = [json.loads(r) for r in (root / "teacher_rl/metrics.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1), "gen_tokens_per_s": round(sum(h["gen_tokens_per_s"] for h in hist) / len(hist), 1),
            "step_s": round(sum(h["step_time_s"] for h in hist) / len(hist), 3)}


def killed_run(root: Path, boot: Path) -> dict:
    import psutil

    shutil.copytree(boot, root)
    latest = root / "teacher_rl/_resume/policy/latest.json"
    proc = subprocess.Popen(cmd("teacher_rl", root), env=env(S2D_ENGINE="ray", S2D_RAY_WORKERS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    starts: list[float] = []

    def read_stderr():
        for line in proc.stderr:
            if "ray train worker rank" in line:
                starts.append(time.perf_counter())

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None and not latest.exists():
        time.sleep(0.05)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in " ".join(c.cmdline())]
    victim = max(workers, key=lambda p: p.create_time())  # any one of the two
    killed = time.perf_counter()
    victim.send_signal(signal.SIGKILL)
    killed_at = json.loads(latest.read_text())["step"]
    stdout = proc.stdout.read()
    proc.wait()
    reader.join(timeout=10)
    done = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit("error: the killed run did not recover")
    restarted = [t for t in starts if t > killed]
    return {"killed_after_state_of_step": killed_at,
            "kill_to_group_restarted_s": round(max(restarted) - killed, 1) if len(restarted) >= 2 else None,
            "kill_to_published_s": round(done - killed, 1), "summary_ok": stdout.strip().splitlines()[-1].startswith("{")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s2d-ray-bench-"))
    try:
        boot = work / "boot"
        subprocess.run(cmd("bootstrap", boot), env=env(), check=True, capture_output=True, timeout=900)
        res = {"plain": run_stage(work / "plain", boot),
               "ray_1_worker": run_stage(work / "ray1", boot, S2D_ENGINE="ray", S2D_RAY_WORKERS="1"),
               "ray_2_workers": run_stage(work / "ray2", boot, S2D_ENGINE="ray", S2D_RAY_WORKERS="2"),
               "ray_2_workers_one_killed": killed_run(work / "killed", boot)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["overhead_ratio_ray1_vs_plain"] = round(res["ray_1_worker"]["wall_s"] / res["plain"]["wall_s"], 2)
    res["rollout_speedup_2_vs_1_workers"] = round(
        res["ray_2_workers"]["gen_tokens_per_s"] / res["ray_1_worker"]["gen_tokens_per_s"], 2
    )
    res["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_stage.json").write_text(json.dumps(res, indent=1) + "\n")
    k = res["ray_2_workers_one_killed"]
    md = ["| measure | value |", "|---|---|",
          f"| plain stage wall (s) | {res['plain']['wall_s']} |",
          f"| Ray Train, 1 worker, wall (s) | {res['ray_1_worker']['wall_s']} |",
          f"| overhead ratio (Ray 1 worker / plain) | {res['overhead_ratio_ray1_vs_plain']} |",
          f"| rollout tokens/s, 1 worker | {res['ray_1_worker']['gen_tokens_per_s']} |",
          f"| rollout tokens/s, 2 workers | {res['ray_2_workers']['gen_tokens_per_s']} |",
          f"| rollout speed-up 2 vs 1 workers | {res['rollout_speedup_2_vs_1_workers']} |",
          f"| Ray Train, 2 workers, wall (s) | {res['ray_2_workers']['wall_s']} |",
          f"| killed worker: kill -> group restarted (s) | {k['kill_to_group_restarted_s']} |",
          f"| killed worker: kill -> published (s) | {k['kill_to_published_s']} |",
          f"| machine | {res['machine']['cpus']} CPUs, load {res['machine']['load_avg_1m']} at the end |"]
    (out / "ray_stage.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
