"""Streamed expert banks: mlx-lm's ``SwitchGLU`` / ``SwitchMLP`` with their experts in the cache.

mlx-lm computes every routed expert bank through one seam, ``bank(x, indices)``. We keep mlx-lm's
own bank object (its activation and its ``__call__``, so the math is exactly mlx-lm's) and swap
its projections for ones whose weight arrays are the cache arrays ``[nslots, ...]``. A call maps
expert ids to cache slots and hands the slot ids to mlx-lm's code as the expert indices.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmoe.orchestrator.cache import ExpertCache
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)

BANK_TYPES = (SwitchGLU, SwitchMLP)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _linear_from_cache(proj: str, cache: ExpertCache, quant: dict | None) -> nn.Module:
    arrays = cache.arrays
    if f"{proj}.scales" in arrays:
        q = quant or {}
        lin = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
        nn.Module.__init__(lin)
        lin.group_size = int(q.get("group_size", 64))
        lin.bits = int(q.get("bits", 4))
        lin.mode = q.get("mode", "affine")
        lin.global_scale = None
        lin.weight = arrays[f"{proj}.weight"]
        lin.scales = arrays[f"{proj}.scales"]
        lin.biases = arrays.get(f"{proj}.biases")
    else:
        lin = SwitchLinear.__new__(SwitchLinear)
        nn.Module.__init__(lin)
        lin.weight = arrays[f"{proj}.weight"]
    if f"{proj}.bias" in arrays:
        lin.bias = arrays[f"{proj}.bias"]
    return lin


class StreamedBank:
    """Drop-in for an expert bank: same ``(x, indices)`` call, experts fetched on demand.

    Deliberately not an ``nn.Module``: the cache arrays must stay out of ``model.parameters()``
    so that casting or evaluating the model never touches (or copies) them.
    """

    def __init__(self, bank: nn.Module, layer: int, cache: ExpertCache, quant: dict | None):
        self.layer = layer
        self.cache = cache
        projections = sorted({t.name.split(".")[0] for t in cache.layout.tensors})
        for proj in projections:
            if proj not in bank:
                raise ValueError(f"layer {layer}: record tensor {proj!r} has no place in the bank")
            setattr(bank, proj, _linear_from_cache(proj, cache, quant))
        self.inner = bank
        self.num_experts = cache.store.num_experts

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        ids = np.array(indices)  # the one host sync per MoE layer: routing decides the loads
        experts = np.unique(ids)
        if experts.size and (experts[0] < 0 or experts[-1] >= self.num_experts):
            raise ValueError(f"layer {self.layer}: router chose expert {experts[-1]}, "
                             f"model has {self.num_experts}")
        cap = self.cache.nslots
        if experts.size <= cap:
            return self._run(x, ids, experts, None)
        # More distinct experts than cache slots (long prefill on a small budget): compute
        # the rows of one group of experts at a time and add the disjoint results.
        out = None
        for start in range(0, experts.size, cap):
            group = experts[start:start + cap]
            part = self._run(x, ids, group, np.isin(ids, group))
            mx.eval(part)  # the next group may evict these slots
            out = part if out is None else out + part
        return out

    def _run(self, x, ids, experts, mask):
        slots = self.cache.acquire(self.layer, experts)
        try:
            remap = np.zeros(self.num_experts, dtype=np.uint32)
            remap[experts] = slots
            out = self.inner(x, mx.array(remap[ids]))
            if mask is not None:
                out = mx.where(mx.array(mask)[..., None], out, mx.zeros_like(out))
            return out
        finally:
            self.cache.release(slots)


def find_banks(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """Every expert bank of ``model`` as (module path, decoder layer index, bank)."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, BANK_TYPES):
            layers = _LAYER.findall("." + name + ".")
            if not layers:
                raise ValueError(f"cannot tell the layer of expert bank {name!r}")
            found.append((name, int(layers[-1]), mod))
    return found


def _parent(model: nn.Module, path: str):
    *parts, last = path.split(".")
    obj = model
    for p in parts:
        obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
    return obj, last


def install_streamed_banks(model: nn.Module, cache: ExpertCache, quant: dict | None,
                           moe_layers: list[int]) -> list[StreamedBank]:
    """Replace every expert bank of ``model`` by a streamed one; their in-memory experts
    (still lazy, never read) are dropped."""
    banks = find_banks(model)
    layers = sorted(layer for _, layer, _ in banks)
    if layers != sorted(moe_layers):
        raise ValueError(f"model has expert banks in layers {layers}, store has {moe_layers}")
    out = []
    for path, layer, bank in banks:
        parent, attr = _parent(model, path)
        streamed = StreamedBank(bank, layer, cache, quant)
        # nn.Module keeps modules in its dict; a plain attribute keeps the bank out of
        # parameters() while the parent's __call__ still finds it.
        if attr in parent:
            del parent[attr]
        object.__setattr__(parent, attr, streamed)
        out.append(streamed)
    return out
