"""What ``flashmoe`` and ``flashmoe-daemon`` share on the command line: a parser whose errors are
one line, checked value types (a bad value is refused before anything loads), and the flags of the
engine and of sampling, so that both commands take the same ones with the same bounds."""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

from flashmoe import __version__
from flashmoe.errors import ConfigError

SEED_MAX = 2**64 - 1  # MLX's random seed is an unsigned 64-bit integer
DTYPES = ["auto", "float32", "bfloat16", "float16"]


class _Help(argparse.HelpFormatter):
    """Adds ``(default: X)`` to a flag's help unless the help already says its default (a flag
    whose default comes from the environment never shows its value: it may be a key)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that shows defaults in ``--help`` and says a usage error in one line
    (``error: ...``, exit 2) instead of the whole usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def int_in(lo: int, hi: int | None = None, what: str = "an integer"):
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v < lo or (hi is not None and v > hi):
            span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {span})")
        return v

    parse.__name__ = "integer"
    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            left = "(" if lo_open else "["
            span = f"{left}{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be in {span})")
        return v

    parse.__name__ = "number"
    return parse


positive_int = int_in(1, 2**31 - 1)
count = int_in(0, 2**31 - 1)
seed = int_in(0, SEED_MAX)
workers = int_in(1, 256)  # processes
threads = int_in(1, 1024)


def seconds(text: str) -> float:
    return _float_in(0.0, 1e9, lo_open=True)(text)


def size(text: str) -> str:
    """A byte size (``512MiB``, ``4G``) or ``auto``, checked now and passed on as text."""
    from flashmoe.configs import parse_size

    if text == "auto":
        return text
    try:
        if parse_size(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def layer_split(text: str) -> list[int]:
    """Layers per pipeline rank: ``3,5``."""
    return [positive_int(t.strip()) for t in text.split(",")]


def lanes(text: str) -> str:
    return text if text == "auto" else str(int_in(1, 256)(text))


def engine_args(p: argparse.ArgumentParser, lanes_flag: bool = True) -> None:
    """Flags of the engine: the model and how it is run (``run``, ``bench decode``, the daemon)."""
    p.add_argument("--model", required=True,
                   help="checkpoint or packed store directory, or a Hugging Face repo id")
    p.add_argument("--memory-budget", type=size, metavar="SIZE",
                   help="everything flashmoe holds (dense weights, KV cache, expert pool): "
                   "bytes, 512MiB, 2GiB, 4G (default: auto)")
    p.add_argument("--workers", type=workers, help="loader worker processes (default: 2)")
    p.add_argument("--threads", type=threads, dest="io_threads",
                   help="I/O threads per worker (default: 8)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute dtype (default: auto, the checkpoint's own; float32 on a CPU)")
    p.add_argument("--experts-per-token", type=positive_int, metavar="K",
                   help="override the model's top-k (at most its expert count)")
    p.add_argument("--max-context", type=positive_int, metavar="N",
                   help="tokens (prompt + generated) the KV cache is sized for (default: auto, "
                   "chosen from the budget)")
    if lanes_flag:
        p.add_argument("--lanes", type=lanes,
                       help="compute lanes: threads sharing one expert cache (default: auto)")


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=256, help="tokens to generate")
    p.add_argument("--temperature", type=_float_in(0.0, 1e4), default=0.0,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling mass")
    p.add_argument("--top-k", type=count, default=0, help="sample among the k likeliest (0: all)")
    p.add_argument("--min-p", type=_float_in(0.0, 1.0), default=0.0,
                   help="drop tokens below min-p times the likeliest")
    p.add_argument("--seed", type=seed, help=f"random seed, 0..{SEED_MAX} (default: random)")


def say(message: str) -> None:
    """Print one ``error:`` line on stderr."""
    print(f"error: {message}", file=sys.stderr)
