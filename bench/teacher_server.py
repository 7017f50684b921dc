"""The teacher as a service on this machine's CPU build of vLLM: what it costs and saves, as ratios
measured in one command against the in-process baseline.

    python bench/teacher_server.py --out bench/results            (needs .venv-vllm: make vllm-venv)

For each teacher shape (``tiny``: the tests' 0.4M-parameter teacher; ``large``: a 25M-parameter one) it
starts the real vLLM OpenAI server (from .venv-vllm) and measures:

1. peak RSS of the training process of stage 2b (onpolicy_distill, sampled form) and stage 2a with the
   server engine vs the local engine (each stage in its own process, ``wait4`` max RSS);
2. scored tokens/s: the same rollouts scored through the server (HTTP, batched, concurrent) vs in-process;
3. payload bytes per scored token for k in {0, 20, 64};
4. stage-2a throughput: training from the stored Parquet (``kl_warmup.form: topk``) vs regenerating the
   teacher rollouts every step (``token_kl``, the local teacher samples and scores each step).

CPU numbers: vLLM's CPU build runs eager and slow; they show the shape of the trade, not GPU speed.
Writes ``teacher_server.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
SHAPES = {  # head_dim 64: what vLLM's CPU attention supports
    "tiny": {"hidden_size": 128, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate_size": 256},
    "large": {"hidden_size": 512, "layers": 8, "heads": 8, "kv_heads": 2, "intermediate_size": 1536},
}
STAGE_SET = ["tracking.enabled=false", "torch_threads=1", "checkpoint_every=1000", "sampling.max_new_tokens=24",
             "task.sizes={bootstrap: 10, teacher_rl: 10, prompts: 256, student_rl: 10, validation: 10, eval: 8}",
             "eval.problems=8", "eval.samples=1", "eval.greedy=false", "eval.c2_prompts=16",
             "kl_warmup.steps=4", "kl_warmup.prompts_per_step=32", "kl_warmup.c2_every=1000",
             "onpolicy_distill.steps=4", "onpolicy_distill.prompts_per_step=32", "onpolicy_distill.form=sampled",
             "teacher.concurrency=2",
             "teacher_data.top_k=20", "teacher_data.prompts=128"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log: Path):
    import requests

    port = free_port()
    proc = subprocess.Popen(
        [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-logprobs", "64",
         "--logprobs-mode", "processed_logprobs", "--gpu-memory-utilization", "0.2", "--enforce-eager"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"error: the vLLM server did not start, see {log}")
        time.sleep(1)


def child_peak(cmd: str, root: Path, teacher: Path, student: Path, sets: list[str]) -> tuple[dict, float]:
    """The stage's peak RSS, measured by a fresh parent (RUSAGE_CHILDREN of a one-child process)."""
    code = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps({'rc': p.returncode, 'out': p.stdout[-4000:], 'err': p.stderr[-3000:], "
            "'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    argv = [sys.executable, "-m", "stages", cmd, "--config", "tiny", "--root", str(root), "--teacher", str(teacher),
            "--student", str(student)] + [a for s in STAGE_SET + sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    r = json.loads(subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                                  check=True).stdout)
    if r["rc"]:
        raise SystemExit(f"error: stage {cmd} failed:\n{r['err']}")
    return {"summary": json.loads(r["out"].strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}, r["rss_mb"]


def metrics_of(root: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]


def bench_shape(shape: str, work: Path) -> dict:
    from stages.config import TinyArch
    from stages.engines.hf import HFSampler
    from stages.models import char_tokenizer, load, save, tiny_qwen3
    from stages.teacher import LocalTeacher, ServerTeacher

    torch.set_num_threads(1)
    tok = char_tokenizer()
    tdir, sdir = work / "teacher", work / "student"
    teacher = tiny_qwen3(TinyArch(**SHAPES[shape]), tok, 1)
    save(teacher, tok, tdir)
    save(tiny_qwen3(TinyArch(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128), tok, 2), tok, sdir)
    n_params = sum(p.numel() for p in teacher.parameters())
    proc, url = start_server(tdir, work / "server.log")
    out = {"teacher_params": n_params}
    try:
        # 2 + 3: scoring throughput and payload, same rollouts both ways
        model, _ = load(tdir)
        model.requires_grad_(False)
        prompts = [[tok.bos_token_id] + tok(f"{a}+{a * 7}=", add_special_tokens=False)["input_ids"] for a in range(100, 164)]
        ro = HFSampler(tok.eos_token_id, tok.pad_token_id).generate(model, prompts, temperature=1.0, max_new_tokens=48, seed=0)
        positions = int(ro.attention.sum()) - len(ro)
        local = LocalTeacher(model, 512)
        server = ServerTeacher(url, sequences_per_request=16, concurrency=2)
        for k in (0, 20, 64):
            t0 = time.perf_counter()
            local.logprobs_topk(ro, max(k, 1))
            t_local = time.perf_counter() - t0
            server.bytes_received = 0
            t0 = time.perf_counter()
            server.logprobs_topk(ro, k) if k else server.logprobs(ro)
            t_server = time.perf_counter() - t0
            out[f"k{k}"] = {"payload_bytes_per_token": server.bytes_received / positions,
                            "local_tokens_per_s": positions / t_local, "server_tokens_per_s": positions / t_server,
                            "server_over_local": (positions / t_server) / (positions / t_local)}
        server.close()
        # 1: peak memory of the training process, stage 2b, server vs local engine
        srv = [f"teacher.url={url}", "kl_warmup.form=topk"]
        r_local, rss_local = child_peak("onpolicy_distill", work / "2b-local" / "root", tdir, sdir, [])
        r_srv, rss_srv = child_peak("onpolicy_distill", work / "2b-server" / "root", tdir, sdir,
                                    ["teacher.engine=server", *srv])
        out["2b_peak_rss_mb"] = {"local": rss_local, "server": rss_srv, "server_over_local": rss_srv / rss_local}
        out["2b_wall_s"] = {"local": r_local["wall_s"], "server": r_srv["wall_s"]}
        # 4 (+ 1 for 2a): stage 2a from stored Parquet vs regenerating teacher rollouts every step
        root = work / "2a" / "root"
        data, _ = child_peak("teacher_data", root, tdir, sdir, ["teacher.engine=server", *srv])
        data_uri = str(root / "teacher_data")
        r_topk, rss_topk = child_peak("kl_warmup", root, tdir, sdir, ["teacher.engine=server", *srv])
        r_regen, rss_regen = child_peak("kl_warmup", work / "2a-regen" / "root", tdir, sdir, [])
        stored = sum(h["samples_per_s"] for h in metrics_of(root, "kl_warmup")) / 4
        regen = sum(h["samples_per_s"] for h in metrics_of(work / "2a-regen" / "root", "kl_warmup")) / 4
        out["2a_samples_per_s"] = {"stored_parquet": stored, "regenerate_each_step": regen, "stored_over_regen": stored / regen}
        out["2a_peak_rss_mb"] = {"local_token_kl": rss_regen, "server_topk_from_parquet": rss_topk,
                                 "server_over_local": rss_topk / rss_regen}
        out["teacher_data"] = {"wall_s": data["wall_s"], "uri": data_uri, **data["summary"]["metrics"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--shapes", default="tiny,large", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"error: --shapes: unknown shape(s) {bad} (known: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    if not VLLM_PY.exists():
        print(f"error: {VLLM_PY} not found: run `make vllm-venv`", file=sys.stderr)
        return 2
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="s2d-bench-teacher-"))
    results = {"machine": f"{os.cpu_count()} CPUs", "torch_threads": 1, "shapes": {}}
    for shape in shapes:
        (work / shape).mkdir(parents=True, exist_ok=True)
        results["shapes"][shape] = bench_shape(shape, work / shape)
        print(json.dumps({shape: results["shapes"][shape]}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_server.json").write_text(json.dumps(results, indent=1))
    lines = ["# Teacher as a service (vllm-cpu 0.32.0, CPU; ratios measured in one run)", "",
             "| shape | teacher params | peak RSS 2b server/local | peak RSS 2a stored-topk(server)/local | "
             "scored tok/s server/local (k=0, 20, 64) | bytes/token k=0, 20, 64 | 2a samples/s stored/regenerate |",
             "|---|---|---|---|---|---|---|"]
    for shape, r in results["shapes"].items():
        lines.append(
            f"| {shape} | {r['teacher_params']:,} | {r['2b_peak_rss_mb']['server']:.0f}/{r['2b_peak_rss_mb']['local']:.0f} MB "
            f"({r['2b_peak_rss_mb']['server_over_local']:.2f}x) | {r['2a_peak_rss_mb']['server_topk_from_parquet']:.0f}/"
            f"{r['2a_peak_rss_mb']['local_token_kl']:.0f} MB ({r['2a_peak_rss_mb']['server_over_local']:.2f}x) | "
            + ", ".join(f"{r[f'k{k}']['server_over_local']:.2f}x" for k in (0, 20, 64)) + " | "
            + ", ".join(f"{r[f'k{k}']['payload_bytes_per_token']:.0f}" for k in (0, 20, 64)) + " | "
            f"{r['2a_samples_per_s']['stored_over_regen']:.2f}x |")
    (out / "teacher_server.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
