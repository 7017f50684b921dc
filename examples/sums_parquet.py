"""Write a small MATH-style dataset as local Parquet files, for the `dataset` task on tiny models:

    python examples/sums_parquet.py data/sums
    python -m stages workflow --config examples/sums_parquet.yaml --root runs/sums
    python -m stages evaluate --config examples/sums_parquet.yaml --root runs/sums \
        --model runs/sums/student_rl/model --label final

train.parquet has MATH's fields (``problem``, ``solution`` ending in ``\\boxed{}``): the bootstrap trains the
tiny models on these worked solutions; test.parquet (``problem``, ``answer``) and hard.parquet (three
terms) are two named eval sets.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def rows(n: int, seed: int, terms: int = 2, worked: bool = True) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        xs = tuple(rng.randint(10, 99) for _ in range(terms))
        if xs in seen:
            continue
        seen.add(xs)
        q = f"What is {' + '.join(map(str, xs))}?"
        out.append({"problem": q, "solution": f"{' + '.join(map(str, xs))} = {sum(xs)}, so \\boxed{{{sum(xs)}}}."}
                   if worked else {"problem": q, "answer": str(sum(xs))})
    return out


def main(folder: str) -> None:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    train = rows(6000, 0)  # of the 8,100 two-term sums: the rest can be held out
    held = {r["problem"] for r in train}
    test = [r for r in rows(2000, 1, worked=False) if r["problem"] not in held][:200]  # held out from train
    pq.write_table(pa.Table.from_pylist(train), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(test), d / "test.parquet")
    pq.write_table(pa.Table.from_pylist(rows(100, 2, terms=3, worked=False)), d / "hard.parquet")
    print(f"wrote {d}/train.parquet ({len(train)}), test.parquet ({len(test)}), hard.parquet (100)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/sums")
