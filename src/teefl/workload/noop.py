"""``noop``: a workload that trains nothing -- the received model goes back unchanged.

Why: the transfer benchmarks (comm_limit, scale, vs_flower) measure teefl's real round loop with
the training taken out, so the figures are communication alone. As a registered workload the
benchmarks choose it in the plan instead of subclassing the collaborator and patching its
module. The payload is any of the vision models, or a stack of square linear layers of a chosen
size (the benchmarks' synthetic payloads: ``linear_stack`` 12 x 2048 = 201 MB in 24 tensors,
1 x 1240 = 6.2 MB in 2), a small MLP, or GPT-2's architecture built from its config with
Hugging Face ``transformers`` (``gpt2``: random weights, nothing downloaded; GPT-2 Large is
``n_embd: 1280, n_layer: 36, n_head: 20``), in any of ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from teefl.workload.api import Party, RoundInfo


class NoOpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: a vision model (``small_cnn``, ``resnet18``, ``mobilenet_v3_small``), ``linear_stack``
    #: (``layers`` x Linear(width, width)) or ``mlp`` (Flatten, Linear(inputs, hidden), ReLU,
    #: Linear(hidden, classes))
    model: Literal["small_cnn", "resnet18", "mobilenet_v3_small", "linear_stack", "mlp", "gpt2"] = (
        "small_cnn"
    )
    #: the dtype the model is built in (what travels: bfloat16 and float16 move half the bytes)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    channels: int = Field(3, ge=1)
    classes: int = Field(10, ge=2)
    layers: int = Field(1, ge=1)
    width: int = Field(1240, ge=1)
    inputs: int = Field(3 * 32 * 32, ge=1)
    hidden: int = Field(16, ge=1)
    #: ``gpt2``: GPT2Config's sizes (GPT-2 small by default) and vocabulary
    n_embd: int = Field(768, ge=8)
    n_layer: int = Field(12, ge=1)
    n_head: int = Field(12, ge=1)
    vocab_size: int = Field(50257, ge=2)
    #: the sample count each party reports (the weight of its update in FedAvg)
    samples: int = Field(16, ge=1)


@dataclass(frozen=True)
class NoOpData:
    samples: int


class NoOp:
    """Returns the model unchanged; ``evaluate`` reports the sample count only."""

    Options = NoOpOptions

    def __init__(self, options: NoOpOptions) -> None:
        self.options = options

    def build_model(self, seed: int) -> nn.Module:
        o = self.options
        dtype = getattr(torch, o.dtype)
        if o.model in ("small_cnn", "resnet18", "mobilenet_v3_small"):
            from teefl.workload.models import build_model

            return build_model(o.model, o.channels, o.classes, seed=seed).to(dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if o.model == "gpt2":
                return _gpt2(o, dtype)
            # built in the dtype itself: never a float32 copy of a model meant to be smaller
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                if o.model == "linear_stack":
                    net = nn.Sequential(*[nn.Linear(o.width, o.width) for _ in range(o.layers)])
                else:
                    head = [
                        nn.Linear(o.inputs, o.hidden),
                        nn.ReLU(),
                        nn.Linear(o.hidden, o.classes),
                    ]
                    net = nn.Sequential(nn.Flatten(), *head)
            finally:
                torch.set_default_dtype(previous)
            return net.to(dtype)

    def load(self, party: Party) -> NoOpData:
        return NoOpData(self.options.samples)

    def train(self, model: nn.Module, data: NoOpData, info: RoundInfo) -> dict[str, Any]:
        return {"samples": data.samples}

    def evaluate(self, model: nn.Module, data: NoOpData) -> dict[str, Any]:
        return {"samples": data.samples}


def _gpt2(o: NoOpOptions, dtype: torch.dtype) -> nn.Module:
    """GPT-2's language model from its config, in ``dtype`` (``transformers`` is imported here
    only: ``pip install 'teefl[lora]'``)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        from teefl.errors import TeeflError

        raise TeeflError(
            "the noop workload's gpt2 model needs Hugging Face transformers "
            "(pip install 'teefl[lora]')"
        ) from exc
    # the output layer untied from the embedding: the same state dict (both names, the same
    # bytes), but each tensor its own memory, so the model can live in its payload
    # (client/resident.py refuses tied tensors)
    config = GPT2Config(
        vocab_size=o.vocab_size,
        n_embd=o.n_embd,
        n_layer=o.n_layer,
        n_head=o.n_head,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel._from_config(config, dtype=dtype)
