"""What ``bench decode`` watches in a forward pass, from outside the streamed banks.

``Probe.install`` puts a ``ProbedBank`` in each streamed bank's place in the model: it records
every bank call's routing (``--trace-out``), times routing and expert compute (``--profile``, one
more sync per MoE layer) and replays recorded routing as the guesses (``--guess-trace``). The
banks themselves carry none of it.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from flashmoe.errors import ConfigError
from flashmoe.orchestrator.lane import Lane
from flashmoe.orchestrator.streamed import SORT_MIN, StreamedBank


class RoutingReplay:
    """Guesses that are always right: the routing that an earlier run of the same request
    recorded, given to the cache in place of the routers' guesses. It shows how fast the
    pipeline streams when it knows what the next layer needs, apart from how well the routers
    guess it; the tokens are the same either way (guesses never change what is computed).

    ``calls`` are the recorded bank calls, ``(layer, experts)``, in order from where recording
    began; ``trace`` is this run's own record, begun at the same point, so the call being made
    is its last entry. A run that departs from the recording raises ``ConfigError``."""

    def __init__(self, calls: list[tuple[int, list[int]]], trace: list):
        self.calls = calls
        self.trace = trace

    def keys(self, layer: int) -> list[tuple[int, int]]:
        """The recorded experts of the next bank call, if it is ``layer``'s in this forward
        pass (none otherwise)."""
        i = len(self.trace) - 1
        if i < 0:
            raise ConfigError("the routing replay began before this run's record of it")
        if i >= len(self.calls):
            raise ConfigError(f"the routing replayed ends after {len(self.calls)} bank calls; "
                              "this run makes more: record as many tokens as it generates")
        if tuple(self.trace[-1]) != tuple(self.calls[i]):
            raise ConfigError(
                f"the routing replayed departs from this run at bank call {i + 1} (layer "
                f"{self.trace[-1][0]}): record it from the same model, prompt, dtype and "
                "settings")
        if i + 1 >= len(self.calls) or self.calls[i + 1][0] != layer:
            return []  # the recording ends, or the next forward pass begins
        return [(layer, e) for e in self.calls[i + 1][1]]


class Probe:
    """The benchmark's view of every bank call: ``trace`` (a list, or None: not recording),
    ``replay`` (or None) and, with ``profile``, seconds spent routing and computing experts."""

    def __init__(self, profile: bool = False):
        self.profile = profile
        self.trace: list | None = None
        self.replay: RoutingReplay | None = None
        self.route_s = 0.0
        self.expert_s = 0.0

    def install(self, banks: list[StreamedBank]) -> None:
        for bank in banks:
            parent, attr = bank.place
            object.__setattr__(parent, attr, ProbedBank(bank, self))
            if self.profile:
                bank.defer = False  # the profile evaluates each bank's output at once


class ProbedBank:
    """A streamed bank as the probe sees it; same ``(x, indices)`` call."""

    def __init__(self, bank: StreamedBank, probe: Probe):
        self.bank = bank
        self.probe = probe
        self.next_layer = bank.ahead[0] if bank.ahead else None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        probe, bank = self.probe, self.bank
        replaying = probe.replay is not None and self.next_layer is not None
        guess_with, bank.ahead = bank.ahead, None if replaying else bank.ahead
        try:
            if probe.profile:
                t0 = time.perf_counter()
                Lane.current(bank.cache).route(indices)  # the bank's own sync is then free
                probe.route_s += time.perf_counter() - t0
            out = bank(x, indices)
        finally:
            bank.ahead = guess_with
        if probe.trace is not None:
            probe.trace.append((bank.layer, np.unique(np.array(indices)).tolist()))
        if replaying and indices.size < SORT_MIN:
            bank.cache.prefetch.guess(Lane.current(bank.cache),
                                      probe.replay.keys(self.next_layer),
                                      limit=bank.prefetch_limit)
        if probe.profile:
            t1 = time.perf_counter()
            mx.eval(out)
            probe.expert_s += time.perf_counter() - t1
        return out
