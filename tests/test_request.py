"""The one request type: its checks, stop strings, per-request sampling keys, logprobs."""

from __future__ import annotations

import mlx.core as mx
import pytest

from flashmoe.orchestrator.sampling import StopText, sampler_for, token_logprobs
from flashmoe.protocol.messages import Generate, ProtocolError, encode
from flashmoe.protocol.request import BOUNDS, Request, RequestError


@pytest.mark.parametrize(
    "fields, param",
    [
        ({}, "prompt"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "audio": 1}]}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": 3}, "stop"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"tools": "x"}, "tools"),
    ],
)
def test_check_names_the_field(fields: dict, param: str) -> None:
    fields = {"prompt": "hi", **fields} if "messages" not in fields and fields else fields
    with pytest.raises(RequestError) as e:
        Request(id="r", **fields).check()
    assert e.value.param == param and str(e.value)


def test_check_normalizes() -> None:
    r = Request(id="r", messages=[{"role": "developer", "content": "be brief"}], max_tokens=3.0,
                temperature=1, stop="END").check(max_tokens_limit=10)
    assert r.messages[0]["role"] == "system" and r.max_tokens == 3
    assert r.temperature == 1.0 and type(r.temperature) is float and r.stop == ["END"]
    with pytest.raises(RequestError, match=r"\[1, 10\]"):
        Request(id="r", prompt="x", max_tokens=11).check(max_tokens_limit=10)


def test_wire_format_uses_the_same_bounds() -> None:
    for name, (lo, hi) in BOUNDS.items():
        if name == "seed":
            continue
        for bad in (lo - 1, hi + 1):
            with pytest.raises(ProtocolError):
                encode(Generate(id="g", prompt="x", **{name: bad}))
    encode(Generate(id="g", prompt="x", stop=["\n"], logprobs=True, top_logprobs=5))
    with pytest.raises(ProtocolError):
        encode(Generate(id="g", prompt="x", stop=["x" * 300]))


def test_stop_text_holds_back_a_possible_start() -> None:
    s = StopText(["STOP", "\n\n"])
    assert s.feed("hello S") == ("hell", False)
    assert s.feed("TO") == ("o ", False)
    assert s.feed("Px") == ("", True)
    s = StopText(["STOP"])
    assert s.feed("abcST") == ("ab", False) and s.feed("ay") == ("cS", False)
    assert s.flush() == "Tay"
    assert StopText([]).feed("anything") == ("anything", False)


def _draws(req: Request, logprobs: mx.array, n: int) -> list[int]:
    sample = sampler_for(req)
    return [sample(logprobs).item() for _ in range(n)]


def test_seeded_sampling_ignores_the_global_generator() -> None:
    logprobs = mx.log(mx.softmax(mx.arange(32, dtype=mx.float32)[None] / 8, axis=-1))
    req = Request(id="r", prompt="x", temperature=1.0, top_p=0.95, top_k=20, seed=11).check()
    mx.random.seed(1)
    a = _draws(req, logprobs, 12)
    mx.random.seed(2)
    interleaved = sampler_for(req)
    other = sampler_for(Request(id="o", prompt="x", temperature=1.0).check())
    b = []
    for _ in range(12):
        other(logprobs)  # another request's draws in between change nothing
        b.append(interleaved(logprobs).item())
    assert a == b and len(set(a)) > 1
    assert _draws(Request(id="r", prompt="x", temperature=1.0, seed=12).check(), logprobs,
                  12) != a
    assert all(t >= 12 for t in a)  # top_k=20 of 32: only the 20 likeliest


def test_token_logprobs() -> None:
    lp = mx.log(mx.array([[0.1, 0.6, 0.3]]))
    out = token_logprobs(lp, 2, top=2)
    assert out["token"] == 2 and out["logprob"] == pytest.approx(mx.log(0.3).item())
    assert [t for t, _ in out["top"]] == [1, 2]
    assert "top" not in token_logprobs(lp, 0, top=0)
