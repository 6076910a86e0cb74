"""Print what one round moves per collaborator in examples/lora, with and without adapters.

The payload is teefl's wire format (a safetensors file) of the tensors that travel: the LoRA
adapters (``Task.trainable_state``), or -- for comparison -- the whole state dict, as a
federation that fine-tunes every weight would move it. A round is one download and one upload.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from teefl.wire import codec
from teefl.workload.resolve import resolve_workload

here = Path(__file__).resolve().parent
plan = yaml.safe_load((here / "plan.yaml").read_text())
w = resolve_workload(plan["workload"]["name"], plan["workload"]["options"], here)
model = w.build_model(plan["seed"])
state = model.state_dict()
adapters = {n: state[n] for n in w.travelling(model)}
whole = {n: t.contiguous() for n, t in state.items()}
for label, part in (("adapters only", adapters), ("whole model", whole)):
    size = len(codec.encode_state(part))
    print(f"{label:14s} {len(part):3d} tensors  {size:>10,d} B  per round {2 * size:>10,d} B")
