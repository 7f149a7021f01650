"""``flashmoe-daemon status`` for a person: the daemon's status as one table."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from flashmoe.configs import format_size


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def _size(st: dict, key: str) -> str:
    v = st.get(key)
    return format_size(int(v)) if isinstance(v, (int, float)) else "-"


def rows(st: dict) -> list[tuple[str, str]]:
    """(what, value) lines of the table, from the status that ``--json`` prints."""
    workers = st.get("workers") or []
    states = Counter(str(w.get("state")) for w in workers if isinstance(w, dict))
    hit = st.get("expert_hit_rate")
    tps = st.get("decode_tokens_per_s")
    slots = f"{st.get('cache_slots_ready', '-')} of {st.get('cache_slots', '-')} slots filled"
    out = [
        ("model", f"{st.get('model')} ({st.get('store_kind', '?')}, {st.get('dtype', '?')})"),
        ("memory budget", f"{_size(st, 'budget_bytes')}: expert pool {_size(st, 'pool_bytes')} "
                          f"({slots}), dense weights {_size(st, 'dense_bytes')}, KV cache "
                          f"{_size(st, 'kv_bytes')} ({_size(st, 'kv_bytes_in_flight')} held by "
                          "the requests in flight)"),
        ("context limit", f"{st['max_context']:,} tokens" if st.get("max_context") else "-"),
        ("prefix cache", f"{st['prefix_cache_entries']} entries, "
                         f"{st.get('prefix_cache_hits', 0)} hits, "
                         f"{st.get('prefix_tokens_reused', 0)} tokens reused"
                         if "prefix_cache_entries" in st else "off"),
        ("expert hit rate", f"{hit:.1%}" if isinstance(hit, (int, float)) else "-"),
        ("decode", f"{tps:.2f} tok/s (last request)" if isinstance(tps, (int, float)) else "-"),
        ("requests", f"{st.get('requests_served', 0)} served, {st.get('requests_running', 0)} "
                     f"running, {st.get('requests_cancelled', 0)} cancelled, "
                     f"{st.get('requests_failed', 0)} failed, {st.get('queued', 0)} queued"),
        ("tokens generated", str(st.get("tokens_generated", 0))),
        ("workers", f"{len(workers)}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
                    + f"; {st.get('worker_restarts', 0)} restarts"),
        ("lanes", str(st.get("lanes", "-"))),
        ("uptime", _duration(float(st.get("uptime_s") or 0))),
        ("pid", str(st.get("pid"))),
        ("socket", str(st.get("socket", "-"))),
    ]  # fmt: skip
    if st.get("http"):
        out.append(("http", str(st["http"])))
    for r in st.get("ranks") or ():  # a pipeline across processes (start --distributed)
        seen = r["expert_hits"] + r["expert_misses"]
        first, end = r["layers"]
        out.append((f"rank {r['rank']}", f"{r['host']}, layers {first}..{end - 1}, budget "
                    f"{_size(r, 'budget_bytes')}, hit rate "
                    f"{r['expert_hits'] / seen if seen else 0:.1%}, read {_size(r, 'bytes_read')}"))
    return out


def print_status(st: dict, console: Console | None = None) -> None:
    table = Table(title="flashmoe-daemon", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for what, value in rows(st):
        table.add_row(what, value)
    (console or Console()).print(table)
