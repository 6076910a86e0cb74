"""A collaborator's model whose tensors live inside its own wire payload.

Why: without it, every round the collaborator decodes the downloaded payload, copies it into
the model, and serializes the trained model into a new payload before uploading it
(docs/decisions/004-resident-model.md). Here each parameter and buffer of the model is a view
into one buffer laid out exactly as `codec.encode_state` lays out the model (a standard
safetensors file). The model *is* the payload: a download whose header is byte-for-byte this
layout is received straight into the model's memory, and an upload sends that memory as it is.

Training updates parameters and buffers in place, so they stay views; `intact` checks that
before the memory is sent, and the collaborator falls back to `codec.encode_state` and
`load_state_dict` whenever anything differs (another layout, a model that replaced a tensor, a
GPU model, tied weights).
"""

from __future__ import annotations

import torch

from teefl.wire import codec


class ResidentModel:
    """``payload``: the model's safetensors bytes (its tensors' memory); ``head``: the part
    before the first tensor byte (size, JSON header, padding), which names every tensor's
    dtype, shape and place."""

    def __init__(
        self,
        module: torch.nn.Module,
        payload: codec.Buffer,
        head: bytes,
        bindings: list[tuple[dict, str, int]],
    ) -> None:
        self.module, self.payload, self.head = module, payload, head
        #: (the submodule's ``_parameters`` or ``_buffers``, the name there, where it must live)
        self._bindings = bindings

    @classmethod
    def bind(cls, module: torch.nn.Module, names: list[str] | None = None) -> ResidentModel | None:
        """Move ``module``'s parameters and buffers into a payload buffer (values kept), or
        None where that cannot be done safely (see the module docstring). ``names``: only
        those state-dict entries travel (a workload's trainable subset); the rest stay put."""
        state = module.state_dict()
        if names is not None:
            state = {n: state[n] for n in names}
        if any(t.device.type != "cpu" for t in state.values()):
            return None
        storages = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
        if len(set(storages)) != len(storages):
            return None  # tied or shared tensors: one memory under two names
        layout = codec.Layout.of_state(state)
        if layout is None:
            return None
        payload = layout.allocate()
        views = layout.tensor_views(payload)
        wanted = set(state)
        # each tensor is copied into the payload and rebound at once, its old memory freed
        # before the next: the model is held once, not twice, while it moves (a GPT-2 Large
        # collaborator would otherwise peak at two model sizes here)
        del state
        bound: set[str] = set()
        bindings: list[tuple[dict, str, int]] = []
        for prefix, sub in module.named_modules():
            dot = f"{prefix}." if prefix else ""
            for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for tname in list(table):
                    key, t = dot + tname, table[tname]
                    if t is None or key not in views or key in bound:
                        continue
                    view = views[key]
                    if view.numel():
                        with torch.no_grad():
                            view.copy_(t)
                    if is_param:
                        t.data = view
                    else:
                        table[tname] = view
                    del t
                    bound.add(key)
                    if view.numel():
                        bindings.append((table, tname, view.data_ptr()))
        resident = cls(module, payload, layout.head, bindings)
        if bound != wanted or not resident.intact():
            return None  # a tensor the state dict shows but we could not rebind
        return resident

    def intact(self) -> bool:
        """Whether every tensor of the model still lives in the payload (nothing replaced)."""
        for table, name, ptr in self._bindings:
            t = table.get(name)
            if t is None or t.data_ptr() != ptr or not t.is_contiguous():
                return False
        return True
