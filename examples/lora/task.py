"""LoRA fine-tuning of a small causal language model, as a teefl workload (examples/lora).

The model is GPT-2's architecture built from a config with Hugging Face ``transformers`` --
random weights, nothing downloaded -- made smaller by the options; ``peft`` puts LoRA adapters on
its attention projection (``c_attn``). ``trainable_state`` names the adapter tensors only: they
are what travels to the aggregator and back, are averaged and checkpointed; the frozen base is
built from the plan's seed, identically on every party, and never leaves one. Text is encoded
character by character with a fixed alphabet, so there is no tokenizer to download either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from transformers import GPT2Config, GPT2LMHeadModel

ALPHABET = " abcdefghijklmnopqrstuvwxyz.,"  # anything else is dropped


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ALPHABET.index(c) for c in text.lower() if c in ALPHABET])


class Task:
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        file: str = "text.txt"
        n_embd: int = Field(128, ge=8)
        n_layer: int = Field(2, ge=1)
        n_head: int = Field(4, ge=1)
        context: int = Field(48, ge=8)
        rank: int = Field(8, ge=1)
        alpha: int = Field(16, ge=1)
        steps: int = Field(40, ge=1)
        batch_size: int = Field(16, ge=1)
        lr: float = Field(5e-3, gt=0)

    def __init__(self, options: Options) -> None:
        self.o = options

    def build_model(self, seed: int) -> torch.nn.Module:
        o = self.o
        torch.manual_seed(seed)  # the frozen base: the same on every party
        config = GPT2Config(
            vocab_size=len(ALPHABET), n_positions=o.context, n_embd=o.n_embd,
            n_layer=o.n_layer, n_head=o.n_head, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        lora = LoraConfig(
            r=o.rank, lora_alpha=o.alpha, target_modules=["c_attn"], lora_dropout=0.0,
            fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed
        )  # fmt: skip
        return get_peft_model(GPT2LMHeadModel(config), lora)

    def trainable_state(self, model: torch.nn.Module) -> list[str]:
        return [name for name in model.state_dict() if "lora_" in name]

    def load(self, party) -> dict[str, torch.Tensor]:
        ids = encode((Path(party.data_dir) / self.o.file).read_text(encoding="utf-8"))
        cut = int(len(ids) * 0.9)
        return {"train": ids[:cut], "test": ids[cut:]}

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([ids[s : s + self.o.context] for s in starts.tolist()])

    def train(self, model: torch.nn.Module, data: dict, info) -> dict:
        ids, o = data["train"], self.o
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr)
        gen = torch.Generator().manual_seed(info.seed)
        model.train()
        total = 0.0
        for _ in range(o.steps):
            starts = torch.randint(0, len(ids) - o.context, (o.batch_size,), generator=gen)
            batch = self._windows(ids, starts)
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        return {"loss": total / o.steps, "samples": o.steps * o.batch_size}

    def evaluate(self, model: torch.nn.Module, data: dict) -> dict:
        ids, c = data["test"], self.o.context
        starts = torch.arange(0, len(ids) - c, c)
        batch = self._windows(ids, starts)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch, labels=batch)
        pred = out.logits[:, :-1].argmax(-1)
        accuracy = (pred == batch[:, 1:]).float().mean().item()  # next character
        return {"loss": out.loss.item(), "accuracy": accuracy, "samples": len(starts)}
