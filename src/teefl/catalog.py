"""The names of teefl's built-in models and datasets, torch-free.

Why a module of its own: the plan and the study check a name before anything runs, and must
not import the workload (torch, the dataset readers) to do so; the workload modules that build
these models and read these datasets take their names from here, so the two cannot drift.
"""

from __future__ import annotations

MODEL_NAMES: tuple[str, ...] = ("small_cnn", "resnet18", "mobilenet_v3_small")
DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")
