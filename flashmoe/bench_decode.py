"""``flashmoe bench decode``: streamed decode against mlx-lm with the whole model in memory.

Both sides run the same prompt (random token ids, seeded), the same dtype and greedy sampling, in
one invocation. With ``--cgroup-cap SIZE`` (root, cgroup v1 or v2) the streamed side runs in a
child process inside a fresh memory cgroup that caps its whole process tree, page cache and shared
memory included, so experts really come from the disk; the baseline then runs uncapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flashmoe.configs import format_size, parse_size
from flashmoe.diskstats import DeviceReads, amplification
from flashmoe.errors import FlashMoeError

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    # Stay clear of the special tokens at the top of the vocabulary.
    return np.random.RandomState(seed).randint(0, max(2, vocab - 64), size=n).tolist()


def _vocab(config: dict) -> int:
    return int(config.get("text_config", config)["vocab_size"])


def busy_ms(path: str) -> int | None:
    """Milliseconds the block device holding ``path`` has had I/O in flight since boot (Linux's
    io_ticks, counting every process's I/O on it), or None where there is no such counter (a
    tmpfs, an overlay, macOS)."""
    try:
        dev = os.stat(path).st_dev
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            return int(f.read().split()[9])
    except (OSError, IndexError, ValueError):
        return None


def streamed_side(a: dict) -> dict:
    """Run the streamed model: one stream, then each concurrent-stream count."""
    import mlx.core as mx

    from flashmoe.bench_probe import Probe
    from flashmoe.orchestrator.engine import Engine, GenRequest

    t0 = time.perf_counter()
    eng = Engine(a["model"], memory_budget=a["budget"], workers=a.get("workers"),
                 io_threads=a.get("threads"), dtype=a["dtype"],
                 experts_per_token=a.get("experts_per_token"), max_batch=max(a["streams"]),
                 max_context=a.get("max_context"))
    out = {"load_s": time.perf_counter() - t0}
    try:
        vocab = _vocab(eng.store.config)
        prompt = prompt_ids(vocab, a["prompt_tokens"])
        req = GenRequest(id="bench", prompt=prompt, max_tokens=a["tokens"])
        st = eng.cache.stats
        probe = Probe(profile=a.get("profile", False))
        probe.install(eng.banks)
        layer0 = eng.store.moe_layers[0]
        records = eng.store.extents(layer0, 0)[0].path  # where the expert records live
        replay = _replay(eng, a["guess_trace"]) if a.get("guess_trace") else None
        after_first = None
        for chunk in eng.generate(req):
            if after_first is None:
                after_first = eng.snapshot()
                probe.trace = [] if a.get("trace_out") or replay else None
                if replay is not None:  # recorded from this same point: the calls line up
                    replay.trace = probe.trace
                    probe.replay = replay
                parts0 = (probe.route_s, st.io_wait_s - st.copy_s, st.copy_s, probe.expert_s)
                guesses0 = (st.prefetched, st.prefetch_used)
                busy0 = busy_ms(records)
                device = DeviceReads(records)
                t_first = time.perf_counter()
            stats = chunk.stats or {}
        decode_s = time.perf_counter() - t_first
        busy1 = busy_ms(records)
        device_bytes = device.since()
        if a.get("trace_out"):
            with open(a["trace_out"], "w") as f:
                for layer, experts in probe.trace:
                    f.write(json.dumps({"layer": layer, "experts": experts}) + "\n")
        probe.trace = probe.replay = None  # the one stream's record ends: streams guess as usual
        parts1 = (probe.route_s, st.io_wait_s - st.copy_s, st.copy_s, probe.expert_s)
        decoded = max(stats["generation_tokens"] - 1, 1)
        decode_bytes = eng.cache.stats.bytes_read - after_first[2]
        # Guessed records that no layer asked for were read for nothing: the bytes a token
        # needed are the rest, and the I/O limit is computed from those.
        sent, used = st.prefetched - guesses0[0], st.prefetch_used - guesses0[1]
        wasted = max(0, sent - used) * eng.store.layout.nbytes
        out.update(
            decode_tokens_per_s=stats["decode_tokens_per_s"],
            prefill_tokens_per_s=stats["prefill_tokens_per_s"],
            hit_rate=stats["expert_hit_rate"],
            decode_hit_rate=_hit(eng.snapshot(), after_first),
            bytes_per_token=decode_bytes / decoded,
            needed_bytes_per_token=max(0, decode_bytes - wasted) / decoded,
            guesses_per_token=sent / decoded,
            guesses_used_per_token=used / decoded,
            prefetch_settings={k: getattr(eng.settings, f"prefetch_{k}")
                               for k in ("top", "depth", "threads")},
            # share of the decode time the disk had a read in flight (None: no counter)
            disk_busy_fraction=(busy1 - busy0) / 1e3 / decode_s
            if busy0 is not None and busy1 is not None else None,
            prefill_bytes=after_first[2],
            # what the disk read while decoding (every process on it), per record byte asked for
            device_bytes_read=device_bytes,
            read_amplification=amplification(device_bytes, decode_bytes),
            io_wait_s=stats["io_wait_s"],
            copy_s=stats["copy_s"],
            pool_bytes=stats["pool_bytes"],
            dense_bytes=stats["dense_bytes"],
            peak_rss_bytes=stats["peak_rss_bytes"],
            # MLX's own peak allocation (on a GPU: device memory, which no cgroup counts)
            mlx_peak_bytes=mx.get_peak_memory(),
            profile=_per_token(parts0, parts1, decode_s, decoded) if probe.profile else None,
        )
        out["aggregate"] = {}
        for n in a["streams"]:
            if n > 1:
                out["aggregate"][str(n)] = _concurrent(eng, n, vocab, a)
        out["aggregate"]["1"] = out["decode_tokens_per_s"]
    finally:
        eng.close()
    return out


def _replay(eng, path: str):
    """The banks' always-right guesses for ``--guess-trace`` (armed after the first token)."""
    from flashmoe.bench_io import read_trace
    from flashmoe.bench_probe import RoutingReplay

    if not any(bank.ahead for bank in eng.banks):
        raise FlashMoeError("--guess-trace replaces the guesses of prefetch, which is off: set "
                            "prefetch = \"on\" (FLASHMOE_PREFETCH=on)")
    return RoutingReplay(read_trace(path), [])


def _per_token(before: tuple, after: tuple, wall: float, tokens: int) -> dict:
    names = ("dense_and_routing", "io_wait", "copy_in", "expert_compute")
    out = {n: (b - a) / tokens for n, a, b in zip(names, before, after, strict=True)}
    out["other"] = wall / tokens - sum(out.values())
    out["total"] = wall / tokens
    return out


def _hit(now: tuple, then: tuple) -> float:
    h, m = now[0] - then[0], now[1] - then[1]
    return h / (h + m) if h + m else 1.0


def _concurrent(eng, n: int, vocab: int, a: dict) -> float:
    """Aggregate decode tokens/s of ``n`` requests stepping together on the engine thread."""
    import threading

    from flashmoe.orchestrator.engine import GenRequest

    eng.start()
    done = threading.Event()
    firsts: dict[str, float] = {}
    times: list[float] = []  # when each generated token arrived
    ends: dict[str, float] = {}

    def on_chunk(c):
        now = time.perf_counter()
        if c.token_ids:
            firsts.setdefault(c.id, now)
            times.extend([now] * len(c.token_ids))
        if c.finish_reason:
            ends[c.id] = now
            if len(ends) == n:
                done.set()

    for i in range(n):
        eng.submit(GenRequest(id=f"s{n}-{i}", prompt=prompt_ids(vocab, a["prompt_tokens"], i + 1),
                              max_tokens=a["tokens"]), on_chunk)
    if not done.wait(timeout=3600):
        raise FlashMoeError(f"{n} concurrent streams did not finish within an hour")
    return _rate_once_all_started(firsts, times, max(ends.values()))


def _rate_once_all_started(firsts: dict, times: list[float], end: float) -> float:
    """Tokens/s from the moment every stream has its first token (all decode together from
    there), counting only the tokens that arrived after it."""
    start = max(firsts.values())
    return sum(1 for t in times if t > start) / max(end - start, 1e-9)


def baseline_side(a: dict) -> dict:
    """mlx-lm with the whole model in memory: decode and prefill tokens/s."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from flashmoe.orchestrator.engine import _DTYPES, resolve_dtype

    path = a.get("baseline_model") or a["model"]
    from flashmoe.store import open_store

    if open_store(path).kind == "packed":
        raise FlashMoeError(f"{path} is a packed store, which mlx-lm cannot load: give the "
                            "source checkpoint with --baseline-model")
    t0 = time.perf_counter()
    model, tok, config = load(path, lazy=True, return_config=True,
                              model_config=_k_override(config_of(path), a))
    dtype = resolve_dtype(a["dtype"], config) if a["dtype"] == "auto" else _DTYPES[a["dtype"]]
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    prompt = mx.array(prompt_ids(_vocab(config), a["prompt_tokens"]))
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _token, _ in generate_step(prompt, model, max_tokens=a["tokens"]):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
    t_end = time.perf_counter()
    out = {"load_s": load_s,
           "decode_tokens_per_s": (n - 1) / max(t_end - t_first, 1e-9),
           "prefill_tokens_per_s": a["prompt_tokens"] / max(t_first - t0, 1e-9)}
    out["aggregate"] = {"1": out["decode_tokens_per_s"]}
    for n_streams in a["streams"]:
        if n_streams > 1:
            out["aggregate"][str(n_streams)] = _batched_in_memory(model, _vocab(config),
                                                                  n_streams, a)
    return out


def _batched_in_memory(model, vocab: int, n: int, a: dict) -> float:
    """Aggregate decode tokens/s of ``n`` streams in mlx-lm's own ``BatchGenerator`` (one
    thread, the batch in one model call), counted as ``_concurrent`` counts ours."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=n, prefill_batch_size=n)
    gen.insert([prompt_ids(vocab, a["prompt_tokens"], i + 1) for i in range(n)],
               max_tokens=[a["tokens"]] * n)
    firsts: dict[int, float] = {}
    times: list[float] = []
    finished = 0
    while finished < n:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            firsts.setdefault(r.uid, now)
            times.append(now)
            finished += r.finish_reason is not None
    return _rate_once_all_started(firsts, times, times[-1])


def config_of(model: str) -> dict:
    from flashmoe.store import open_store

    return open_store(model).config


def _k_override(config: dict, a: dict) -> dict | None:
    from flashmoe.orchestrator.engine import _config_override

    return _config_override(config, a.get("experts_per_token"))


class MemoryCgroup:
    """A fresh memory cgroup capped at ``cap`` bytes (v1: ``memory.limit_in_bytes``; v2, the
    unified hierarchy: ``memory.max``), its peak use, and its removal."""

    def __init__(self, cap: int):
        if os.geteuid() != 0:
            raise FlashMoeError("--cgroup-cap needs root")
        name = f"flashmoe-bench-{os.getpid()}"
        if CGROUP_V1.is_dir():
            self.path, self.limit, self.peak_file = CGROUP_V1 / name, "memory.limit_in_bytes", \
                "memory.max_usage_in_bytes"
        elif "memory" in _read(CGROUP_V2 / "cgroup.subtree_control").split():
            self.path, self.limit, self.peak_file = CGROUP_V2 / name, "memory.max", "memory.peak"
        else:
            raise FlashMoeError("--cgroup-cap needs a memory cgroup: v1 at /sys/fs/cgroup/memory "
                                "or v2 with the memory controller enabled at /sys/fs/cgroup")
        self.path.mkdir(exist_ok=True)
        (self.path / self.limit).write_text(str(cap))

    def enter(self) -> None:  # runs in the child before it executes
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        text = _read(self.path / self.peak_file)
        return int(text) if text.strip().isdigit() else None

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _child(side: str, a: dict, cap: int | None) -> dict:
    """Run one side in a child process (inside a fresh memory cgroup when ``cap`` is set)."""
    cg = MemoryCgroup(cap) if cap is not None else None
    try:
        with subprocess.Popen([sys.executable, "-m", "flashmoe.bench_decode", side, json.dumps(a)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=cg.enter if cg else None) as p:
            try:
                stdout, stderr = p.communicate()
            except BaseException:  # SIGTERM/Ctrl-C of the bench: the child cleans up too
                p.terminate()
                p.wait(60)
                raise
        peak = cg.peak() if cg else None
    finally:
        if cg is not None:
            cg.remove()
    if p.returncode != 0:
        raise FlashMoeError(f"{side} side failed (exit {p.returncode}): "
                            f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    out = json.loads(stdout.strip().splitlines()[-1])
    if cap is not None:
        out["cgroup_cap_bytes"] = cap
        out["cgroup_peak_bytes"] = peak
    return out


# How the disk is read to find its throughput: (name, records in flight, cut into pieces).
# The best of them is the disk's figure: one H200 machine's disk gave 1.40 GB/s with 32 whole
# records in flight, yet decode read it at 1.88 GB/s while busy, in ~300 KB requests.
DISK_WAYS = (("whole x32", None, False), ("pieces x32", None, True), ("pieces x8", 8, True))


def disk_gbps(model: str, seconds: float = 2.0) -> dict[str, float]:
    """The loaders' O_DIRECT random-read throughput on this store (cold), GB/s, each of
    ``DISK_WAYS``; the best of them is the disk's throughput."""
    from flashmoe.bench_io import _keys, measure
    from flashmoe.store import open_store

    store = open_store(model)
    out = {}
    for name, records, pieces in DISK_WAYS:
        r = measure(store, workers=2, threads=8, direct=True, seconds=seconds,
                    keys=_keys(store, None), cold=True, records=records, pieces=pieces)
        out[name] = r["gb_per_s"]
    return out


def run_decode_bench(args) -> int:
    streams = sorted({1, args.streams} | ({2, 4} if args.streams >= 4 else set()))
    a = dict(model=args.model, budget=args.memory_budget or "4GiB", workers=args.workers,
             threads=args.io_threads, dtype=args.dtype or "auto", tokens=args.tokens,
             prompt_tokens=args.prompt_tokens, streams=streams,
             experts_per_token=args.experts_per_token, profile=args.profile,
             max_context=args.max_context,
             baseline_model=args.baseline_model,
             trace_out=os.path.abspath(args.trace_out) if args.trace_out else None,
             guess_trace=os.path.abspath(args.guess_trace) if args.guess_trace else None)
    cap = parse_size(args.cgroup_cap) if args.cgroup_cap else None
    # The disk is measured before and after the streamed side (a shared disk drifts: 1.31 and
    # 1.52 GB/s were seen minutes apart on one machine); the floor uses the mean of the best.
    ways = [disk_gbps(args.model, args.disk_seconds)]
    s = _child("streamed", a, cap) if cap else streamed_side(a)
    ways.append(disk_gbps(args.model, args.disk_seconds))
    disk = [max(w.values()) for w in ways]
    gbps = sum(disk) / len(disk)
    result = {
        "model": args.model,
        # guesses replayed from a recorded run: a ceiling for prefetch, not a real run
        "guess_trace": a["guess_trace"],
        "memory_budget": parse_size(a["budget"]),
        "dtype": a["dtype"],
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "prefill_tokens_per_s": s["prefill_tokens_per_s"],
        "hit_rate": s["hit_rate"],
        "decode_hit_rate": s["decode_hit_rate"],
        "bytes_per_token": s["bytes_per_token"],
        "needed_bytes_per_token": s["needed_bytes_per_token"],
        "guesses_per_token": s["guesses_per_token"],
        "guesses_used_per_token": s["guesses_used_per_token"],
        "disk_busy_fraction": s["disk_busy_fraction"],
        "device_bytes_read": s["device_bytes_read"],
        "read_amplification": s["read_amplification"],
        "disk_gb_per_s": gbps,
        "disk_gb_per_s_before_after": disk,
        "disk_gb_per_s_by_way": ways,
        # the decode speed if the disk read only what tokens needed, never idle
        "io_floor_tokens_per_s": gbps * 1e9 / s["needed_bytes_per_token"]
        if s["needed_bytes_per_token"] else None,
        "aggregate_tokens_per_s": s["aggregate"],
        "streamed": s,
    }
    if args.baseline:
        b = _child("baseline", a, None)
        result.update(baseline_decode_tokens_per_s=b["decode_tokens_per_s"],
                      baseline_aggregate_tokens_per_s=b["aggregate"],
                      baseline_prefill_tokens_per_s=b["prefill_tokens_per_s"],
                      ratio=s["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                      prefill_ratio=s["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                      baseline=b)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"streamed: decode {result['decode_tokens_per_s']:.3f} tok/s, prefill "
          f"{result['prefill_tokens_per_s']:.2f} tok/s, hit rate {result['hit_rate']:.1%} "
          f"(decode {result['decode_hit_rate']:.1%}), {format_size(int(s['bytes_per_token']))}"
          f"/token read ({format_size(int(s['needed_bytes_per_token']))} needed), pool "
          f"{format_size(s['pool_bytes'])}, peak RSS {format_size(s['peak_rss_bytes'])}")
    if s["guesses_per_token"]:
        print(f"prefetch: {s['guesses_per_token']:.1f} guessed records read per token, "
              f"{s['guesses_used_per_token']:.1f} of them used")
    if a["guess_trace"]:
        print(f"guesses replayed from {args.guess_trace}: every guess right, a ceiling for "
              "prefetch, not a real run (prefetch " + ", ".join(
                  f"{k} {v}" for k, v in s["prefetch_settings"].items()) + ")")
    if cap:
        peak = s["cgroup_peak_bytes"]
        print(f"cgroup cap {format_size(cap)}, peak use "
              f"{format_size(peak) if peak is not None else 'not reported by this kernel'}")
    floor = result["io_floor_tokens_per_s"] or 0
    print("disk GB/s by way (before / after): " + ", ".join(
        f"{k} {ways[0][k]:.2f} / {ways[1][k]:.2f}" for k in ways[0]))
    print(f"disk {gbps:.2f} GB/s ({disk[0]:.2f} before, {disk[1]:.2f} after) -> I/O floor "
          f"{floor:.2f} tok/s (needed bytes, disk never idle); streamed decode at "
          f"{result['decode_tokens_per_s'] / floor if floor else 0:.2f} of it")
    if s["disk_busy_fraction"] is not None:
        print(f"the disk had a read in flight {s['disk_busy_fraction']:.0%} of the decode time")
    if s["read_amplification"] is not None:
        print(f"the disk read {s['read_amplification']:.2f}x the record bytes decode asked for")
    print("aggregate decode tok/s by streams: " + ", ".join(
        f"{k}: {v:.3f}" for k, v in sorted(s["aggregate"].items(), key=lambda kv: int(kv[0]))))
    if args.baseline:
        print(f"in memory (mlx-lm): decode {result['baseline_decode_tokens_per_s']:.3f} tok/s, "
              f"prefill {result['baseline_prefill_tokens_per_s']:.2f} tok/s; ratio "
              f"{result['ratio']:.3f} decode, {result['prefill_ratio']:.3f} prefill")
        print("in memory aggregate decode tok/s by streams: " + ", ".join(
            f"{k}: {v:.3f}" for k, v in sorted(b["aggregate"].items(), key=lambda kv: int(kv[0]))))
    if s.get("profile"):
        print("time per token (s): " + ", ".join(f"{k} {v:.4f}" for k, v in s["profile"].items()))
    return 0


if __name__ == "__main__":
    from flashmoe.signals import unwind_on_signals

    side, payload = sys.argv[1], json.loads(sys.argv[2])
    with unwind_on_signals():  # SIGTERM closes the engine: its shared memory and workers go
        result = streamed_side(payload) if side == "streamed" else baseline_side(payload)
    print(json.dumps(result))
