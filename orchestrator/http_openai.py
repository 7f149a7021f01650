"""OpenAI's API: ``POST /v1/chat/completions``, ``POST /v1/completions`` (Server-Sent Events
with ``"stream": true``, one JSON object otherwise), ``GET /v1/models``, ``GET /v1/models/{id}``.

Sampling defaults to greedy (``temperature`` 0), like the client library; ``top_k`` and
``min_p`` are accepted as extensions. ``stop``, ``logprobs``/``top_logprobs``, the ``developer``
role and ``tools`` (through the model's chat template and mlx-lm's tool-call parser, where the
model has one) are served; any other parameter is refused with a 400 that names it, unless it
asks for what we do anyway (``frequency_penalty: 0``, ``response_format: {"type": "text"}``...).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashmoe.orchestrator.http_common import (
    STREAM_HEADERS,
    ApiError,
    Run,
    check_request,
    message_objects,
    sse,
    usage_of,
)
from flashmoe.orchestrator.http_tools import ToolCalls
from flashmoe.protocol.request import Request as GenRequest

DEFAULT_MAX_TOKENS = 256
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
           "stream", "stream_options", "n", "user", "logprobs"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                   "parallel_tool_calls"}
_COMPLETIONS = _COMMON | {"prompt"}
# parameters whose value here is what we do anyway
_NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
            "response_format": ({"type": "text"},), "echo": (False,), "best_of": (1,),
            "suffix": ("",)}


def refuse_unknown(body: dict, accepted: set) -> None:
    bad = sorted(k for k, v in body.items() if k not in accepted and v is not None
                 and not (k in _NEUTRAL and v in _NEUTRAL[k]))
    if bad:
        raise ApiError(f"unsupported parameter(s): {', '.join(bad)}", param=bad[0],
                       code="unsupported_parameter")


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is not None and not isinstance(v, bool):
        raise ApiError(f"'{name}' must be a boolean", param=name)
    return bool(v)


def _content(v: Any, i: int) -> str:
    if isinstance(v, str) or v is None:
        return v
    # The list form: [{"type": "text", "text": "..."}, ...]; only text parts are supported.
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise ApiError(f"messages[{i}].content must be a string or a list of text parts",
                   param="messages")


def _messages(body: dict) -> list[dict]:
    out = []
    for i, m in enumerate(message_objects(body)):
        m = {k: v for k, v in m.items() if v is not None}
        if "content" in m:
            m["content"] = _content(m["content"], i)
        if isinstance(m.get("tool_calls"), list):  # templates want arguments as objects
            m["tool_calls"] = [_call_for_template(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _call_for_template(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            fn = {**fn, "arguments": json.loads(fn["arguments"])}
        except ValueError:
            raise ApiError("tool_calls[].function.arguments must be JSON", param="messages") \
                from None
        return {**call, "function": fn}
    return call


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p)):
        return p
    raise ApiError("'prompt' must be a string or a list of token ids (one prompt per request)",
                   param="prompt")


def _sampling(body: dict, chat: bool) -> dict:
    if body.get("n", 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    fields = {"max_tokens": body.get(name, DEFAULT_MAX_TOKENS)}
    for key in ("temperature", "top_p", "top_k", "min_p", "seed", "stop"):
        if body.get(key) is not None:
            fields[key] = body[key]
    lp = body.get("logprobs")
    if chat:  # logprobs: bool, top_logprobs: n
        fields["logprobs"] = _flag(body, "logprobs")
        if body.get("top_logprobs") is not None:
            fields["top_logprobs"] = body["top_logprobs"]
    elif lp is not None:  # completions: logprobs: n (the top n alongside each token)
        fields.update(logprobs=True, top_logprobs=lp)
    return fields


class OpenAI:
    def __init__(self, app: Any):
        self.app = app  # http_api.App: service, auth(), body()
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models),
                Route("/v1/models/{model_id:path}", self.model),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"])]

    def _card(self) -> dict:
        return {"id": self.app.service.model_name, "object": "model", "created": self.created,
                "owned_by": "flashmoe"}

    async def models(self, request: Request) -> Response:
        self.app.auth(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        self.app.auth(request)
        name = request.path_params["model_id"]
        if name != self.app.service.model_name:
            raise ApiError(f"model {name!r} does not exist", 404, code="model_not_found")
        return JSONResponse(self._card())

    async def chat(self, request: Request) -> Response:
        body = await self.app.body(request)
        refuse_unknown(body, _CHAT)
        tools = ToolCalls.for_request(self.app.tokenizer(), body)
        fields = {"messages": _messages(body), "tools": tools.tools if tools else None}
        return await self._complete(request, body, fields, chat=True, tools=tools)

    async def completions(self, request: Request) -> Response:
        body = await self.app.body(request)
        refuse_unknown(body, _COMPLETIONS)
        return await self._complete(request, body, {"prompt": _prompt(body)}, chat=False)

    async def _complete(self, request: Request, body: dict, fields: dict, chat: bool,
                        tools: ToolCalls | None = None) -> Response:
        fields.update(_sampling(body, chat))
        stream = _flag(body, "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options")
        usage = _flag(opts, "include_usage")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = check_request(GenRequest(id=rid, **fields), self.app.service)
        run = await self.app.run(req).start()
        reply = _Reply(rid, self.app.service.model_name, chat, self.app.token_text)
        if stream:
            return StreamingResponse(self._events(reply, run, usage, tools),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        text, ids, last, lps = await run.collect(request)
        calls, text = tools.parse(text) if tools else ([], text)
        return JSONResponse(reply.whole(text, last, len(ids), lps, calls))

    async def _events(self, reply: _Reply, run: Run, usage: bool,
                      tools: ToolCalls | None) -> AsyncIterator[str]:
        n, held = 0, []
        try:
            if reply.chat:
                yield sse(reply.piece({"role": "assistant", "content": ""}, None))
            async for chunk in run.chunks():
                n += len(chunk.token_ids)
                if tools:  # a tool call is known only once its text is whole
                    held.append(chunk.text)
                elif chunk.text or chunk.logprobs:
                    delta = {"content": chunk.text} if reply.chat else chunk.text
                    yield sse(reply.piece(delta, None, chunk.logprobs))
                if chunk.finish_reason is None:
                    continue
                reason = chunk.finish_reason
                if tools:
                    calls, text = tools.parse("".join(held))
                    delta = {"content": text} if text else {}
                    if calls:
                        delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(calls)]
                        reason = "tool_calls"
                    yield sse(reply.piece(delta, None))
                yield sse(reply.piece({} if reply.chat else "", reason))
                if usage:
                    yield sse(reply.usage_piece(chunk, n))
        except ApiError as e:
            yield sse({"error": e.body()})
        yield "data: [DONE]\n\n"


class _Reply:
    """OpenAI response shapes for one request."""

    def __init__(self, rid: str, model: str, chat: bool, token_text):
        self.rid, self.model, self.chat, self.token_text = rid, model, chat, token_text
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(last: Any, n: int) -> dict:
        prompt, completion = usage_of(last, n)
        cached = int((last.stats or {}).get("prompt_tokens_reused") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def logprobs(self, lps: list[dict] | None) -> dict | None:
        if not lps:
            return None
        if self.chat:
            def entry(tok: int, lp: float) -> dict:
                text = self.token_text(tok)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**entry(e["token"], e["logprob"]), "top_logprobs": [
                entry(t, lp) for t, lp in e.get("top", ())]} for e in lps]}
        return {"tokens": [self.token_text(e["token"]) for e in lps],
                "token_logprobs": [e["logprob"] for e in lps],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.get("top", ())}
                                 for e in lps]}

    def whole(self, text: str, last: Any, n: int, lps: list[dict],
              calls: list[dict]) -> dict:
        reason = "tool_calls" if calls else last.finish_reason
        choice: dict = {"index": 0, "logprobs": self.logprobs(lps), "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if calls:
                choice["message"]["tool_calls"] = calls
            out = self._head("chat.completion")
        else:
            choice["text"] = text
            out = self._head("text_completion")
        out.update(choices=[choice], usage=self._usage(last, n))
        return out

    def piece(self, delta: dict | str, finish_reason: str | None,
              lps: list[dict] | None = None) -> dict:
        choice = {"index": 0, "logprobs": self.logprobs(lps), "finish_reason": finish_reason}
        choice["delta" if self.chat else "text"] = delta
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = [choice]
        return out

    def usage_piece(self, last: Any, n: int) -> dict:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=self._usage(last, n))
        return out
