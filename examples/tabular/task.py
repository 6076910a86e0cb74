"""A complete teefl workload, outside the teefl package: an MLP on each party's own CSV.

The plan names it ``./task.py:Task``. teefl validates the plan's ``workload.options`` against
``Task.Options``, builds the model on every party (the aggregator too: it needs no data), calls
``load`` once per collaborator and ``train``/``evaluate`` each round. Nothing here imports teefl.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

NUMERIC = ["age", "income", "score"]
CATEGORIES = {"region": ["north", "south", "east", "west"], "plan": ["basic", "plus", "pro"]}
CLASSES = ["no", "yes"]
N_IN = len(NUMERIC) + sum(len(c) for c in CATEGORIES.values())


class Task:
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        file: str = "data.csv"
        hidden: int = 32
        epochs: int = 2
        lr: float = 0.01
        batch_size: int = 32

    def __init__(self, options: Options) -> None:
        self.o = options

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(N_IN, self.o.hidden), nn.ReLU(), nn.Linear(self.o.hidden, 2))

    def load(self, party) -> dict:
        df = pd.read_csv(Path(party.data_dir) / self.o.file)
        order = np.random.default_rng(party.seed).permutation(len(df))
        test, train = order[: len(df) // 5], order[len(df) // 5 :]
        num = df[NUMERIC].to_numpy(dtype=np.float64)
        mean, std = num[train].mean(0), num[train].std(0) + 1e-9  # this party's rows only
        onehot = [np.eye(len(v))[df[k].map(v.index).to_numpy()] for k, v in CATEGORIES.items()]
        x = torch.tensor(np.hstack([(num - mean) / std, *onehot]), dtype=torch.float32)
        y = torch.tensor(df["churn"].map(CLASSES.index).to_numpy())
        return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}

    def train(self, model: nn.Module, data: dict, round_info) -> dict:
        opt = torch.optim.Adam(model.parameters(), lr=self.o.lr)
        gen = torch.Generator().manual_seed(round_info.seed)
        n, total = len(data["y"]), 0.0
        model.train()
        for _ in range(self.o.epochs):
            for idx in torch.randperm(n, generator=gen).split(self.o.batch_size):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(data["x"][idx]), data["y"][idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
        return {"loss": total / (n * self.o.epochs), "samples": n}

    def evaluate(self, model: nn.Module, data: dict) -> dict:
        model.eval()
        with torch.no_grad():
            out = model(data["x_test"])
        acc = (out.argmax(1) == data["y_test"]).float().mean().item()
        loss = nn.functional.cross_entropy(out, data["y_test"]).item()
        return {"accuracy": acc, "loss": loss, "samples": len(data["y_test"])}
