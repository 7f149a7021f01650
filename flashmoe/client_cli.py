"""``flashmoe generate`` and ``flashmoe chat``: the command-line side of the daemon's client."""

from __future__ import annotations

import argparse
import sys

from flashmoe.protocol.client import Client, Stream


def _sampling(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
    }


def _print_stream(stream: Stream) -> str:
    parts = []
    with stream:
        for chunk in stream:
            parts.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def cmd_generate(args: argparse.Namespace) -> int:
    """``flashmoe generate PROMPT``: stream to stdout (``--no-stream``: print at the end)."""
    with Client(args.socket, timeout=args.timeout) as c:
        if args.no_stream:
            print(c.generate(args.prompt, **_sampling(args)).text)
        else:
            _print_stream(c.generate(args.prompt, stream=True, **_sampling(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``flashmoe chat``: an interactive conversation; ``/exit`` or end of input ends it."""
    tty = sys.stdin.isatty()
    history: list[dict] = []
    with Client(args.socket, timeout=args.timeout) as c:
        while True:
            if tty:
                try:
                    line = input(">>> ")
                except EOFError:
                    break
            else:
                line = sys.stdin.readline()
                if not line:
                    break
            line = line.strip()
            if line in ("/exit", "/quit"):
                break
            if not line:
                continue
            history.append({"role": "user", "content": line})
            if args.no_stream:
                reply = c.chat(history, **_sampling(args)).text
                print(reply)
            else:
                stream = c.chat(history, stream=True, **_sampling(args))
                try:
                    reply = _print_stream(stream)
                except KeyboardInterrupt:  # stop this answer, keep the conversation
                    stream.close()
                    print("\n[interrupted]")
                    history.pop()
                    continue
            history.append({"role": "assistant", "content": reply})
    return 0
