"""``flashmoe run``: load, generate once in the foreground, stop everything, clean up."""

from __future__ import annotations

import json
import os
import sys

from flashmoe.configs import format_size
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.progress import loading
from flashmoe.signals import Terminated


def cmd_run(args) -> int:
    req = GenRequest(
        id="run",
        prompt=args.prompt,
        messages=[{"role": "user", "content": args.chat}] if args.chat is not None else None,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
    )
    stage = None
    if getattr(args, "distributed", False):
        from flashmoe.orchestrator.distributed import join, lost_peer, lost_peer_line

        stage = join(args.split)
    elif getattr(args, "split", None):
        print("error: --split needs --distributed", file=sys.stderr)
        return 2
    try:
        return _run(args, req, stage)
    except BaseException as e:
        if stage is None:
            raise
        stage.broken = True
        if isinstance(e, Terminated):  # mlx.launch stops every rank when one fails
            print(f"error: rank {stage.rank} ({stage.host}): terminated (SIGTERM; mlx.launch "
                  f"sends it when another rank fails)", file=sys.stderr)
        if not lost_peer(e):
            raise
        print(lost_peer_line(stage, e), file=sys.stderr)
        return 2
    finally:
        if stage is not None:
            stage.leave()


def _run(args, req: GenRequest, stage) -> int:
    with loading(args.model):
        engine = Engine(os.path.abspath(args.model), memory_budget=args.memory_budget,
                        workers=args.workers, io_threads=args.io_threads, dtype=args.dtype,
                        experts_per_token=args.experts_per_token, max_context=args.max_context,
                        kv_bits=args.kv_bits, stage=stage)
    if stage is not None and stage.rank != 0:
        with engine:
            stage.follow(engine)
        return 0
    with engine:
        try:
            engine.validate(req)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        text, ids, stats = [], [], {}
        for chunk in engine.generate(req):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            if not args.json:
                print(chunk.text, end="", flush=True)
            if chunk.stats:
                stats = {**chunk.stats, "finish_reason": chunk.finish_reason}
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": ids, "stats": stats}))
        return 0
    print()
    print(
        f"-- {stats['prompt_tokens']} prompt tokens at {stats['prefill_tokens_per_s']:.1f} tok/s, "
        f"{stats['generation_tokens']} generated at {stats['decode_tokens_per_s']:.2f} tok/s "
        f"({stats['finish_reason']})\n"
        f"-- experts: hit rate {stats['expert_hit_rate']:.1%}, read "
        f"{format_size(stats['bytes_read'])}, pool {format_size(stats['pool_bytes'])} "
        f"({stats['cache_slots']} cache + {stats['staging_slots']} staging slots), dense "
        f"{format_size(stats['dense_bytes'])}, peak RSS {format_size(stats['peak_rss_bytes'])}, "
        f"dtype {stats['dtype']}, zero-copy {stats['zero_copy']}, context limit "
        f"{stats['max_context']} tokens",
        file=sys.stderr,
    )
    return 0
