"""The OpenAI-compatible HTTP API of a real daemon, through the official ``openai`` package."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_daemon import CHAT, MAX_TOKENS, PROMPTS, Daemon, reference, tiny_model, wait_for

__all__ = ["reference", "tiny_model"]  # fixtures shared with test_daemon.py

KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    port = free_port()
    d = Daemon(tiny_model, "--http", f"127.0.0.1:{port}", "--api-key", KEY)
    st = d.wait_ready()
    assert st["http"] == f"http://127.0.0.1:{port}"
    d.url = st["http"]
    yield d
    d.close()


@pytest.fixture
def oai(server: Daemon) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=30, max_retries=0) as c:
        yield c


@pytest.fixture
def http(server: Daemon) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


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
        {"stop": ["\n"]},
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
        r = http.post("/v1/completions", content=raw, headers=auth())
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for prompt in (3, [], [1, "a"], [[1], [2]], [10**9]):
        body = {"model": reference["name"], "prompt": prompt}
        r = http.post("/v1/completions", json=body, headers=auth())
        assert r.status_code == 400, prompt
        assert r.json()["error"]["param"] == ("prompt" if prompt != [10**9] else None)
    big = http.post("/v1/completions", content=b" " * (4 * 1024 * 1024 + 1), headers=auth())
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
