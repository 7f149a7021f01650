"""``flashmoe bench io``: loader workers + shared-memory pool against the disk.

Draws expert records at random over (MoE layer, expert) of a store, or replays a routing trace
(JSON lines ``{"layer": L, "experts": [...]}``), keeps ``QUEUE_PER_THREAD`` requests per I/O
thread in flight so the workers never starve, and reports throughput (GB/s, 10**9 bytes) and
per-record latency (submit -> completion as the coordinator sees it, queueing included).
``--sweep`` repeats this over workers x threads and can draw the curves (``--plot``).
``--latency`` instead times one record at a time, through the loader workers, through the
coordinator's own loader threads, and by bare threads of one process reading the same pieces: the
differences are what each loader itself adds to the wait of a decode layer that missed one expert.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashmoe.diskstats import DeviceReads, amplification
from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.loaders import LoaderPool
from flashmoe.shm.pool import ExpertPool, cleanup_stale
from flashmoe.store import open_store
from flashmoe.workers.loader import DEFAULT_CHUNK

QUEUE_PER_THREAD = 2
SWEEP = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (1, 8), (2, 4), (1, 16), (2, 8), (4, 4)]


def drop_page_cache() -> bool:
    """Write back and drop the page cache (Linux, root); False where that is not possible."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_trace(path: str) -> list[tuple[int, list[int]]]:
    """A routing trace (``--trace-out``'s JSON lines) as ``(layer, experts)`` per bank call."""
    calls = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FlashMoeError(f"cannot read routing trace {path}: {e.strerror or e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                calls.append((int(rec["layer"]), [int(e) for e in rec["experts"]]))
            except (ValueError, KeyError, TypeError) as e:
                raise FlashMoeError(f"{path}:{n}: not a routing record ({e})") from None
    if not calls:
        raise FlashMoeError(f"{path}: no routing records")
    return calls


def _keys(store: Any, trace: str | None, seed: int = 0) -> Iterator[tuple[int, int]]:
    if trace:
        seq = [(layer, e) for layer, experts in read_trace(trace) for e in experts]
        while True:
            yield from seq
    rng = random.Random(seed)
    layers = list(store.moe_layers)
    while True:
        yield rng.choice(layers), rng.randrange(store.num_experts)


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(
    store: Any,
    workers: int,
    threads: int,
    direct: bool,
    seconds: float,
    keys: Iterator[tuple[int, int]],
    cold: bool = False,
    chunk_bytes: int | None = None,
    verify: bool = True,
    records: int | None = None,
    pieces: bool = False,
) -> dict:
    """One point: GB/s and latency for ``workers`` x ``threads`` over ``seconds``.

    ``verify=False`` skips the crc32 of packed records: the bare I/O path, as fio measures it.
    ``records``: loads kept in flight (None: ``QUEUE_PER_THREAD`` per thread). ``pieces``: every
    record is cut into ``chunk_bytes`` pieces (as guesses are), where a busy worker would read
    whole extents: some disks are faster with more, smaller requests in flight.
    """
    depth = records or QUEUE_PER_THREAD * workers * threads
    dropped = drop_page_cache() if cold else False
    with ExpertPool.create(depth, store.layout.nbytes) as pool:
        lp = LoaderPool(
            pool,
            workers=workers,
            threads=threads,
            io_mode="direct" if direct else "buffered",
            chunk_bytes=chunk_bytes,
            guess_threads=threads if pieces else None,
        )
        try:
            sent: dict[int, float] = {}
            lat: list[float] = []
            nbytes = loads = 0
            failures: list[str] = []
            requested = [0]  # extent bytes asked for (record bytes without the slot's padding)

            def submit(slot: int) -> None:
                layer, e = next(keys)
                crc = store.checksum(layer, e) if verify else None
                extents = store.extents(layer, e)
                requested[0] += sum(x.length for x in extents)
                rid = lp.submit(slot, extents, crc, urgent=not pieces)
                sent[rid] = time.perf_counter()

            device = DeviceReads(store.extents(store.moe_layers[0], 0)[0].path)
            t0 = time.perf_counter()
            end = t0 + seconds
            for slot in range(depth):
                submit(slot)
            while sent:
                for c in lp.poll(1.0):
                    now = time.perf_counter()
                    lat.append(now - sent.pop(c.req))
                    if c.ok:
                        nbytes += c.nbytes
                        loads += 1
                    elif len(failures) < 5:
                        failures.append(c.error or "?")
                    if now < end:
                        submit(c.slot)
            elapsed = time.perf_counter() - t0
            device_bytes = device.since()
        finally:
            lp.close()
    if failures:
        raise FlashMoeError(f"{len(failures)}+ loads failed, first: {failures[0]}")
    return dict(
        workers=workers,
        threads=threads,
        direct=direct,
        verify=verify,
        gb_per_s=nbytes / elapsed / 1e9,
        p50_ms=_percentile(lat, 0.5) * 1e3,
        p99_ms=_percentile(lat, 0.99) * 1e3,
        loads=loads,
        bytes=nbytes,
        seconds=elapsed,
        record_bytes=store.layout.nbytes,
        queue_depth=depth,
        pieces=pieces,
        cache_dropped=dropped,
        requested_bytes=requested[0],
        device_bytes_read=device_bytes,  # by every process on that disk (None: no counter)
        read_amplification=amplification(device_bytes, requested[0]),
    )


def one_at_a_time(
    store: Any,
    workers: int,
    threads: int,
    direct: bool,
    keys: Iterator[tuple[int, int]],
    records: int = 60,
    cold: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK,
) -> dict:
    """Latency of one record with nothing else in flight (what a decode layer waiting for its
    one missed expert sees): through the loader workers, submit -> completion with the
    checksum checked, and read by bare threads of this process in the same pieces, each piece's
    crc32 taken as the loader does (the record is checked against the store after the clock
    stops). Records alternate between the two, so both meet the same disk."""
    import mmap
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    from flashmoe.orchestrator.loaders import extent_list
    from flashmoe.store import RECORD_ALIGN
    from flashmoe.workers.crc import crc_of_pieces
    from flashmoe.workers.loader import PieceReader, chunk_for, plan

    dropped = drop_page_cache() if cold else False
    size = -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    buf = mmap.mmap(-1, size)  # page-aligned, as a pool slot is
    view = memoryview(buf)
    reader = PieceReader()  # the loader's own reads, without its threads and messages
    pool_threads = ThreadPoolExecutor(threads)

    def read(p) -> int:
        reader.read(view, p)
        return zlib.crc32(view[p.dest:p.dest + p.need])

    def through(loader) -> float:
        layer, e = next(keys)
        t0 = time.perf_counter()
        loader.submit(0, store.extents(layer, e), store.checksum(layer, e))
        done: list = []
        while not done:
            done = loader.poll(10.0)
        took = time.perf_counter() - t0
        if not done[0].ok:
            raise FlashMoeError(f"load failed: {done[0].error}")
        return took

    loader_s: list[float] = []
    bare_s: list[float] = []
    io_mode = "direct" if direct else "buffered"
    try:
        with ExpertPool.create(1, store.layout.nbytes) as pool:
            with LoaderPool(pool, workers=workers, threads=threads, io_mode=io_mode,
                            chunk_bytes=chunk_bytes) as lp:
                for _ in range(records):
                    loader_s.append(through(lp))
                    layer, e = next(keys)
                    ext = extent_list(store.extents(layer, e))
                    step = chunk_for(sum(x[2] for x in ext), threads, chunk_bytes)  # all idle
                    pieces = plan(ext, size, direct, step)
                    t0 = time.perf_counter()
                    crcs = list(pool_threads.map(read, pieces))
                    bare_s.append(time.perf_counter() - t0)
                    want = store.checksum(layer, e)
                    if want is not None:  # the bare reads must have read the record too
                        end = max(x[3] + x[2] for x in ext)
                        got = crc_of_pieces([(p.dest, p.need, c) for p, c in
                                             zip(pieces, crcs, strict=True) if p.need], end)
                        if got is None:
                            got = zlib.crc32(view[:end])
                        if got != want:
                            raise FlashMoeError(f"bare read of layer {layer} expert {e}: crc32 "
                                                f"{got:08x}, the store says {want:08x}")
    finally:
        pool_threads.shutdown()
        reader.close()
        view.release()
        buf.close()
    loader_ms, bare_ms = _percentile(loader_s, 0.5) * 1e3, _percentile(bare_s, 0.5) * 1e3
    return dict(workers=workers, threads=threads, direct=direct, records=records,
                record_bytes=store.layout.nbytes, loader_p50_ms=loader_ms,
                bare_p50_ms=bare_ms, overhead_ms=loader_ms - bare_ms, cache_dropped=dropped)


def _plot(points: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for w in sorted({p["workers"] for p in points}):
        pts = sorted(
            (p["workers"] * p["threads"], p["gb_per_s"]) for p in points if p["workers"] == w
        )
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{w} worker(s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("total I/O threads (workers x threads)")
    ax.set_ylabel("GB/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_io_bench(args: Any) -> int:
    """Entry point of ``flashmoe bench io``; returns the exit code."""
    store = open_store(args.model)
    cleanup_stale()
    direct = not args.buffered
    if args.cold and not direct:
        if not drop_page_cache():
            print(
                "bench io: cannot drop the page cache (not root): using O_DIRECT", file=sys.stderr
            )
            direct = True
    keys = _keys(store, args.trace)
    if getattr(args, "latency", False):
        r = one_at_a_time(store, args.workers, args.threads, direct, keys, cold=args.cold)
        if args.json:
            print(json.dumps(dict(r, model=str(store.path), kind=store.kind)))
        else:
            print(f"one record at a time ({r['record_bytes']} B, {r['threads']} threads, "
                  f"{'direct' if direct else 'buffered'}): p50 through loader workers "
                  f"{r['loader_p50_ms']:.2f} ms, bare threads {r['bare_p50_ms']:.2f} ms; "
                  f"the loader's own share {r['overhead_ms']:.2f} ms")
        store.close()
        return 0
    configs = SWEEP if args.sweep else [(args.workers, args.threads)]
    points = []
    for w, t in configs:
        p = measure(store, w, t, direct, args.seconds, keys, cold=args.cold)
        points.append(p)
        if not args.json:
            print(
                f"workers {w:2d} threads {t:2d} {'direct' if direct else 'buffered':8s} "
                f"{p['gb_per_s']:6.3f} GB/s  p50 {p['p50_ms']:7.2f} ms  p99 {p['p99_ms']:7.2f} ms"
                f"  ({p['loads']} loads of {p['record_bytes']} B)"
                + (f"  disk read {p['read_amplification']:.2f}x the records"
                   if p["read_amplification"] is not None else ""),
                flush=True,
            )
    best = max(points, key=lambda p: p["gb_per_s"])
    if args.plot:
        _plot(
            points, args.plot, f"{store.path.name}: {store.kind}, {best['record_bytes']} B records"
        )
    if args.json:
        out = dict(best, model=str(store.path), kind=store.kind)
        if args.sweep:
            out["points"] = points
        print(json.dumps(out))
    store.close()
    return 0
