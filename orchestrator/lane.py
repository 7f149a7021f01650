"""A compute lane's part of the expert cache: what it holds until its next routing sync.

A lane is one thread of compute with its own MLX stream (``scheduler.py``). The scheduler makes
one ``Lane`` per lane thread and activates it for that thread (``with lane:``); a streamed bank,
called by mlx-lm's model code with nothing but ``(x, indices)``, finds it with
``Lane.current(cache)``. Code that runs outside any scheduler (``Engine.generate``, tests) uses
the cache's own lane, one thread at a time.

The lane keeps the one rule that makes refilling a slot safe on every backend: a bank's slots stay
pinned until this lane's next routing sync (``route``), the host sync that depends on every kernel
the lane queued before it, so no slot is overwritten while a queued, running or still lazy kernel
may read it. A bank that hands on its output before its loads land (``Handle.defer``) is waited for
by the next ``route`` before anything is evaluated.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from flashmoe.errors import LoadError

if TYPE_CHECKING:
    from flashmoe.orchestrator.loads import Handle, Load

_CURRENT: contextvars.ContextVar[Lane | None] = contextvars.ContextVar("lane", default=None)


class Lane:
    """One compute lane's pins, deferred loads and guesses."""

    def __init__(self, cache):
        self.cache = cache
        self.held: list[Handle] = []  # released after the next routing sync
        self.deferred: Handle | None = None  # loads a bank's lazy output waits for
        self.candidates: list[tuple[int, int]] = []  # guesses not sent yet, best first
        self.guesses: list[Load] = []  # sent guesses, pinned until their layer begins
        self.layer = -1  # the layer this lane asked for last
        self._token: contextvars.Token | None = None

    @staticmethod
    def current(cache) -> Lane:
        """The lane active in this thread, or the cache's own lane."""
        lane = _CURRENT.get()
        return lane if lane is not None and lane.cache is cache else cache.lane

    def __enter__(self) -> Lane:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._token)

    def route(self, *arrays: mx.array) -> list[np.ndarray]:
        """The one host sync of a MoE layer: the loads a deferred bank's output waits for land
        first, then ``arrays`` are evaluated and read back; every kernel this lane queued
        before has then run, so its earlier banks' slots are released."""
        self.settle()
        mx.eval(*arrays)
        out = [np.array(a) for a in arrays]
        self._release_held()
        return out

    def settle(self) -> None:
        """Wait for the deferred bank's loads (``LoadError`` if one failed)."""
        h, self.deferred = self.deferred, None
        if h is not None:
            h.wait()

    def hold(self, h: Handle) -> None:
        self.held.append(h)

    def idle(self) -> None:
        """Nothing more runs on this lane for now (a request ended, or failed half way): its
        queued work finishes, then its guesses and its pins go."""
        try:
            self.settle()
        except LoadError:
            pass  # already reported by the pass that failed
        self.cache.prefetch.drop(self)
        if self.held:
            mx.synchronize(generation_stream)
            mx.synchronize()
            self._release_held()

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for h in held:
            h.release()
