"""A multi-turn chat through the HTTP API: per turn, time to first token and prompt tokens
computed (prompt tokens minus those the prefix cache supplied).

    python scripts/chat_turns.py URL MODEL [--turns 5] [--tokens 32] [--system-words 400]

Run it against two daemons of the same model, one started with FLASHMOE_PREFIX_CACHE_ENTRIES=0,
to see what the prefix cache saves. Greedy, so both runs see the same conversation.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

QUESTIONS = ["Tell me about foxes.", "And about wolves?", "Which one runs faster?",
             "Where do they live?", "Summarize what you said.", "Anything else?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--system-words", type=int, default=400)
    ap.add_argument("--key")
    a = ap.parse_args()
    headers = {"Authorization": f"Bearer {a.key}"} if a.key else {}
    words = ("a long standing system prompt with rules and context " * a.system_words).split()
    history = [{"role": "system", "content": " ".join(words[: a.system_words])}]
    rows = []
    with httpx.Client(base_url=a.url, timeout=600, headers=headers) as c:
        for turn in range(a.turns):
            history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            # logprobs: every token makes a chunk, also one whose text is still held back
            body = {"model": a.model, "messages": history, "max_tokens": a.tokens,
                    "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
            t0 = time.perf_counter()
            ttft, text, usage = None, [], {}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    piece = json.loads(line[6:])
                    usage = piece.get("usage") or usage
                    for ch in piece.get("choices", ()):
                        if ch.get("logprobs") or ch["delta"].get("content"):
                            ttft = ttft or time.perf_counter() - t0
                        text.append(ch["delta"].get("content") or "")
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            rows.append({"turn": turn + 1, "ttft_ms": round((ttft or 0) * 1000, 1),
                         "prompt_tokens": usage.get("prompt_tokens"),
                         "prompt_tokens_computed": usage.get("prompt_tokens", 0) - cached})
            history.append({"role": "assistant", "content": "".join(text)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
