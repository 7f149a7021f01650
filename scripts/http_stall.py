"""How long one HTTP stream stalls while another client sends a huge prompt.

    python scripts/http_stall.py URL MODEL [--prompt-mb 4] [--key KEY]

Streams a long completion from a running daemon (``flashmoe-daemon start --http``), and after
its first tokens posts a prompt of ``--prompt-mb`` MB from a second client. Prints the longest
gap between the stream's chunks before, during and after the big request, and how the big
request was answered. Run it against a daemon that serves nothing else.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--prompt-mb", type=float, default=4.0)
    ap.add_argument("--key")
    ap.add_argument("--tokens", type=int, default=400)
    a = ap.parse_args()
    headers = {"Authorization": f"Bearer {a.key}"} if a.key else {}
    stamps: list[float] = []
    window: dict = {}

    def stream() -> None:
        body = {"model": a.model, "prompt": "The", "max_tokens": a.tokens, "stream": True}
        with httpx.Client(base_url=a.url, timeout=300, headers=headers) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        stamps.append(time.perf_counter())

    t = threading.Thread(target=stream)
    t.start()
    while len(stamps) < 40:
        time.sleep(0.01)
    big = {"model": a.model, "prompt": "word " * int(a.prompt_mb * 1e6 / 5), "max_tokens": 2}
    with httpx.Client(base_url=a.url, timeout=300, headers=headers) as c:
        window["t0"] = time.perf_counter()
        r = c.post("/v1/completions", json=big)
        window["t1"] = time.perf_counter()
    t.join()

    def worst(lo: float, hi: float) -> float:
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if lo <= b and a <= hi]
        return max(gaps, default=0.0) * 1000

    t0, t1 = window["t0"], window["t1"]
    print(json.dumps({
        "big_prompt_mb": a.prompt_mb, "big_status": r.status_code,
        "big_answer": r.json().get("error", {}).get("message", "")[:80],
        "big_request_ms": round((t1 - t0) * 1000, 1),
        "max_gap_before_ms": round(worst(stamps[0], t0), 1),
        "max_gap_during_ms": round(worst(t0, t1), 1),
        "max_gap_after_ms": round(worst(t1, stamps[-1]), 1),
        "chunks": len(stamps)}, indent=1))


if __name__ == "__main__":
    main()
