"""The ``flashmoe`` command line: one sub-command per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from flashmoe.cli_args import (
    Parser,
    add_version,
    count,
    engine_args,
    int_in,
    layer_split,
    positive_int,
    sampling_args,
    say,
    seconds,
    size,
    threads,
    workers,
)
from flashmoe.errors import FlashMoeError
from flashmoe.outdir import DISK_ERRNOS
from flashmoe.signals import Terminated, unwind_on_signals

# sub-command -> "module:function"; imported only when used so `--help` stays fast.
COMMANDS = {
    "synth": "flashmoe.synth:cmd_synth",
    "pack": "flashmoe.pack:cmd_pack",
    "inspect": "flashmoe.store:cmd_inspect",
    "fit": "flashmoe.fit:cmd_fit",
    "run": "flashmoe.orchestrator.run:cmd_run",
    "bench": "flashmoe.bench:cmd_bench",
    "generate": "flashmoe.client_cli:cmd_generate",
    "chat": "flashmoe.client_cli:cmd_chat",
}
GROUP_SIZES = [32, 64, 128]  # what mx.quantize takes


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="flashmoe", description=__doc__)
    add_version(ap)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("synth", help="write a random-weight checkpoint in a published layout")
    p.add_argument("out", help="folder to write (must not exist, or be an earlier output)")
    p.add_argument("--arch", required=True,
                   help="model_type of any mlx-lm MoE architecture (e.g. qwen3_moe)")
    p.add_argument("--layout", choices=["hf", "mlx"], default="hf",
                   help="hf: original bf16 tensors; mlx: mlx-community quantized")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="mlx layout: weight bits")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                   help="mlx layout: quantization group size")
    for flag, what, most in (("layers", "decoder layers", 1024), ("hidden", "hidden size", 65536),
                             ("experts", "routed experts per layer", 4096),
                             ("topk", "experts per token", 256),
                             ("moe-inter", "expert intermediate size", 65536),
                             ("vocab", "vocabulary size", 1 << 20)):  # fmt: skip
        p.add_argument(f"--{flag}", type=int_in(1, most), help=f"{what}, 1..{most} (default: tiny)")
    p.add_argument("--shard-size", type=size, default="2GiB",
                   help="max bytes per safetensors shard")
    p.add_argument("--seed", type=count, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if an earlier synth or pack wrote it")
    p.add_argument("--mode", choices=["affine", "mxfp4", "nvfp4", "mxfp8"], default="affine",
                   help="mlx layout: quantization mode")
    p.add_argument("--recipe", help="mlx layout: an mlx-lm mixed-bit recipe, e.g. mixed_4_6")
    for flag, what in (("fp8", "FP8 block-scaled experts (hf layout)"),
                       ("mtp", "a multi-token-prediction module"),
                       ("vision", "a vision tower"),
                       ("legacy", "per-expert quantized tensors (older Mixtral conversions)")):
        p.add_argument(f"--{flag}", action="store_true", help=f"add {what}")

    p = sub.add_parser("pack", help="write a packed expert store (one aligned record per expert)")
    p.add_argument("src", help="checkpoint or packed store to read")
    p.add_argument("out", help="folder to write (must not exist, or be an earlier output)")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8],
                   help="re-quantize the experts to this width (default: keep them)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                   help="group size of --bits")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if an earlier pack or synth wrote it")

    p = sub.add_parser("inspect", help="describe a checkpoint or store")
    p.add_argument("model", help="checkpoint or packed store directory, or a Hugging Face repo id")
    p.add_argument("--memory-budget", type=size, help="also show what this budget buys")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("fit", help="will MODEL run here within a budget, and how fast")
    p.add_argument("model", help="checkpoint or packed store directory, or a Hugging Face repo id")
    p.add_argument("--memory-budget", type=size, metavar="SIZE",
                   help="everything flashmoe holds: bytes, 6GiB, ... (default: the memory "
                   "available now)")
    p.add_argument("--context", type=positive_int, help="context tokens (default: the longest "
                   "the budget holds, up to 32768)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantized KV cache")
    p.add_argument("--trace", help="routing trace for the hit rate (bench decode --trace-out)")
    p.add_argument("--seconds", type=seconds, default=3.5,
                   help="time spent measuring compute, and again reads (longer: steadier)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("run", help="generate in the foreground with streamed experts")
    engine_args(p, lanes_flag=False)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="raw text to complete")
    g.add_argument("--chat", help="one user message, rendered with the chat template")
    sampling_args(p)
    p.add_argument("--kv-bits", type=int, choices=[4, 8],
                   help="mlx-lm's quantized KV cache (default: off; `run` only)")
    p.add_argument("--json", action="store_true", help="print text, token ids and stats as JSON")
    p.add_argument("--distributed", action="store_true",
                   help="one pipeline stage of a group started by mlx.launch (rank 0 prints)")
    p.add_argument("--split", type=layer_split, metavar="N,N,...",
                   help="--distributed: decoder layers per rank, rank 0 first (rank 0 runs the "
                   "last ones; default: even)")

    p = sub.add_parser("bench", help="benchmarks: io, decode")
    bsub = p.add_subparsers(dest="bench", required=True, parser_class=Parser)
    b = bsub.add_parser("io", help="loader workers + pool against the disk")
    b.add_argument("--model", required=True, help="checkpoint or packed store directory")
    b.add_argument("--workers", type=workers, default=2, help="loader worker processes")
    b.add_argument("--threads", type=threads, default=8, help="I/O threads per worker")
    m = b.add_mutually_exclusive_group()
    m.add_argument("--direct", action="store_true", help="only O_DIRECT reads")
    m.add_argument("--buffered", action="store_true", help="only buffered reads")
    b.add_argument("--seconds", type=seconds, default=5.0, help="length of each measurement")
    b.add_argument("--cold", action="store_true", help="drop the page cache first (root)")
    b.add_argument("--sweep", action="store_true", help="sweep workers x threads")
    b.add_argument("--latency", action="store_true",
                   help="one record at a time: the loader against bare threads of one process")
    b.add_argument("--trace", help="routing trace file to replay")
    b.add_argument("--plot", help="write a plot of the sweep to this image file")
    b.add_argument("--json", action="store_true", help="print JSON")
    b = bsub.add_parser("decode", help="streamed decode vs mlx-lm in memory")
    engine_args(b, lanes_flag=False)
    b.add_argument("--tokens", type=positive_int, default=32, help="tokens to decode")
    b.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length")
    b.add_argument("--streams", type=int_in(1, 1024), default=1, help="concurrent sequences")
    b.add_argument("--baseline", action="store_true", help="also run mlx-lm in memory")
    b.add_argument("--baseline-model", help="checkpoint mlx-lm loads for the baseline (default "
                   "--model; a packed store holds no experts for mlx-lm)")
    b.add_argument("--disk-seconds", type=seconds, default=2.0,
                   help="length of each read of the disk, before and after (per way)")
    b.add_argument("--cgroup-cap", type=size, metavar="SIZE",
                   help="run the streamed side under a memory cgroup of SIZE")
    b.add_argument("--trace-out", help="write the decode routing trace (JSON lines) here")
    b.add_argument("--guess-trace", help="prefetch guesses the routing of this trace (from "
                   "--trace-out, same run): a ceiling, every guess right")
    b.add_argument("--profile", action="store_true",
                   help="also time each part of a token (adds one sync per MoE layer)")
    b.add_argument("--json", action="store_true", help="print JSON")

    for name in ("generate", "chat"):
        p = sub.add_parser(name, help=f"{name} against a running flashmoe-daemon")
        if name == "generate":
            p.add_argument("prompt", help="raw text to complete")
        p.add_argument("--socket", help="daemon socket (default: FLASHMOE_SOCKET or the "
                       "per-user default)")
        p.add_argument("--timeout", type=seconds, default=600.0,
                       help="seconds to wait for each message of the daemon")
        p.add_argument("--no-stream", action="store_true", help="print the text at the end")
        sampling_args(p)
    return ap


def _quiet_stdout() -> None:
    """After a broken pipe: send what is still buffered nowhere, so exiting does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (tests capture it)
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2), or --help / --version (0)
        return e.code if isinstance(e.code, int) else 0
    module, func = COMMANDS[args.command].split(":")
    try:
        with unwind_on_signals():
            return getattr(importlib.import_module(module), func)(args) or 0
    except FlashMoeError as e:
        say(str(e))
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        say("output closed before the end (broken pipe)")
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        say(f"{e.filename or 'output'}: {e.strerror}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143


if __name__ == "__main__":
    sys.exit(main())
