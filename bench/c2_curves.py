"""C2 against student steps per arm, from a paper_table root (issue 27 item 1): 2a's C2 where it was measured
(``kl_warmup.c2_every``) and 2b's per-step KL(student || teacher) on its own samples (the on-policy C2 estimate
each 2b step computes anyway), mean over seeds, each arm's 2b curve starting after its 2a steps.

    python bench/c2_curves.py --root runs/bench-paper-paper-cpu --out bench/results/c2_curves_paper-cpu.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def curves(root: Path) -> dict[str, dict[str, dict[int, float]]]:
    """arm folder -> {"2a": {student step: mean C2}, "2b": {student step: mean KL}} over the seeds found."""
    acc: dict = defaultdict(lambda: {"2a": defaultdict(list), "2b": defaultdict(list)})
    for seed in sorted(root.glob("seed*")):
        for arm in sorted(p for p in seed.iterdir() if p.is_dir() and p.name not in ("teacher", "sweep")):
            warm = rows(arm / "kl_warmup" / "metrics.jsonl")
            for r in warm:
                if "c2" in r:
                    acc[arm.name]["2a"][r["step"]].append(r["c2"])
            offset = len(warm)
            for r in rows(arm / "onpolicy_distill" / "metrics.jsonl"):
                acc[arm.name]["2b"][offset + r["step"]].append(r["kl"])
    return {a: {k: {s: statistics.mean(v) for s, v in sorted(d.items())} for k, d in c.items()} for a, c in acc.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(args.root)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (arm, c) in enumerate(sorted(data.items())):
        color = f"C{i}"
        if c["2b"]:
            ax.plot(list(c["2b"]), list(c["2b"].values()), color=color, label=f"{arm}: 2b per-step KL", lw=1)
        if c["2a"]:
            ax.plot(list(c["2a"]), list(c["2a"].values()), "o--", color=color, label=f"{arm}: 2a C2", ms=4)
    ax.set_xlabel("student step (2a, then 2b)")
    ax.set_ylabel("KL(student || teacher) per token")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"C2 against student steps, mean over seeds ({args.root.name})")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
