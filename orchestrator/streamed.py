"""Streamed expert banks: mlx-lm's ``SwitchGLU`` / ``SwitchMLP`` with their experts in the cache.

mlx-lm computes every routed expert bank through one seam, ``bank(x, indices)``. We keep mlx-lm's
own bank object (its activation and its ``__call__``, so the math is exactly mlx-lm's) and swap
its projections for ones whose weight arrays are the cache arrays ``[nslots, ...]``. A call maps
expert ids to cache slots and hands the slot ids to mlx-lm's code as the expert indices.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchLinear,
)

from flashmoe.banks import find_banks
from flashmoe.orchestrator.cache import ExpertCache
from flashmoe.orchestrator.lane import Lane

SORT_MIN = 64  # mlx-lm's banks sort the pairs by expert from this many on
# How a bank computes while its loads are in flight, chosen once per backend (``default_path``):
# - "progressive" (CPU): the cached experts' pairs at once, then each batch of misses as it
#   lands. Splitting a call's pairs by expert is bit-exact on the CPU backend, whatever the
#   parts' sizes (each pair is its own product; checked by the tests in f32 and bf16, sorted and
#   unsorted).
# - "deferred" (GPU, where kernels may tile by batch shape, so one call keeps mlx-lm's exact
#   sums): a bank with loads in flight returns its lazy output at once, so the host builds the
#   rest of this layer and the next layer's graph while the disk reads, and the next routing
#   sync waits for the loads first. Sound because mlx-lm's forward pass evaluates nothing
#   between two MoE layers (true of every architecture ``flashmoe.banks`` accepts;
#   tests/test_engine.py checks each), and the last MoE layer of the model never defers. A bank
#   whose experts are all in is sent to the device at once, to run while the host builds the
#   next layer's graph.
PATHS = ("progressive", "deferred")


def _linear_from_cache(proj: str, cache: ExpertCache, quant: dict | None) -> nn.Module:
    arrays = cache.arrays
    if f"{proj}.scales" in arrays:
        q = (quant or {}).get(proj, quant) or {}  # one setting, or each projection's own
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


def default_path() -> str:
    return "progressive" if mx.default_device() == mx.cpu else "deferred"


class StreamedBank:
    """Drop-in for an expert bank: same ``(x, indices)`` call, experts fetched on demand.

    Deliberately not an ``nn.Module``: the cache arrays must stay out of ``model.parameters()``
    so that casting or evaluating the model never touches (or copies) them.
    """

    def __init__(self, bank: nn.Module, layer: int, cache: ExpertCache, quant: dict | None):
        self.layer = layer
        self.cache = cache
        # each projection's record tensors: its own name, or ``proj~N`` (mixed bits per layer)
        for proj, name in cache.store.projections(layer).items():
            if proj not in bank:
                raise ValueError(f"layer {layer}: record tensor {proj!r} has no place in the bank")
            setattr(bank, proj, _linear_from_cache(name, cache, quant))
        self.inner = bank
        self.num_experts = cache.store.num_experts
        # With prefetch: the next MoE layer and its router, whose best ``guess_top`` experts
        # per token this bank guesses.
        self.ahead: tuple[int, nn.Module] | None = None
        self.guess_top = 0
        self.prefetch_limit = max(1, cache.plan.staging_slots // 2)  # guesses kept per call
        self.path = default_path()
        self.defer = False  # "deferred" path, and not the last bank
        self.place: tuple[object, str] | None = None  # (parent module, attribute) holding it

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        lane = Lane.current(self.cache)
        guess = self._guess(x) if self.ahead and indices.size < SORT_MIN else None
        # the one host sync per MoE layer: routing decides the loads (the guesses come along)
        ids, *guessed = lane.route(indices, *([guess] if guess is not None else []))
        experts = np.unique(ids)
        if experts.size and (experts[0] < 0 or experts[-1] >= self.num_experts):
            raise ValueError(f"layer {self.layer}: router chose expert {experts[-1]}, "
                             f"model has {self.num_experts}")
        if experts.size > self.cache.nslots:
            return self._grouped(x, ids, experts)
        h = self.cache.request(self.layer, experts, lane)
        remap = np.zeros(self.num_experts, dtype=np.uint32)
        remap[experts] = h.slots
        st = self.cache.stats
        if h.ready:
            h.wait()
            out = self.inner(x, mx.array(remap[ids]))
            if self.path == "deferred":
                mx.async_eval(out)
        elif self.path == "progressive":
            out = self._progressive(x, ids, remap, h)
            st.overlapped += 1
        elif self.defer:
            out = self.inner(x, mx.array(remap[ids]))  # lazy: runs once its loads landed
            h.defer()
            st.overlapped += 1
        else:
            h.wait()
            out = self.inner(x, mx.array(remap[ids]))
            mx.async_eval(out)
        if guessed:  # read after this layer's own loads
            nxt = self.ahead[0]
            keys = [(nxt, e) for e in _best_first(guessed[0])]
            self.cache.prefetch.guess(lane, keys, limit=self.prefetch_limit)
        return out

    def _guess(self, x: mx.array) -> mx.array:
        """The next MoE layer's experts, guessed by applying its router to this layer's input
        (the residual stream changes little from one layer to the next): the router's best
        ``guess_top`` per token, best first, as [..., rank]; lazy."""
        g = self.ahead[1](x)
        if isinstance(g, tuple):  # some routers return (indices, scores), unordered
            inds, scores = g
            order = mx.argsort(-scores.astype(mx.float32), axis=-1)[..., :self.guess_top]
            return mx.take_along_axis(inds, order, axis=-1)
        return mx.argsort(-g.astype(mx.float32), axis=-1)[..., :self.guess_top]

    def _progressive(self, x, ids, remap, h):
        """Compute the (token, expert) pairs as their experts become ready: the cached ones at
        once, then each batch of misses as it lands, while the rest still load. Every expert's
        pairs go into one part, so the parts together are mlx-lm's call, bit for bit (CPU)."""
        flat = ids.reshape(-1)
        k = ids.shape[-1]
        xs = x.reshape(-1, x.shape[-1])
        slot_of = remap[flat]  # the cache slot of every pair
        left = np.ones(flat.size, dtype=bool)
        parts, orders = [], []

        def emit(mask):
            pairs = np.flatnonzero(mask)
            if pairs.size:
                out = self._pairs(xs, k, pairs, slot_of[pairs])
                mx.async_eval(out)
                parts.append(out)
                orders.append(pairs)
            left[pairs] = False

        emit(np.isin(slot_of, h.slots[h.hit]))
        while left.any():
            landed = h.landed()
            if not landed:
                break  # settled: what is left waits on other lanes, or failed
            emit(left & np.isin(slot_of, landed))
        h.wait()
        emit(left.copy())
        return self._in_order(parts, orders, ids, x)

    def _grouped(self, x, ids, experts):
        """More distinct experts than cache slots (a long prefill on a small budget): one group
        of experts at a time, each group's (token, expert) pairs computed before the next group
        may evict them; every expert's pairs in one part, as in ``_progressive``."""
        cap = self.cache.nslots
        flat = ids.reshape(-1)
        k = ids.shape[-1]
        xs = x.reshape(-1, x.shape[-1])
        parts, orders = [], []
        for start in range(0, experts.size, cap):
            group = experts[start:start + cap]
            h = self.cache.request(self.layer, group)
            try:
                h.wait()
                remap = np.zeros(self.num_experts, dtype=np.uint32)
                remap[group] = h.slots
                pairs = np.flatnonzero(np.isin(flat, group))
                part = self._pairs(xs, k, pairs, remap[flat[pairs]])
                mx.eval(part)
            finally:
                h.release()
            parts.append(part)
            orders.append(pairs)
        return self._in_order(parts, orders, ids, x)

    def _pairs(self, xs: mx.array, k: int, pairs: np.ndarray, slots: np.ndarray) -> mx.array:
        """mlx-lm's bank on the (token, expert) pairs ``pairs`` (indices into the flattened
        routing of ``k`` experts per token) with their cache ``slots``: [pairs, 1, hidden]."""
        return self.inner(xs[mx.array(pairs // k)], mx.array(slots[:, None]))

    def _in_order(self, parts: list, orders: list, ids: np.ndarray, x: mx.array) -> mx.array:
        """The parts' pairs back in routing order, shaped as mlx-lm's bank returns them."""
        self.cache.stats.parts += len(parts)
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        return out[mx.array(np.argsort(np.concatenate(orders)))].reshape(*ids.shape,
                                                                         x.shape[-1])


def _best_first(guess: np.ndarray) -> list[int]:
    """The distinct experts of ``guess`` ([..., rank], each token's guesses best first): every
    token's first choice, then every token's second, ..."""
    g = guess.reshape(-1, guess.shape[-1])
    experts = g.T.reshape(-1)  # rank, token
    _, first = np.unique(experts, return_index=True)
    return experts[np.sort(first)].tolist()


def _parent(model: nn.Module, path: str):
    *parts, last = path.split(".")
    obj = model
    for p in parts:
        obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
    return obj, last


def _router_of(block: nn.Module):
    """The router of an MoE block and its top-k, where mlx-lm's block exposes them."""
    gate = block.get("gate") if isinstance(block, dict) else None
    k = getattr(block, "top_k", None) or getattr(block, "num_experts_per_tok", None)
    return (gate, int(k)) if gate is not None and k else None


def install_streamed_banks(model: nn.Module, cache: ExpertCache, quant: dict | None,
                           moe_layers: list[int], prefetch: bool = False,
                           guess_top: int = 0) -> list[StreamedBank]:
    """Replace every expert bank of ``model`` by a streamed one; their in-memory experts
    (still lazy, never read) are dropped. With ``prefetch`` each bank guesses the next MoE
    layer's best ``guess_top`` experts per token (0: as many as its router picks) with that
    layer's router."""
    banks = find_banks(model)
    layers = sorted(layer for _, layer, _ in banks)
    if layers != sorted(moe_layers):
        raise ValueError(f"model has expert banks in layers {layers}, store has {moe_layers}")
    out = []
    for path, layer, bank in banks:
        parent, attr = _parent(model, path)
        streamed = StreamedBank(bank, layer, cache, quant)
        streamed.place = (parent, attr)
        # nn.Module keeps modules in its dict; a plain attribute keeps the bank out of
        # parameters() while the parent's __call__ still finds it.
        if attr in parent:
            del parent[attr]
        object.__setattr__(parent, attr, streamed)
        out.append((streamed, parent))
    out.sort(key=lambda sp: sp[0].layer)
    use_path([b for b, _ in out], default_path())
    if prefetch:
        for (bank, _), (nxt, parent) in zip(out, out[1:], strict=False):
            router = _router_of(parent)
            if router is not None:
                gate, k = router
                bank.ahead = (nxt.layer, gate)
                bank.guess_top = min(k, guess_top) if guess_top > 0 else k
    return [b for b, _ in out]


def use_path(banks: list[StreamedBank], path: str) -> None:
    """Compute ``banks`` (a model's, in layer order) the ``path`` way (see ``PATHS``)."""
    if path not in PATHS:
        raise ValueError(f"unknown compute path {path!r}; known: {', '.join(PATHS)}")
    for i, bank in enumerate(banks):
        bank.path = path
        bank.defer = path == "deferred" and i < len(banks) - 1
