"""The shipped trained model (models/tiny-pystdlib-moe) as a fixture: flashmoe against mlx-lm on
a checkpoint whose routing and logits were learned, at a budget below its expert bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load as mlx_load
from support import mlx_lm_ids

from flashmoe.orchestrator.budget import budget_for_pool
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.store import open_store

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-pystdlib-moe"
PROMPTS = ["def read_lines(path):\n", "import os\nimport sys\n\n"]
N_TOKENS = 24
# Not from the corpus: a short, ordinary function.
SNIPPET = '''def mean(values):
    """Return the arithmetic mean of values."""
    if not values:
        raise ValueError("mean of empty data")
    return sum(values) / len(values)
'''


def reference_ids(prompt: str, dtype: mx.Dtype | None) -> list[int]:
    return mlx_lm_ids(MODEL, prompt, N_TOKENS, dtype)


def below_expert_bytes() -> int:
    store = open_store(MODEL)  # an expert pool of a third of the expert bytes
    return budget_for_pool(store, store.expert_bytes_total() // 3, mx.float32)


def engine_ids(prompt: str, dtype: str) -> tuple[list[int], dict]:
    with Engine(str(MODEL), memory_budget=below_expert_bytes(), workers=2, dtype=dtype) as eng:
        ids, stats = [], {}
        for c in eng.generate(GenRequest(id="t", prompt=prompt, max_tokens=N_TOKENS)):
            ids.extend(c.token_ids)
            stats = c.stats or stats
        return ids, stats


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_mlx_lm_float32(prompt):
    want = reference_ids(prompt, mx.float32)
    got, stats = engine_ids(prompt, "float32")
    assert got == want
    assert len(got) == N_TOKENS  # the model does not stop at once: the comparison has content
    assert stats["pool_bytes"] < open_store(MODEL).expert_bytes_total()
    assert 0.0 < stats["expert_hit_rate"] < 1.0


def test_greedy_tokens_equal_mlx_lm_own_dtype():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    want = reference_ids(PROMPTS[0], None)  # as mlx_lm.load leaves it: bfloat16
    got, stats = engine_ids(PROMPTS[0], "bfloat16")
    assert stats["dtype"] == "bfloat16"
    assert got == want


def test_model_has_learned_python():
    """Held-out text the model never saw scores far below chance (ln 4096 = 8.3 nats)."""
    model, tok = mlx_load(str(MODEL))
    model.set_dtype(mx.float32)
    ids = mx.array([tok.encode(SNIPPET)])
    nll = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="mean").item()
    assert nll < 0.5 * math.log(len(tok.vocab))
    text = tok.decode(reference_ids("class Stack:\n    def push(self, item):\n", mx.float32))
    assert any(word in text for word in ("self", "return", "def ", "import ", " = "))


def test_tokenizer_round_trip_and_chat_template():
    _, tok = mlx_load(str(MODEL))
    source = (MODEL.parents[1] / "scripts" / "train_tiny_moe.py").read_text()[:2000]
    assert tok.decode(tok.encode(source)) == source
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|endoftext|>")}
