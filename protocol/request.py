"""One generation request, defined once: what to generate from, how to sample, when to stop.

Every front builds a ``Request`` (the CLI from its flags, the client and the daemon from a
``Generate`` message, the HTTP API from an OpenAI, Ollama or Anthropic body) and calls
``check`` once at its edge; the engine and its scheduler take it as it is. ``BOUNDS`` is the one
set of limits, which the wire format (``messages.Generate``) also uses.

The prompt is exactly one of ``prompt`` (raw text, or a list of token ids used as they are) and
``messages`` (a conversation for the model's chat template, with ``tools`` if any). ``tokens``
is filled by the engine, the one time the prompt is tokenized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

U64 = (1 << 64) - 1
MAX_STOP = 16  # stop sequences per request
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20

# name -> (lowest, highest); top_p excludes 0 (mlx-lm reads 0 as "off", a client means greedy)
BOUNDS: dict[str, tuple] = {
    "max_tokens": (1, (1 << 31) - 1),
    "temperature": (0.0, 100.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, (1 << 31) - 1),
    "min_p": (0.0, 1.0),
    "seed": (0, U64),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
}
ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}


class RequestError(ValueError):
    """A request that cannot be served; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Request:
    id: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    tokens: list[int] | None = field(default=None, repr=False)  # the engine's tokenization

    def check(self, max_tokens_limit: int | None = None) -> Request:
        """Raise ``RequestError`` for any field out of its type or bounds; returns ``self``
        with numbers normalized (ints where ints are meant, floats for the rest) and the
        ``developer`` role read as ``system``."""
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("give exactly one of prompt or messages", "prompt")
        if isinstance(self.prompt, list):
            if not self.prompt or not all(type(t) is int and t >= 0 for t in self.prompt):
                raise RequestError("prompt token ids must be a non-empty list of ints >= 0",
                                   "prompt")
        elif self.prompt is not None and not isinstance(self.prompt, str):
            raise RequestError("prompt must be a string or a list of token ids", "prompt")
        if self.messages is not None:
            self.messages = [_message(m, i) for i, m in enumerate(_list(self.messages,
                                                                         "messages"))]
        if self.tools is not None:
            self.tools = _list(self.tools, "tools")
            if not all(isinstance(t, dict) for t in self.tools):
                raise RequestError("tools must be a list of objects", "tools")
        hi = BOUNDS["max_tokens"][1] if max_tokens_limit is None else max_tokens_limit
        self.max_tokens = _int(self.max_tokens, "max_tokens", BOUNDS["max_tokens"][0], hi)
        for name in ("temperature", "min_p"):
            setattr(self, name, _float(getattr(self, name), name, *BOUNDS[name]))
        self.top_p = _float(self.top_p, "top_p", *BOUNDS["top_p"])
        if self.top_p == 0:
            raise RequestError("top_p must be in (0, 1]", "top_p")
        self.top_k = _int(self.top_k, "top_k", *BOUNDS["top_k"])
        if self.seed is not None:
            self.seed = _int(self.seed, "seed", *BOUNDS["seed"])
        self.stop = _stops(self.stop)
        if type(self.logprobs) is not bool:
            raise RequestError("logprobs must be a boolean", "logprobs")
        self.top_logprobs = _int(self.top_logprobs, "top_logprobs", *BOUNDS["top_logprobs"])
        return self


def _list(v: Any, name: str) -> list:
    if not isinstance(v, list) or not v:
        raise RequestError(f"{name} must be a non-empty list", name)
    return v


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if type(v) is float and v.is_integer():
        v = int(v)
    if type(v) is not int:
        raise RequestError(f"{name} must be an integer", name)
    if not lo <= v <= hi:
        raise RequestError(f"{name} must be in [{lo}, {hi}], got {v}", name)
    return v


def _float(v: Any, name: str, lo: float, hi: float) -> float:
    if type(v) not in (int, float):
        raise RequestError(f"{name} must be a number", name)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise RequestError(f"{name} must be in [{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _stops(v: Any) -> list[str]:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in v):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} non-empty "
                           f"strings of up to {MAX_STOP_CHARS} characters", "stop")
    return list(v)


def _message(m: Any, i: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError(f"messages[{i}] must be an object with a string role", "messages")
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in ROLES:
        raise RequestError(f"messages[{i}].role must be one of system, developer, user, "
                           f"assistant, tool; got {m['role']!r}", "messages")
    extra = sorted(set(m) - _MESSAGE_KEYS)
    if extra:
        raise RequestError(f"messages[{i}] has unsupported fields {extra}", "messages")
    content = m.get("content")
    if content is None and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string", "messages")
    return {**m, "role": role, "content": content}


def prompt_bytes(req: Request) -> int:
    """The prompt's size in bytes (messages: their contents), read without tokenizing it."""
    if isinstance(req.prompt, str):
        return len(req.prompt.encode(errors="replace"))
    if req.prompt is not None:
        return len(req.prompt)
    return sum(len(m["content"].encode(errors="replace")) for m in req.messages or ())
