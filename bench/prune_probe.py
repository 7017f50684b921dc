"""Which of a real teacher's layers a pruned student can lose (issue 24 item 2): how the smollm2-cpu preset's
``prune.layers`` was chosen.

    python bench/prune_probe.py --teacher runs/smollm2/import/teacher --out bench/results
    python bench/prune_probe.py --teacher ... --drops 3,9 3,4,9 3,4,5,7,9      # only evaluate these cuts

For every decoder layer ``i`` (``--single``, default on): the teacher with layer ``i`` removed (no healing), scored
two ways:

- ``generic KL``: KL(teacher || cut) per token on the teacher's greedy answers to the generic, arithmetic-free
  prompts that stage prune heals on (what a task-blind criterion such as ShortGPT's block influence would see);
- ``validation greedy``: greedy accuracy on the first ``--problems`` problems of the task's VALIDATION split (the
  split the project chooses settings on; the eval split, which every table reports, is never read), broken down
  by operand digits.

Then each ``--drops`` set (layers removed together) is scored on validation: sampled avg@k (k = eval.samples, the
preset's temperature), pass@k and greedy. Writes ``<out>/prune_probe.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import machine  # noqa: E402


def _digits(problem) -> str:
    found = re.findall(r"(\d+) \+ (\d+)", problem.prompt)
    return f"{len(found[-1][0])}+{len(found[-1][1])}" if found else "other"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the teacher's HF folder (stage import's output)")
    ap.add_argument("--config", default="smollm2-cpu")
    ap.add_argument("--problems", type=int, default=64, help="validation problems scored per cut")
    ap.add_argument("--samples", type=int, default=2, help="sampled completions per problem for --drops")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the one-layer-removed sweep")
    ap.add_argument("--drops", nargs="*", default=["3,9", "3,4,9", "3,4,5,7,9"],
                    help="layer sets to remove together, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)

    import torch

    from stages.config import load_config
    from stages.pruning import GENERIC_PROMPTS, cut_layers, n_params
    from stages.rollout import decode, vocab_kl
    from stages.runtime import StageRun
    from stages.scoring import eval_metrics
    from stages.task_contract import Problem
    from stages.trainer import autocast

    cfg = load_config(a.config, ["tracking.enabled=false", f"torch_threads={a.threads}",
                                 f"eval.problems={a.problems}", f"eval.samples={a.samples}"])
    work = Path(a.out) / ".prune_probe_work"
    run = StageRun("prune_probe", cfg, str(work))
    teacher, tok = run.load_model(a.teacher, "teacher")
    teacher.requires_grad_(False).eval()
    n = teacher.config.num_hidden_layers
    probs = run.task.problems("validation")[: a.problems]
    generic = [Problem(f"generic-{i}", GENERIC_PROMPTS[i], None) for i in range(min(32, len(GENERIC_PROMPTS)))]
    answers = run.rollout_maker.sample(teacher, tok, generic, step=0, salt="heal", greedy=True, max_new_tokens=64)

    def greedy_by_digits(model) -> tuple[float, dict]:
        g = run.rollout_maker.sample(model, tok, probs, step=0, salt="eval-greedy", greedy=True)
        r = [run.task.reward(x, p) for x, p in zip(decode(tok, g), probs)]
        by: dict[str, list[float]] = {}
        for p, v in zip(probs, r):
            by.setdefault(_digits(p), []).append(v)
        return sum(r) / len(r), {k: [round(sum(v) / len(v), 3), len(v)] for k, v in sorted(by.items())}

    def cut(drops) -> torch.nn.Module:
        return cut_layers(teacher, [i for i in range(n) if i not in drops]).eval().requires_grad_(False)

    out: dict = {"machine": machine(), "config": a.config, "teacher_path": a.teacher, "layers": n,
                 "validation_problems": len(probs), "single": [], "drops": []}
    # one autocast region per model: a region caches the bf16 copy of every weight it casts until it closes
    with torch.no_grad(), autocast(cfg, run.device):
        acc, by = greedy_by_digits(teacher)
        out["teacher"] = {"greedy": acc, "by_digits": by,
                          **{k: round(v, 4) for k, v in eval_metrics(run.rollout_maker, teacher, tok, probs).items()}}
    print("teacher", out["teacher"], flush=True)
    for i in range(n) if a.single else []:
        t0 = time.perf_counter()
        s = cut({i})
        with torch.no_grad(), autocast(cfg, run.device):
            kl = float(vocab_kl("forward", s, teacher, answers, "token-mean", cfg.logprob_chunk).loss)
            acc, by = greedy_by_digits(s)
        out["single"].append({"drop": i, "generic_kl": round(kl, 4), "greedy": round(acc, 4), "by_digits": by,
                              "s": round(time.perf_counter() - t0, 1)})
        print(out["single"][-1], flush=True)
        del s
    for spec in a.drops:
        drops = sorted({int(x) for x in spec.split(",")})
        s = cut(set(drops))
        with torch.no_grad(), autocast(cfg, run.device):
            m = eval_metrics(run.rollout_maker, s, tok, probs)
        out["drops"].append({"drop": drops, "kept": n - len(drops), "params": n_params(s),
                             **{k: round(v, 4) for k, v in m.items()}})
        print(out["drops"][-1], flush=True)
        del s

    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "prune_probe.json").write_text(json.dumps(out, indent=1))
    (dest / "prune_probe.md").write_text(render(out, " ".join(sys.argv[1:])))
    print(f"wrote {dest / 'prune_probe.md'}")


def render(r: dict, args: str) -> str:
    t = r["teacher"]
    lines = [f"# Which layers of the real teacher a student can lose (`python bench/prune_probe.py {args}`)", "",
             f"{r['config']}, teacher {r['teacher_path']} ({r['layers']} layers), {r['validation_problems']} VALIDATION "
             f"problems, no healing. Machine: {r['machine']}.", "",
             "Teacher (all layers): " + ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    if r["single"]:
        lines += ["## One layer removed", "", "| removed | generic KL | validation greedy | by operand digits |",
                  "|---|---|---|---|"]
        lines += [f"| {s['drop']} | {s['generic_kl']:.3f} | {s['greedy']:.3f} | {s['by_digits']} |" for s in r["single"]]
        lines.append("")
    if r["drops"]:
        metric_keys = [k for k in r["drops"][0] if k not in ("drop", "kept", "params")]
        lines += ["## Layers removed together", "", "| removed | kept | parameters | " + " | ".join(metric_keys) + " |",
                  "|---|---|---|" + "---|" * len(metric_keys)]
        lines += [f"| {d['drop']} | {d['kept']} | {d['params'] / 1e6:.1f}M | "
                  + " | ".join(f"{d[k]:.3f}" for k in metric_keys) + " |" for d in r["drops"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
