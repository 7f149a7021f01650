"""``flashmoe-daemon``: one model served to local clients over ZeroMQ (and optionally HTTP).

    flashmoe-daemon start --model M [--memory-budget SIZE] [--workers N] [--socket PATH]
                          [--http HOST:PORT] [--api-key KEY] [--allow-origin ORIGIN]
                          [--allow-public] [--foreground] ...
    flashmoe-daemon status [--json] | stop | logs [-n N]

This module is the command line; ``lifecycle`` runs the process (pid file, log, detaching) and
``service`` the loop that serves requests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable

from flashmoe.cli_args import Parser, add_version, count, engine_args, layer_split, seconds
from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.lifecycle import running_pid, serve, start_detached
from flashmoe.protocol import sockets
from flashmoe.protocol.client import Client, ClientError, daemon_paths, pid_alive

DEFAULT_ENGINE = "flashmoe.orchestrator.engine:Engine"


def _stop(args: argparse.Namespace) -> int:
    paths = daemon_paths(args.socket)
    pid = running_pid(paths)
    if pid is None:
        for p, kind in ((paths.socket, stat.S_ISSOCK), (paths.pid, stat.S_ISREG)):
            try:  # what a dead daemon left, and nothing else
                sockets.check_own(p, kind)
                p.unlink()
            except (OSError, FlashMoeError):
                pass
        print(f"flashmoe-daemon: not running on {paths.socket}", file=sys.stderr)
        return 1
    try:
        with Client(paths.socket, timeout=5.0) as c:
            c.shutdown()
    except ClientError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if running_pid(paths) is None:
            print(f"flashmoe-daemon: stopped (pid {pid})")
            return 0
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    print(
        f"flashmoe-daemon: pid {pid} did not stop in {args.timeout:g} s (--timeout); killed",
        file=sys.stderr,
    )
    return 1


def _status(args: argparse.Namespace) -> int:
    with Client(args.socket, timeout=args.timeout) as c:
        st = c.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    from flashmoe.orchestrator.status_table import print_status

    print_status(st)
    return 0


def _logs(args: argparse.Namespace) -> int:
    paths = daemon_paths(args.socket)
    try:
        fd = sockets.open_private(paths.log, os.O_RDONLY)
    except FileNotFoundError:
        print(f"flashmoe-daemon: no log at {paths.log}", file=sys.stderr)
        return 1
    with os.fdopen(fd, errors="replace") as f:
        lines = f.read().splitlines()
    print("\n".join(lines[-args.n :] if args.n > 0 else lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="flashmoe-daemon", description="Serve a model to clients.")
    add_version(ap)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    sock_help = "daemon socket (default: FLASHMOE_SOCKET or <runtime dir>/daemon.sock)"
    p = sub.add_parser("start", help="load a model and serve it")
    engine_args(p)
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name for clients (default: its folder's name)")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible API on HOST:PORT (default: off)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FLASHMOE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on HTTP (default: FLASHMOE_API_KEY)",
    )
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="let browser pages of ORIGIN (e.g. http://localhost:3000, or *) call "
                   "the HTTP API; repeatable (default: none)")
    p.add_argument("--allow-public", action="store_true",
                   help="serve --http beyond loopback without --api-key (prints a warning)")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--start-timeout", type=seconds, default=600.0,
                   help="seconds to wait for ready")
    p.add_argument("--drain-timeout", type=seconds, default=30.0,
                   help="seconds running requests may take to finish on stop")
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true",
                   help="one pipeline stage of a group started by mlx.launch; rank 0 serves "
                   "(in the foreground), one request at a time")
    p.add_argument("--split", type=layer_split, metavar="N,N,...",
                   help="--distributed: decoder layers per rank, rank 0 first (default: even)")
    p = sub.add_parser("status", help="show the running daemon's status")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("--json", action="store_true", help="print every field as JSON")
    p.add_argument("--timeout", type=seconds, default=10.0, help="seconds to wait for the answer")
    p = sub.add_parser("stop", help="drain, stop workers, remove socket and shared memory")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("--timeout", type=seconds, default=60.0, help="seconds to wait before SIGKILL")
    p = sub.add_parser("logs", help="print the end of the daemon's log")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("-n", type=count, default=50, help="lines (0: all)")
    return ap


def main(argv: list[str] | None = None, *, engine_factory: Callable | None = None) -> int:
    """Entry point of ``flashmoe-daemon``; ``engine_factory`` replaces ``Engine`` (tests)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2), or --help / --version (0)
        return e.code if isinstance(e.code, int) else 0
    try:
        if args.command == "start" and args.split and not args.distributed:
            raise FlashMoeError("--split needs --distributed")
        if args.command == "start" and args.distributed:
            from flashmoe.orchestrator.distributed import start_daemon

            return start_daemon(args, serve)
        if args.command == "start":
            if args.foreground or engine_factory is not None:
                return serve(args, engine_factory)
            return start_detached(args)
        return {"stop": _stop, "status": _status, "logs": _logs}[args.command](args)
    except ClientError as e:
        print(f"flashmoe-daemon: {e}", file=sys.stderr)
        return 1
    except FlashMoeError as e:
        print(f"flashmoe-daemon: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
