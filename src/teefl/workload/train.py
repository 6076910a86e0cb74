"""Local training and evaluation -- the work a collaborator does inside each round.

Why plain loops over uint8 tensors: the data stays compact (4x smaller than float) and is
normalized per batch on the device, so a CIFAR-sized shard never exists as a float copy. A fresh
optimizer per call matches FedAvg: optimizer state is local and never aggregated.
"""

from __future__ import annotations

import torch
from torch import nn

from teefl.errors import TeeflError
from teefl.plan import TrainingSpec


def resolve_device(name: str) -> torch.device:
    """``auto`` = the GPU when torch sees one, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TeeflError(
                f"training.device is {name!r} but torch sees no CUDA GPU; "
                "set training.device to auto or cpu"
            )
        return torch.device(name)
    raise TeeflError(f"unknown device {name!r}; choose auto, cpu or cuda")


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads when given (several processes share a host); return it."""
    if threads is not None:
        if threads < 1:
            raise TeeflError(f"training.threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]; the one normalization shared by training and evaluation."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {x.dtype}")
    return (x.float() / 255.0 - 0.5) / 0.5


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch bounds; a trailing batch of one joins the previous one, since BatchNorm in train
    mode cannot normalize a single sample (ResNet/MobileNet on 28x28 reach 1x1 maps)."""
    bounds = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _optimizer(
    model: nn.Module, spec: TrainingSpec, lr: float | None = None
) -> torch.optim.Optimizer:
    lr = spec.lr if lr is None else lr
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise TeeflError(f"unknown optimizer {spec.optimizer!r}; choose adam or sgd")


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainingSpec,
    device: torch.device,
    seed: int,
    *,
    lr: float | None = None,
    proximal_mu: float = 0.0,
) -> dict:
    """Train ``model`` in place on (x uint8, y int64) for ``spec.epochs``; return mean loss, n.

    The shuffle comes from a generator seeded by ``seed`` and dropout draws from a forked RNG
    seeded likewise, so a round is reproducible and the caller's RNG is left untouched.
    ``lr`` and ``proximal_mu`` come from the strategy's round config (`teefl.strategy`): the
    round's learning rate instead of ``spec.lr``, and FedProx's proximal term's weight (the
    term pulls towards the model as it is now, the round's global model). The reported loss
    is the task's loss, without the proximal term.
    """
    n = len(x)
    if n == 0:
        raise TeeflError("no training samples for this collaborator; check the dataset caps")
    if len(y) != n:
        raise ValueError(f"{n} images but {len(y)} labels")
    model.to(device)
    model.train()
    opt = _optimizer(model, spec, lr)
    loss_fn = nn.CrossEntropyLoss()
    prox = None
    if proximal_mu:
        from teefl.workload.proximal import ProximalTerm

        prox = ProximalTerm(model, proximal_mu)  # before the first step: the global model
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for _ in range(spec.epochs):
            order = torch.randperm(n, generator=gen)
            for s, e in _batches(n, spec.batch_size):
                idx = order[s:e]
                xb = to_float(x[idx].to(device, non_blocking=True))
                yb = y[idx].to(device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                if prox is not None:
                    (loss + prox(model)).backward()
                else:
                    loss.backward()
                opt.step()
                total += loss.item() * (e - s)
                count += e - s
    return {"loss": total / count, "samples": n}


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> dict:
    """Accuracy (0..1) and mean cross-entropy of ``model`` on (x, y); the mode is restored after."""
    n = len(x)
    if n == 0:
        raise TeeflError("no test samples to evaluate on; check dataset.max_test_samples")
    was_training = model.training
    model.to(device)
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                xb = to_float(x[s : s + batch_size].to(device, non_blocking=True))
                yb = y[s : s + batch_size].to(device, non_blocking=True)
                out = model(xb)
                loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
                correct += int((out.argmax(dim=1) == yb).sum().item())
    finally:
        model.train(was_training)
    return {"accuracy": correct / n, "loss": loss_sum / n, "samples": n}
