"""Ollama's and Anthropic's APIs of a real daemon, through the official ``ollama`` and
``anthropic`` packages; greedy replies equal the OpenAI routes' for the same prompt. Also the
in-flight limit of a real daemon under three times its load, and tool-call parsing."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import ollama
import openai
import pytest
from mlx_lm.tool_parsers import json_tools
from support import CHAT, KEY, MAX_TOKENS, PROMPTS, Daemon, auth, free_port

from flashmoe.orchestrator.http_tools import ToolCalls

SYSTEM = "You answer in one word."


@pytest.fixture
def olm(server: Daemon) -> ollama.Client:
    return ollama.Client(host=server.url, headers=auth(), timeout=30)


@pytest.fixture
def claude(server: Daemon) -> anthropic.Anthropic:
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0,
                             timeout=30) as c:
        yield c


def _openai_chat(oai: openai.OpenAI, model: str, messages: list, **kw) -> tuple[str, int]:
    r = oai.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, **kw)
    return r.choices[0].message.content, r.usage.prompt_tokens


def test_ollama_chat(olm: ollama.Client, reference: dict) -> None:
    name = reference["name"]
    ids, text = reference["chat"]
    r = olm.chat(model=name, messages=CHAT, stream=False, options={"num_predict": MAX_TOKENS})
    assert r.message.role == "assistant" and r.message.content == text
    assert r.done and r.done_reason in ("length", "stop") and r.eval_count == len(ids)
    assert r.prompt_eval_count > 0 and r.total_duration > 0
    parts = list(olm.chat(model=name, messages=CHAT, stream=True,
                          options={"num_predict": MAX_TOKENS, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == text
    assert [p.done for p in parts][-1] and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == len(ids)


def test_ollama_generate(olm: ollama.Client, oai: openai.OpenAI, reference: dict) -> None:
    name = reference["name"]
    want, _ = _openai_chat(oai, name, [{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": PROMPTS[1]}])
    r = olm.generate(model=name, prompt=PROMPTS[1], system=SYSTEM, stream=False,
                     options={"num_predict": MAX_TOKENS})
    assert r.response == want and r.done
    raw = olm.generate(model=name, prompt=PROMPTS[2], raw=True, stream=True,
                       options={"num_predict": MAX_TOKENS})
    assert "".join(p.response for p in raw) == reference[PROMPTS[2]][1]
    _, text = reference[PROMPTS[2]]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = olm.generate(model=name, prompt=PROMPTS[2], raw=True, stream=False,
                       options={"num_predict": MAX_TOKENS, "stop": [stop]})
    assert cut.response == text[: text.index(stop)] and cut.done_reason == "stop"


def test_ollama_models(olm: ollama.Client, server: Daemon, reference: dict) -> None:
    name = reference["name"]
    assert [m.model for m in olm.list().models] == [name]
    assert [m.model for m in olm.ps().models] == [name]
    shown = olm.show(name)
    assert "completion" in shown.capabilities and shown.details.family == "qwen3_moe"
    with pytest.raises(ollama.ResponseError) as e:
        olm.show("nope")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        olm.chat(model=name, messages=CHAT, options={"mirostat": 2})
    assert e.value.status_code == 400 and "options.mirostat" in str(e.value)
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/api/version").json()["version"]
        assert http.get("/api/tags").status_code == 401  # the key guards it


def test_anthropic_messages(claude: anthropic.Anthropic, oai: openai.OpenAI,
                            reference: dict) -> None:
    name = reference["name"]
    want, n_prompt = _openai_chat(oai, name, [{"role": "system", "content": SYSTEM}, *CHAT])
    m = claude.messages.create(model=name, max_tokens=MAX_TOKENS, system=SYSTEM, messages=CHAT)
    assert m.type == "message" and m.role == "assistant" and m.content[0].text == want
    assert m.stop_reason in ("max_tokens", "end_turn") and m.usage.input_tokens == n_prompt
    assert m.usage.output_tokens > 0
    counted = claude.messages.count_tokens(model=name, system=SYSTEM, messages=CHAT)
    assert counted.input_tokens == n_prompt
    with claude.messages.stream(model=name, max_tokens=MAX_TOKENS, system=SYSTEM,
                                messages=CHAT) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == want and final.usage.output_tokens == m.usage.output_tokens
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    cut = claude.messages.create(model=name, max_tokens=MAX_TOKENS, system=SYSTEM,
                                 messages=CHAT, stop_sequences=["\x00x", stop])
    assert cut.content[0].text == want[: want.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    with pytest.raises(anthropic.BadRequestError, match="image"):
        claude.messages.create(model=name, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA=="}}]}])
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("claude-x")


def test_queue_limit_under_three_times_the_load(tiny_model: Path, monkeypatch) -> None:
    limit = 3
    monkeypatch.setenv("FLASHMOE_MAX_QUEUED_REQUESTS", str(limit))
    port = free_port()
    d = Daemon(tiny_model, "--http", f"127.0.0.1:{port}")
    try:
        url = d.wait_ready()["http"]
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 24}

        def call(i: int) -> tuple[int, str, str]:
            with httpx.Client(base_url=url, timeout=60) as c:
                r = c.post("/v1/completions", json={**body, "prompt": PROMPTS[i % 8]})
                text = r.json()["choices"][0]["text"] if r.status_code == 200 else ""
                return r.status_code, r.headers.get("retry-after", ""), text

        with ThreadPoolExecutor(3 * limit) as pool:
            results = list(pool.map(call, range(3 * limit), timeout=120))
        codes = [c for c, _, _ in results]
        assert len(results) == 3 * limit and set(codes) <= {200, 429}, codes
        assert codes.count(200) >= limit and 429 in codes
        assert all(ra == "1" for c, ra, _ in results if c == 429)
        assert all(t for c, _, t in results if c == 200)
        with httpx.Client(base_url=url, timeout=60) as c:  # every slot came back
            rs = [c.post("/v1/completions", json=body) for _ in range(limit)]
        assert all(r.status_code == 200 for r in rs)
        print(f"429 under {3 * limit} concurrent requests, limit {limit}: "
              f"{codes.count(200)} served, {codes.count(429)} refused with Retry-After")
    finally:
        d.close()


def test_tool_calls_are_parsed_with_mlx_lms_parser() -> None:
    tok = SimpleNamespace(has_tool_calling=True, tool_call_start=json_tools.tool_call_start,
                          tool_call_end=json_tools.tool_call_end,
                          tool_parser=json_tools.parse_tool_call)
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    calls = ToolCalls.for_request(tok, {"tools": [tool]})
    text = 'Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}' \
           '</tool_call>'
    got, rest = calls.parse(text)
    assert rest == "Let me look." and len(got) == 1
    assert got[0]["function"] == {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}
    assert got[0]["type"] == "function" and got[0]["id"].startswith("call_")
    assert calls.parse("no call here") == ([], "no call here")
    assert calls.parse("<tool_call>{broken") == ([], "<tool_call>{broken")
    assert ToolCalls.for_request(tok, {"tools": [tool], "tool_choice": "none"}) is None
