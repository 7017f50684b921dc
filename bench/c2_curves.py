"""C2 and reward against student steps per arm, from a paper_table root (issue 27 items 1 and 3).

Left: 2a's C2 where it was measured (``kl_warmup.c2_every``) and 2b's per-step KL(student || teacher) on its
own samples (the on-policy C2 estimate each 2b step computes anyway), each arm's 2b curve starting after its
2a steps. Right: the verifier reward of stage 3's own rollouts per step (training reward, after 2a + 2b's
steps) and, as markers, the eval avg@k each stage published when it ended (at its last student step; an eval
score for reporting, never used to choose anything). Both are means over the seeds found. Reward on the
validation split per step is not measured: it would cost a validation pass per step.

Which folder holds which arm: ``--table`` (the paper_table JSON) names each row's final model, so the first
seed's arms that the learning-rate selection already ran (under ``sweep/``) are found too; ``--root`` alone
reads ``seed*/<arm>/`` (a table run with ``--sweep none``). Direct GRPO's per-step reward is drawn with stage 3's.

    python bench/c2_curves.py --root runs/bench-paper-paper-cpu --out bench/results/c2_curves_paper-cpu.png
    python bench/c2_curves.py --table bench/results/paper_table_smollm2-cpu.json --out bench/results/c2_curves_smollm2-cpu.png
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def seed_arms(root: Path):
    """(arm folder name, arm root) for every ``seed*/<arm>/`` under a table root."""
    for seed in sorted(root.glob("seed*")):
        for arm in sorted(p for p in seed.iterdir() if p.is_dir() and p.name not in ("teacher", "sweep")):
            yield arm.name, arm


def table_arms(result: dict):
    """(arm slug, arm root) for every row of a paper_table result that names a final model."""
    for r in result["rows"]:
        if r.get("final_model"):
            yield re.sub(r"[^a-z0-9]+", "-", r["arm"].lower()).strip("-"), Path(r["final_model"]).parent.parent


def curves(arms) -> dict[str, dict[str, dict[int, float]]]:
    """arm -> {"2a": {student step: mean C2}, "2b": {step: mean KL}, "3": {step: mean reward},
    "eval": {step at a stage's end: mean eval avg@k}} over the (arm, arm root) pairs given (one per seed)."""
    keys = ("2a", "2b", "3", "eval")
    acc: dict = defaultdict(lambda: {k: defaultdict(list) for k in keys})
    for name, arm in arms:
        offset = 0
        for stage, key, field in (("kl_warmup", "2a", "c2"), ("onpolicy_distill", "2b", "kl"),
                                  ("student_rl", "3", "reward"), ("direct_grpo", "3", "reward")):
            found = rows(arm / stage / "metrics.jsonl")
            for r in found:
                if field in r:
                    acc[name][key][offset + r["step"]].append(r[field])
            offset += len(found)
            manifest = arm / stage / "manifest.json"
            if found and manifest.exists():
                m = json.loads(manifest.read_text())["metrics"]
                score = next((v for k, v in m.items() if k.startswith("eval.avg@")), None)
                if score is not None:
                    acc[name]["eval"][offset].append(score)
                if key == "2a":  # C2 before and after 2a, measured by the stage at its ends
                    for at, what in ((0, "c2_before"), (offset, "c2_after")):
                        if m.get(what) is not None and at not in {r["step"] for r in found if "c2" in r}:
                            acc[name]["2a"][at].append(m[what])
    return {a: {k: {s: statistics.mean(v) for s, v in sorted(d.items())} for k, d in c.items()} for a, c in acc.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", type=Path, help="a table root whose arms all sit in seed*/<arm>/")
    where.add_argument("--table", type=Path, help="a paper_table result JSON (its rows name each arm's folder)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(table_arms(json.loads(args.table.read_text())) if args.table else seed_arms(args.root))
    what = args.table.stem if args.table else args.root.name
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (arm, c) in enumerate(sorted(data.items())):
        color = f"C{i}"
        if c["2b"]:
            ax.plot(list(c["2b"]), list(c["2b"].values()), color=color, label=f"{arm}: 2b per-step KL", lw=1)
        if c["2a"]:
            ax.plot(list(c["2a"]), list(c["2a"].values()), "o--", color=color, label=f"{arm}: 2a C2", ms=4)
        if c["3"]:
            rx.plot(list(c["3"]), list(c["3"].values()), color=color, lw=1, label=f"{arm}: GRPO training reward")
        if c["eval"]:
            rx.plot(list(c["eval"]), list(c["eval"].values()), "s:", color=color, ms=5, label=f"{arm}: eval after each stage")
    ax.set_xlabel("student step (2a, then 2b)")
    ax.set_ylabel("KL(student || teacher) per token")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"C2 against student steps, mean over seeds ({what})", fontsize=9)
    rx.set_xlabel("student step (2a, 2b, then 3)")
    rx.set_ylabel("reward (fraction correct)")
    rx.legend(fontsize=7)
    rx.set_title("GRPO reward per step (stage 3, direct GRPO); eval avg@k where each stage ended", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
