"""The OpenAI-compatible HTTP API of a real daemon, through the official ``openai`` package."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from support import CHAT, JSON, MAX_TOKENS, PROMPTS, SAMPLED, Daemon, auth, wait_for


def test_chat_completions(oai: openai.OpenAI, reference: dict) -> None:
    ids, text = reference["chat"]
    model = reference["name"]
    r = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS)
    assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = oai.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_completions(oai: openai.OpenAI, reference: dict) -> None:
    ids, text = reference[PROMPTS[2]]
    model = reference["name"]
    r = oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=MAX_TOKENS)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.completion_tokens == len(ids)
    chunks = list(
        oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == text
    by_ids = oai.completions.create(
        model=model, prompt=reference["prompt_ids"], max_tokens=MAX_TOKENS
    )
    assert by_ids.choices[0].text == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_api_key(server: Daemon, http: httpx.Client, reference: dict) -> None:
    body = {"model": reference["name"], "messages": CHAT, "max_tokens": 2}
    for key in (None, "wrong"):
        headers = auth(key) if key else {}
        for method, path, kw in (
            ("GET", "/v1/models", {}),
            ("GET", "/metrics", {}),
            ("POST", "/v1/chat/completions", {"json": body}),
            ("POST", "/v1/completions", {"json": {**body, "prompt": "x"}}),
        ):
            r = http.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (key, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/health").json()["status"] == "ok"  # no key needed
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": "hi"},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"max_tokens": "10"},
        {"max_tokens": 10**9},
        {"max_tokens": 0},
        {"temperature": -0.5},
        {"temperature": True},
        {"top_p": 2},
        {"n": 2},
        {"stream": "yes"},
        {"stop": [""]},
        {"model": "gpt-4"},
        {"model": None},
    ],
)
def test_bad_bodies_get_400(http: httpx.Client, reference: dict, change: dict) -> None:
    body = {"model": reference["name"], "messages": CHAT, "max_tokens": 2, **change}
    r = http.post("/v1/chat/completions", json=body, headers=auth())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_bad_json_and_routes(http: httpx.Client, oai: openai.OpenAI, reference: dict) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = http.post("/v1/completions", content=raw, headers=JSON | auth())
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for prompt in (3, [], [1, "a"], [[1], [2]], [10**9]):
        body = {"model": reference["name"], "prompt": prompt}
        r = http.post("/v1/completions", json=body, headers=auth())
        assert r.status_code == 400, prompt
        assert r.json()["error"]["param"] == "prompt"
    big = http.post("/v1/completions", content=b" " * (4 * 1024 * 1024 + 1),
                    headers=JSON | auth())
    assert big.status_code == 413
    assert http.get("/v1/nothing", headers=auth()).status_code == 404
    assert http.get("/v1/chat/completions", headers=auth()).status_code == 405
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        oai.chat.completions.create(model="nope", messages=CHAT)


def test_models_and_metrics(http: httpx.Client, oai: openai.OpenAI, reference: dict) -> None:
    assert [m.id for m in oai.models.list()] == [reference["name"]]
    oai.completions.create(model=reference["name"], prompt="x", max_tokens=3)
    r = http.get("/metrics", headers=auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = dict(line.split() for line in r.text.splitlines() if not line.startswith("#"))
    for name in (
        "requests_total",
        "tokens_generated_total",
        "expert_hit_rate",
        "bytes_read_total",
        "pool_bytes_used",
    ):
        assert f"flashmoe_{name}" in values, name
    assert float(values["flashmoe_requests_total"]) >= 1
    assert float(values["flashmoe_tokens_generated_total"]) >= 3
    assert 0 <= float(values["flashmoe_expert_hit_rate"]) <= 1
    assert float(values["flashmoe_compute_lanes"]) >= 1


def test_dropped_stream_is_cancelled(server: Daemon, http: httpx.Client, reference: dict) -> None:
    body = {"model": reference["name"], "prompt": PROMPTS[0], "max_tokens": 480, "stream": True}
    t0 = time.monotonic()
    with http.stream("POST", "/v1/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"

    def idle() -> bool:
        with server.client() as c:
            return c.status()["requests_running"] == 0

    wait_for(idle, 10, "the dropped HTTP stream to be cancelled")
    assert time.monotonic() - t0 < 10


def test_stop_sequences(oai: openai.OpenAI, reference: dict) -> None:
    ids, text = reference[PROMPTS[2]]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    r = oai.completions.create(model=reference["name"], prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                               stop=["\x00never", stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(model=reference["name"], prompt=PROMPTS[2],
                                         max_tokens=MAX_TOKENS, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_equal_mlx_lm(oai: openai.OpenAI, tiny_model: Path, reference: dict) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(tiny_model))
    model.set_dtype(mx.float32)

    def mlx_lm_logprobs(prompt: list[int]) -> list[tuple[float, list[float]]]:
        out = []
        for token, lp in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS):
            out.append((lp[token].item(), sorted(lp.tolist(), reverse=True)[:3]))
        return out

    want = mlx_lm_logprobs(reference["prompt_ids"])
    r = oai.completions.create(model=reference["name"], prompt=reference["prompt_ids"],
                               max_tokens=MAX_TOKENS, logprobs=3)
    lp = r.choices[0].logprobs
    n = len(lp.token_logprobs)
    assert n == r.usage.completion_tokens and n > 0
    assert r.choices[0].text == reference[PROMPTS[2]][1]  # the same greedy tokens
    for got, (logprob, _) in zip(lp.token_logprobs, want[:n], strict=True):
        assert got == pytest.approx(logprob, abs=1e-4)

    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    want = mlx_lm_logprobs(list(ids))
    chat = oai.chat.completions.create(model=reference["name"], messages=CHAT,
                                       max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    for c, (logprob, top) in zip(content, want[: len(content)], strict=True):
        assert c.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top, abs=1e-4)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_model_card_and_developer_role(oai: openai.OpenAI, http: httpx.Client,
                                       reference: dict) -> None:
    assert oai.models.retrieve(reference["name"]).id == reference["name"]
    assert http.get("/v1/models/nope", headers=auth()).status_code == 404
    msgs = [{"role": "system", "content": "Be brief."}, *CHAT]
    a = oai.chat.completions.create(model=reference["name"], messages=msgs, max_tokens=6)
    msgs[0]["role"] = "developer"
    b = oai.chat.completions.create(model=reference["name"], messages=msgs, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_tools_without_template_support_are_a_400(oai: openai.OpenAI, reference: dict) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tool calling"):
        oai.chat.completions.create(model=reference["name"], messages=CHAT, tools=[tool])
    r = oai.chat.completions.create(model=reference["name"], messages=CHAT, tools=[tool],
                                    tool_choice="none", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streams_are_not_cached(http: httpx.Client, reference: dict) -> None:
    body = {"model": reference["name"], "prompt": "x", "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers=auth()) as r:
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()


def test_seeded_request_alone_and_among_8(reference: dict, server: Daemon) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": reference["name"], "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
            **SAMPLED}
    others = [{"model": reference["name"], "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS,
               "temperature": 1.0, "seed": 100 + i} for i in range(1, 8)]

    def call(b: dict) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/completions", json=b, headers=auth())
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

    alone = call(body)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, [body, *others]))
    assert alone == together[0] == reference["sampled"][1]
    assert len(set(together)) > 1


def test_huge_prompt_is_refused_before_tokenizing(http: httpx.Client, reference: dict) -> None:
    body = {"model": reference["name"], "prompt": "word " * 800_000, "max_tokens": 2}
    t0 = time.monotonic()
    r = http.post("/v1/completions", json=body, headers=auth())
    assert r.status_code == 400 and "prompt longer than" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    assert time.monotonic() - t0 < 30
