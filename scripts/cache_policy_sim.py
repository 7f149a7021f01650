"""Replay a routing trace (``flashmoe bench decode --trace-out``) against cache policies.

Prints the hit rate of each policy at each capacity, so a policy can be judged on real routing
before it goes into the slot table. Usage: ``python scripts/cache_policy_sim.py TRACE SLOTS...``
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict, defaultdict


def global_lru(trace, cap):
    lru, hits = OrderedDict(), 0
    for layer, experts in trace:
        for e in experts:
            key = (layer, e)
            if key in lru:
                hits += 1
                lru.move_to_end(key)
            else:
                if len(lru) >= cap:
                    lru.popitem(last=False)
                lru[key] = None
    return hits


def per_layer_lru(trace, cap):
    layers = sorted({layer for layer, _ in trace})
    quota = max(1, cap // len(layers))
    caches, hits = defaultdict(OrderedDict), 0
    for layer, experts in trace:
        c = caches[layer]
        for e in experts:
            if e in c:
                hits += 1
                c.move_to_end(e)
            else:
                if len(c) >= quota:
                    c.popitem(last=False)
                c[e] = None
    return hits


def lfu_decay(trace, cap, decay=0.98):
    """Evict the lowest exponentially decayed use count (ties: least recent)."""
    score, last, resident, hits, t = defaultdict(float), {}, set(), 0, 0
    for layer, experts in trace:
        t += 1
        for e in experts:
            key = (layer, e)
            score[key] = score[key] * decay ** (t - last.get(key, t)) + 1.0
            last[key] = t
            if key in resident:
                hits += 1
                continue
            if len(resident) >= cap:
                victim = min(resident, key=lambda k: (score[k] * decay ** (t - last[k]), last[k]))
                resident.remove(victim)
            resident.add(key)
    return hits


POLICIES = {"global-lru": global_lru, "per-layer-lru": per_layer_lru, "lfu-decay": lfu_decay}


def main() -> None:
    trace = [(d["layer"], d["experts"]) for d in map(json.loads, open(sys.argv[1]))]
    total = sum(len(e) for _, e in trace)
    print(f"{len(trace)} bank calls, {total} expert uses")
    for cap in map(int, sys.argv[2:]):
        row = {name: f(trace, cap) / total for name, f in POLICIES.items()}
        print(f"slots {cap:6d}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
