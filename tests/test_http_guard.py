"""Who may call the HTTP API and what it accepts, on the real app over a fake service (no model):
Host and Origin checks, CORS for an allowed origin, JSON-only bodies, deep nesting, unsupported
parameters, the in-flight limit (429), the bind policy."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from flashmoe.configs import Settings
from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.http_api import create_app
from flashmoe.orchestrator.http_guard import check_bind
from flashmoe.orchestrator.scheduler import Chunk

MODEL = "fake"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class FakeService:
    """Answers every request with ``max_tokens`` (at most 8) chunks "x", ``delay_s`` apart."""

    def __init__(self, limit: int = 64, delay_s: float = 0.0):
        self.settings = Settings(max_queued_requests=limit)
        self.model_name = MODEL
        self.engine = SimpleNamespace(tokenizer=None)
        self.delay_s = delay_s
        self.submitted: list = []
        self._running: set[str] = set()

    def prepare(self, req):
        req.check(self.settings.max_tokens_limit)
        req.tokens = [1] * 5
        return req.tokens

    def submit(self, req, on_chunk) -> None:
        self.prepare(req)
        self.submitted.append(req)
        self._running.add(req.id)

        def run() -> None:
            for _ in range(min(req.max_tokens, 8)):  # Ollama's default asks for the limit
                time.sleep(self.delay_s)
                on_chunk(Chunk(req.id, "x", [7]))
            self._running.discard(req.id)
            on_chunk(Chunk(req.id, "", [], finish_reason="length",
                           stats={"prompt_tokens": 5,
                                  "generation_tokens": min(req.max_tokens, 8)}))

        threading.Thread(target=run, daemon=True).start()

    def running(self) -> list[str]:
        return sorted(self._running)

    def cancel(self, req_id: str) -> None:
        pass

    def status(self) -> dict:
        return {"requests_served": 0}


def client(service=None, **kw) -> TestClient:
    app = create_app(service or FakeService(), **kw)
    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


def test_serves_a_plain_request() -> None:
    r = client().post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "xxx"


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_only_json_bodies(ctype: str | None) -> None:
    import json

    headers = {"content-type": ctype} if ctype else {}
    for path in ("/v1/chat/completions", "/api/chat", "/v1/messages"):
        r = client().post(path, content=json.dumps(CHAT).encode(), headers=headers)
        assert r.status_code == 415, (path, r.text)
        assert "application/json" in r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.2.nip.io",
                                  "localhost.evil.example"])
def test_foreign_host_is_refused(host: str) -> None:
    r = client().post("/v1/chat/completions", json=CHAT, headers={"host": host})
    assert r.status_code == 421 and "Host" in r.json()["error"]["message"]


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000",
                                  "LOCALHOST"])
def test_loopback_names_pass(host: str) -> None:
    assert client().get("/health", headers={"host": host}).status_code == 200


def test_host_check_follows_the_bound_address() -> None:
    c = client(host="192.168.1.5", api_key="k")
    assert c.get("/health", headers={"host": "192.168.1.5:8000"}).status_code == 200
    assert c.get("/health", headers={"host": "other:8000"}).status_code == 421
    every = client(host="0.0.0.0", api_key="k")  # any name reaches it: the key guards it
    assert every.get("/health", headers={"host": "myhost.lan:8000"}).status_code == 200


def test_cross_origin_request_is_refused() -> None:
    for origin in ("https://evil.example", "http://localhost:3000", "null"):
        r = client().post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                          headers={"origin": origin})
        assert r.status_code == 403 and "--allow-origin" in r.json()["error"]["message"]


def test_allowed_origin_gets_cors() -> None:
    c = client(allow_origins=["http://localhost:3000"])
    pre = c.options("/v1/chat/completions", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = c.post("/v1/chat/completions", json=CHAT, headers={"origin": "http://localhost:3000"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert c.post("/v1/chat/completions", json=CHAT,
                  headers={"origin": "http://localhost:3001"}).status_code == 403


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000, b"{" + b'"x":[' * 70])
def test_deep_json_is_a_400(raw: bytes) -> None:
    r = client().post("/v1/chat/completions", content=raw,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_deep_but_valid_json_is_a_400() -> None:
    deep: dict = {"model": MODEL, "messages": CHAT["messages"]}
    node = deep
    for _ in range(80):
        node["metadata"] = {}
        node = node["metadata"]
    assert client().post("/v1/chat/completions", json=deep).status_code == 400


@pytest.mark.parametrize("path, extra, name", [
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"logit_bias": {"5": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"nonsense": 1}, "nonsense"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/api/chat", {"options": {"repeat_penalty": 1.3}}, "options.repeat_penalty"),
    ("/api/chat", {"format": "json"}, "format"),
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": {}}]}, "tools"),
])
def test_unsupported_parameters_are_named(path: str, extra: dict, name: str) -> None:
    body = {**CHAT, **extra}
    if path == "/v1/completions":
        body = {"model": MODEL, "prompt": "x", **extra}
    r = client().post(path, json=body)
    assert r.status_code == 400 and name in r.text, r.text


def test_neutral_values_of_unsupported_parameters_pass() -> None:
    body = {**CHAT, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "user": "u"}
    assert client().post("/v1/chat/completions", json=body).status_code == 200
    ollama = {"model": MODEL, "messages": CHAT["messages"], "stream": False,
              "options": {"num_ctx": 4096, "num_predict": 2}, "keep_alive": "5m"}
    r = client().post("/api/chat", json=ollama)
    assert r.status_code == 200 and r.json()["message"]["content"] == "xx"


def test_full_queue_answers_429_and_loses_nothing() -> None:
    service = FakeService(limit=2, delay_s=0.05)
    c = client(service)
    results: list = [None] * 6

    def call(i: int) -> None:
        results[i] = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(not t.is_alive() for t in threads)
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    for r in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
        else:
            assert r.json()["choices"][0]["message"]["content"] == "xxxx"
    assert len(service.submitted) == codes.count(200)
    assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # the gate reopened


def test_bind_policy() -> None:
    assert check_bind("127.0.0.1", None, False) is None
    assert check_bind("::1", None, False) is None
    assert check_bind("0.0.0.0", "key", False) is None
    with pytest.raises(FlashMoeError, match="--allow-public"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(FlashMoeError, match="empty"):
        check_bind("127.0.0.1", "", False)
    with pytest.raises(FlashMoeError, match="empty"):
        check_bind("127.0.0.1", "  ", True)
    assert "warning" in check_bind("192.168.1.5", None, True)


_ODD = [None, True, -1, 0, 2**70, 1.5, 1e300, "x", "", [], [1, "a"], {}, {"a": [1]},
        [{"role": "user"}], [{"role": "user", "content": {"x": 1}}], [[[]]]]
_ROUTES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    "/api/chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                  "stream": False, "options": {"num_predict": 2}},
    "/api/generate": {"model": MODEL, "prompt": "hi", "stream": False,
                      "options": {"num_predict": 2}},
    "/api/show": {"model": MODEL},
    "/v1/messages": {"model": MODEL, "max_tokens": 2,
                     "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": MODEL,
                                  "messages": [{"role": "user", "content": "hi"}]},
}
_FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
           "stop", "stream", "logprobs", "top_logprobs", "tools", "tool_choice", "system",
           "stop_sequences", "options", "raw", "n", "stream_options"]


@pytest.mark.parametrize("path", sorted(_ROUTES))
def test_odd_values_never_get_a_5xx(path: str) -> None:
    import random

    rng = random.Random(path)
    c = client()
    for _ in range(80):
        body = dict(_ROUTES[path])
        for name in rng.sample(_FIELDS, rng.randint(1, 3)):
            body[name] = rng.choice(_ODD)
        if rng.random() < 0.3 and isinstance(body.get("options"), dict):
            body["options"] = {rng.choice(["num_predict", "temperature", "stop", "seed",
                                           "top_k"]): rng.choice(_ODD)}
        r = c.post(path, json=body)
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json(), r.text
