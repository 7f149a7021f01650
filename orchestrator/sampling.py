"""What a request asks of each generated token: its sampler, its stop strings, its logprobs.

Randomness is per request: mlx-lm's samplers draw from ``mx.random``'s global state, which
every request of a batch (and every lane) would share, so a seeded request would depend on what
else runs. Here each request owns a key (from its seed, else from the OS) and splits it once per
token; the filters (top-p, min-p, top-k) are mlx-lm's own.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from flashmoe.protocol.request import BOUNDS, Request


def sampler_for(req: Request) -> Callable[[mx.array], mx.array]:
    """A sampler for ``req`` with its own random key (greedy: mlx-lm's, shared by a batch)."""
    # Below 1e-6, 1/T overflows; greedy is the limit of a vanishing temperature.
    if req.temperature < 1e-6:
        return greedy_sampler
    filters = []
    if req.top_p < 1:
        filters.append(lambda x: apply_top_p(x, req.top_p))
    if req.min_p > 0:
        filters.append(lambda x: apply_min_p(x, req.min_p))
    if req.top_k > 0:
        filters.append(lambda x: apply_top_k(x, req.top_k) if req.top_k < x.shape[-1] else x)
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    state = [mx.random.key(seed % (BOUNDS["seed"][1] + 1))]
    inv_temp = 1.0 / req.temperature

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        state[0], key = mx.random.split(state[0])
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return sample


class StopText:
    """Cuts the generated text at the first of ``stops``: ``feed`` returns the text that can be
    sent now (holding back a tail that could still begin a stop string) and whether a stop
    string was reached; ``flush`` returns what was held back at the end."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.held += text
        found = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if found:
            cut, self.matched = min(found)
            out, self.held = self.held[:cut], ""
            return out, True
        n = len(self.held) - self.keep
        out, self.held = (self.held[:n], self.held[n:]) if n > 0 else ("", self.held)
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def token_logprobs(logprobs: mx.array, token: int, top: int) -> dict:
    """``{"token", "logprob", "top": [[id, logprob], ...]}`` of one sampled token, read from
    its (already evaluated) log-probabilities over the vocabulary."""
    lp = np.asarray(logprobs.astype(mx.float32)).reshape(-1)
    out = {"token": int(token), "logprob": float(lp[token])}
    if top:
        ids = np.argpartition(-lp, top - 1)[:top]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        out["top"] = [[int(i), float(lp[i])] for i in ids]
    return out
