"""The ``flashmoe`` command line: one sub-command per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from flashmoe.errors import FlashMoeError

# sub-command -> "module:function"; imported only when used so `--help` stays fast.
COMMANDS = {
    "synth": "flashmoe.synth:cmd_synth",
    "pack": "flashmoe.pack:cmd_pack",
    "inspect": "flashmoe.store:cmd_inspect",
    "fit": "flashmoe.fit:cmd_fit",
    "run": "flashmoe.orchestrator.run:cmd_run",
    "bench": "flashmoe.bench:cmd_bench",
    "generate": "flashmoe.protocol.client:cmd_generate",
    "chat": "flashmoe.protocol.client:cmd_chat",
}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint or packed store directory")
    p.add_argument("--memory-budget",
                   help="expert pool size: bytes, 512MiB, 2GiB, 4G (default: auto)")
    p.add_argument("--workers", type=int, help="loader worker processes")
    p.add_argument("--threads", type=int, dest="io_threads", help="I/O threads per worker")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--experts-per-token", type=int, help="override the model's top-k")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashmoe", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a random-weight checkpoint in a published layout")
    p.add_argument("out")
    p.add_argument("--arch", required=True)
    p.add_argument("--layout", choices=["hf", "mlx"], default="hf")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--moe-inter", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--shard-size", default="2GiB", help="max bytes per safetensors shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")

    p = sub.add_parser("pack", help="write a packed expert store (one aligned record per expert)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("inspect", help="describe a checkpoint or store")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fit", help="will MODEL run here within a budget, and how fast")
    p.add_argument("model")
    p.add_argument("--memory-budget", help="everything flashmoe holds: bytes, 6GiB, ... "
                   "(default: the memory available now)")
    p.add_argument("--context", type=int, help="context tokens (default: the longest the "
                   "budget holds, up to 32768)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantized KV cache")
    p.add_argument("--trace", help="routing trace for the hit rate (bench decode --trace-out)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="generate in the foreground with streamed experts")
    _model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--chat")
    _sampling_args(p)
    p.add_argument("--max-context", help="tokens the KV cache is sized for (default: auto, "
                   "chosen from the budget)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantized KV cache")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="benchmarks: io, decode")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("io", help="loader workers + pool against the disk")
    b.add_argument("--model", required=True)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--threads", type=int, default=8)
    m = b.add_mutually_exclusive_group()
    m.add_argument("--direct", action="store_true")
    m.add_argument("--buffered", action="store_true")
    b.add_argument("--seconds", type=float, default=5.0)
    b.add_argument("--cold", action="store_true")
    b.add_argument("--sweep", action="store_true")
    b.add_argument("--latency", action="store_true",
                   help="one record at a time: the loader against bare threads of one process")
    b.add_argument("--trace", help="routing trace file to replay")
    b.add_argument("--plot")
    b.add_argument("--json", action="store_true")
    b = bsub.add_parser("decode", help="streamed decode vs mlx-lm in memory")
    _model_args(b)
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--streams", type=int, default=1, help="concurrent sequences")
    b.add_argument("--baseline", action="store_true")
    b.add_argument("--baseline-model", help="checkpoint mlx-lm loads for the baseline (default "
                   "--model; a packed store holds no experts for mlx-lm)")
    b.add_argument("--cgroup-cap", help="run the streamed side under a memory cgroup of SIZE")
    b.add_argument("--trace-out", help="write the decode routing trace (JSON lines) here")
    b.add_argument("--guess-trace", help="prefetch guesses the routing of this trace (from "
                   "--trace-out, same run): a ceiling, every guess right; let it look ahead "
                   "(FLASHMOE_PREFETCH_AHEAD=4 FLASHMOE_PREFETCH_DEPTH=8 "
                   "FLASHMOE_PREFETCH_THREADS=8)")
    b.add_argument("--profile", action="store_true",
                   help="also time each part of a token (adds one sync per MoE layer)")
    b.add_argument("--json", action="store_true")

    for name in ("generate", "chat"):
        p = sub.add_parser(name, help=f"{name} against a running flashmoe-daemon")
        if name == "generate":
            p.add_argument("prompt")
        p.add_argument("--socket")
        p.add_argument("--timeout", type=float, default=600.0)
        p.add_argument("--no-stream", action="store_true")
        _sampling_args(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func = COMMANDS[args.command].split(":")
    try:
        return getattr(importlib.import_module(module), func)(args) or 0
    except FlashMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
