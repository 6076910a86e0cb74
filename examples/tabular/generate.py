"""Write a small, learnable CSV for each collaborator: DIR/<name>/data.csv.

Each row is a customer: age, income, score (numbers), region and plan (categories); the label
``churn`` (yes/no) follows a fixed rule on them, with 5 % of labels flipped as noise, so a small
MLP reaches ~0.9 accuracy and no model can reach 1.0. The parties' data differ the way real
parties' do: each has its own mix of regions and its own age range (not IID).

    python generate.py --out data                 # data/col1/data.csv, data/col2/..., data/col3/...
    python generate.py --out data --names a,b --rows 800 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS = ["north", "south", "east", "west"]
PLANS = ["basic", "plus", "pro"]


def make_rows(rows: int, party: int, seed: int) -> pd.DataFrame:
    """``rows`` rows for party number ``party``; the same arguments give the same rows."""
    rng = np.random.default_rng([seed, party])
    mix = np.roll([0.4, 0.3, 0.2, 0.1], party)  # each party its own mix of regions
    region = rng.choice(len(REGIONS), size=rows, p=mix)
    plan = rng.choice(len(PLANS), size=rows, p=[0.5, 0.3, 0.2])
    age = rng.uniform(20 + 5 * party, 70 + 5 * party, size=rows).round(0)
    income = np.exp(rng.normal(10.5, 0.5, size=rows)).round(2)
    score = rng.normal(0.0, 1.0, size=rows).round(3)
    logit = (
        1.6 * score
        - 0.06 * (age - 47.5)
        + np.array([0.8, -0.8, 1.2, -1.2])[region]
        + np.array([-1.0, 0.0, 1.0])[plan]
        + 0.9 * (np.log(income) - 10.5)
    )
    churn = (logit > 0) ^ (rng.random(rows) < 0.05)  # 5 % label noise
    return pd.DataFrame(
        {
            "age": age,
            "income": income,
            "score": score,
            "region": np.array(REGIONS)[region],
            "plan": np.array(PLANS)[plan],
            "churn": np.where(churn, "yes", "no"),
        }
    )


def generate(out: Path, names: list[str], rows: int, seed: int) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        make_rows(rows, i, seed).to_csv(d / "data.csv", index=False)
        paths.append(d / "data.csv")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="parent of the party folders")
    ap.add_argument("--names", default="col1,col2,col3", help="comma-separated party names")
    ap.add_argument("--rows", type=int, default=600, help="rows per party")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for p in generate(args.out, args.names.split(","), args.rows, args.seed):
        print(p)


if __name__ == "__main__":
    main()
