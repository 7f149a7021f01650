"""Every setting in one place: defaults from ``defaults.toml``, then environment, then flags."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from flashmoe.errors import ConfigError

_DEFAULTS = Path(__file__).with_name("defaults.toml")

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``6291456``, ``512MiB``, ``2GiB``, ``4G`` (G = 10**9, GiB = 2**30)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must be >= 0, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"bad size {text!r}: use bytes (6291456) or a unit (512MiB, 2GiB, 4G, 1.5GB)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Settings:
    memory_budget: str = "auto"
    auto_budget_fraction: float = 0.5
    workers: int = 2
    io_threads: int = 8
    io_mode: str = "auto"
    io_chunk: str = "256KiB"
    dtype: str = "auto"
    prefetch: str = "auto"
    prefetch_top: int = 4
    prefetch_depth: int = 2
    prefetch_threads: int = 0
    lanes: str = "auto"
    load_timeout_s: float = 30.0
    distributed_timeout_s: float = 600.0
    worker_start_timeout_s: float = 30.0
    socket: str = ""
    max_prompt_tokens: int = 32768
    max_context: str = "auto"
    kv_bits: int = 0
    max_tokens_limit: int = 32768
    max_message_bytes: int = 4194304
    max_queued_requests: int = 64
    prefix_cache_entries: int = 8
    prefix_cache_bytes: str = "1GiB"

    def with_overrides(self, **kw) -> Settings:
        """Return a copy with the given non-None values replaced."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


# How a switch is written in a TOML file or the environment.
ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")

# Settings that are counts with a floor: a value below it is a mistake, not a request.
_AT_LEAST = {"prefetch_top": 0, "prefetch_depth": 1, "prefetch_threads": 0, "kv_bits": 0}


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Defaults, then an optional TOML file, then ``FLASHMOE_<NAME>`` environment variables."""
    data = tomllib.loads(_DEFAULTS.read_text())
    if path:
        data.update(tomllib.loads(Path(path).read_text()))
    for f in fields(Settings):
        env = os.environ.get(f"FLASHMOE_{f.name.upper()}")
        if env is not None:
            data[f.name] = env
    out = {}
    for f in fields(Settings):
        if f.name in data:
            default = getattr(Settings, f.name)
            try:
                value = data[f.name]
                if isinstance(default, bool) and isinstance(value, str):
                    value = value.lower() in ON_WORDS
                out[f.name] = type(default)(value)
            except ValueError as e:
                raise ConfigError(f"setting {f.name}: {e}") from None
            low = _AT_LEAST.get(f.name)
            if low is not None and out[f.name] < low:
                raise ConfigError(f"setting {f.name}: must be >= {low}, got {out[f.name]}")
    return Settings(**out)
