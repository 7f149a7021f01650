"""Routing statistics of a trained MoE beside a random one of the same shape.

Runs the model (mlx-lm, float32) over held-out text and records, for every MoE layer and token,
the layer's input and the experts its router chose. From that, per model:

- guess recall, 1-4 layers ahead: apply layer L+d's router to layer L's input (as the streamed
  bank's prefetch guesses do) and take its best ``m`` experts per token; recall is the share of
  the experts layer L+d then needs that were guessed, waste the wrong guesses per right one;
- next-token reuse: the share of a layer's experts for token t that token t-1 also used;
- the hit rate of one LRU cache over every (layer, expert), decode order, holding 10 %, 25 % and
  50 % of the experts (of the expert bytes: every record has the same size);
- experts touched per layer, over the whole text and per 32-token window.

    python scripts/routing_stats.py --model models/tiny-pystdlib-moe [--json out.json]

The random model is ``flashmoe synth`` with the trained model's shape, fed the same token ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_load

from flashmoe.synth import synth

DISTANCES = (1, 2, 3, 4)
GUESS_SIZES = (1, 2, 4, 8)
CACHE_SHARES = (0.10, 0.25, 0.50)
WINDOW = 32


class Recorder:
    """Stands in for a MoE block's expert bank: records its input and routing, then computes."""

    def __init__(self, bank, sink: list):
        self.bank, self.sink = bank, sink

    def __call__(self, x, indices):
        self.sink.append((x, indices))
        return self.bank(x, indices)


def record_routing(model_path: Path, ids: np.ndarray):
    """Per MoE layer: inputs [T, D] (float32), chosen experts [T, k], and the router."""
    model, _ = mlx_load(str(model_path))
    model.set_dtype(mx.float32)
    layers = [ly for ly in model.layers if hasattr(ly.mlp, "switch_mlp")]
    sinks = []
    for ly in layers:
        sinks.append([])
        ly.mlp.switch_mlp = Recorder(ly.mlp.switch_mlp, sinks[-1])
    model(mx.array(ids[None]))
    xs = [s[0][0].reshape(-1, s[0][0].shape[-1]) for s in sinks]
    chosen = [np.array(s[0][1].reshape(len(ids), -1)) for s in sinks]
    routers = [ly.mlp.gate for ly in layers]
    mx.eval(xs)
    return xs, chosen, routers


def guess_stats(xs, chosen, routers) -> dict:
    """recall[d][m] and waste[d][m] over every layer pair (L, L+d) and token."""
    n = len(xs)
    out = {}
    for d in DISTANCES:
        if d >= n:
            continue
        hit = {m: 0 for m in GUESS_SIZES}
        need = 0
        for layer in range(n - d):
            logits = routers[layer + d](xs[layer]).astype(mx.float32)
            order = np.array(mx.argsort(-logits, axis=-1))
            want = chosen[layer + d]
            need += want.size
            for m in GUESS_SIZES:
                top = order[:, :m]
                hit[m] += int((top[:, :, None] == want[:, None, :]).any(axis=2).sum())
        guessed = {m: need // want.shape[1] * m for m in GUESS_SIZES}
        out[d] = {m: {"recall": hit[m] / need,
                      "waste": (guessed[m] - hit[m]) / max(hit[m], 1)} for m in GUESS_SIZES}
    return out


def reuse(chosen) -> float:
    shares = []
    for c in chosen:
        same = (c[1:, :, None] == c[:-1, None, :]).any(axis=2)
        shares.append(same.mean())
    return float(np.mean(shares))


def lru_hit_rates(chosen, num_experts: int) -> dict:
    total = len(chosen) * num_experts
    out = {}
    for share in CACHE_SHARES:
        cap = max(1, round(share * total))
        cache, hits, looks = OrderedDict(), 0, 0
        for t in range(chosen[0].shape[0]):
            for layer, c in enumerate(chosen):
                for e in np.unique(c[t]):
                    key = (layer, int(e))
                    looks += 1
                    if key in cache:
                        hits += 1
                        cache.move_to_end(key)
                    else:
                        cache[key] = None
                        if len(cache) > cap:
                            cache.popitem(last=False)
        out[share] = hits / looks
    return out


def touched(chosen) -> dict:
    whole = [len(np.unique(c)) for c in chosen]
    windows = [len(np.unique(c[i:i + WINDOW])) for c in chosen
               for i in range(0, c.shape[0] - WINDOW + 1, WINDOW)]
    return {"whole_mean": float(np.mean(whole)), "whole_min": int(min(whole)),
            "window_mean": float(np.mean(windows))}


def measure(model_path: Path, ids: np.ndarray) -> dict:
    xs, chosen, routers = record_routing(model_path, ids)
    num_experts = routers[0].weight.shape[0]
    return {"guess": guess_stats(xs, chosen, routers), "reuse": reuse(chosen),
            "lru": lru_hit_rates(chosen, num_experts), "touched": touched(chosen),
            "experts": num_experts, "top_k": int(chosen[0].shape[1]), "layers": len(chosen)}


def held_out_text(model: Path, limit_chars: int) -> str:
    """The training run's held-out files, as this interpreter's standard library has them."""
    record = json.loads((model / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / rel).read_text(encoding="utf-8", errors="replace")
             for rel in record["corpus"]["heldout_files"] if (root / rel).is_file()]
    return "".join(parts)[:limit_chars]


def random_twin(model: Path, out: Path) -> Path:
    c = json.loads((model / "config.json").read_text())
    return synth(out, c["model_type"], layout="mlx", bits=4, layers=c["num_hidden_layers"],
                 hidden=c["hidden_size"], experts=c["num_experts"],
                 topk=c["num_experts_per_tok"], moe_inter=c["moe_intermediate_size"],
                 vocab=c["vocab_size"], seed=0)


def table(results: dict) -> str:
    lines = ["| model | ahead | " + " | ".join(f"recall@{m}" for m in GUESS_SIZES) + " | "
             + " | ".join(f"waste@{m}" for m in GUESS_SIZES) + " |",
             "|---|---|" + "---|" * (2 * len(GUESS_SIZES))]
    for name, r in results.items():
        for d, g in r["guess"].items():
            lines.append(f"| {name} | {d} | "
                         + " | ".join(f"{g[m]['recall']:.1%}" for m in GUESS_SIZES) + " | "
                         + " | ".join(f"{g[m]['waste']:.2f}" for m in GUESS_SIZES) + " |")
    lines += ["", "| model | next-token reuse | "
              + " | ".join(f"LRU hit @{s:.0%}" for s in CACHE_SHARES)
              + f" | experts touched/layer (of E) | per {WINDOW}-token window |",
              "|---|---|" + "---|" * len(CACHE_SHARES) + "---|---|"]
    for name, r in results.items():
        t = r["touched"]
        lines.append(f"| {name} | {r['reuse']:.1%} | "
                     + " | ".join(f"{r['lru'][s]:.1%}" for s in CACHE_SHARES)
                     + f" | {t['whole_mean']:.1f} (min {t['whole_min']}) of {r['experts']}"
                     + f" | {t['window_mean']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tiny-pystdlib-moe"))
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--text", type=Path, help="text to route (default: the held-out files)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    if not (a.model / "config.json").is_file():
        print(f"error: {a.model} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    if a.text is None and not (a.model / "training.json").is_file():
        print(f"error: {a.model} has no training.json: pass --text", file=sys.stderr)
        return 2
    text = a.text.read_text() if a.text else held_out_text(a.model, 40 * a.tokens)
    _, tok = mlx_load(str(a.model))
    ids = np.array(tok.encode(text)[:a.tokens])
    if ids.size < 2 * WINDOW:
        print(f"error: only {ids.size} tokens of text; need {2 * WINDOW}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = {"trained": measure(a.model, ids),
                   "random": measure(random_twin(a.model, Path(tmp) / "random"), ids)}
    print(f"{ids.size} tokens; guesses: the best m experts of layer L+d's router on layer L's "
          "input; waste = wrong guesses per right one")
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
