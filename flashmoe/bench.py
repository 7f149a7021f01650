"""``flashmoe bench``: dispatch to the benchmark that was asked for."""

from __future__ import annotations


def cmd_bench(args) -> int:
    if args.bench == "io":
        from flashmoe.bench_io import run_io_bench

        return run_io_bench(args)
    from flashmoe.bench_decode import run_decode_bench

    return run_decode_bench(args)
