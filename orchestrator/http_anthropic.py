"""Anthropic's Messages API: ``POST /v1/messages`` (server-sent events with ``"stream": true``,
one message otherwise) and ``POST /v1/messages/count_tokens``.

Served: ``system`` (a string or text blocks), ``messages`` with text content, ``max_tokens``
(required, as Anthropic requires it), ``stop_sequences``, ``temperature``, ``top_p``,
``top_k``, ``metadata``; the reply carries ``stop_reason`` (``end_turn``, ``max_tokens``,
``stop_sequence`` with the ``stop_sequence`` met) and ``usage``. Other content blocks and
parameters (images, tools, thinking) are refused with a 400 that names them.
"""

from __future__ import annotations

import asyncio
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
    sse,
    usage_of,
)
from flashmoe.protocol.request import Request as GenRequest

_ACCEPTED = {"model", "messages", "system", "max_tokens", "stop_sequences", "temperature",
             "top_p", "top_k", "stream", "metadata"}
_STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def _text(v: Any, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(b, dict) for b in v):
        kinds = sorted({str(b.get("type")) for b in v} - {"text"})
        if kinds:
            raise ApiError(f"{where}: content blocks of type {', '.join(kinds)} are not "
                           "supported (text only)", param=where)
        if all(isinstance(b.get("text"), str) for b in v):
            return "".join(b["text"] for b in v)
    raise ApiError(f"{where} must be a string or a list of text blocks", param=where)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(f"messages[{i}] must be an object with role user or assistant",
                           param="messages")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}]")})
    return out


def _fields(body: dict) -> dict:
    bad = sorted(k for k, v in body.items() if k not in _ACCEPTED and v is not None)
    if bad:
        raise ApiError(f"unsupported parameter(s): {', '.join(bad)}", param=bad[0])
    if body.get("max_tokens") is None:
        raise ApiError("'max_tokens' is required", param="max_tokens")
    fields = {"messages": _messages(body), "max_tokens": body["max_tokens"]}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k"), ("stop", "stop_sequences")):
        if body.get(theirs) is not None:
            fields[ours] = body[theirs]
    return fields


class Anthropic:
    def __init__(self, app: Any):
        self.app = app

    def routes(self) -> list[Route]:
        return [Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])]

    async def count_tokens(self, request: Request) -> Response:
        body = await self.app.body(request)
        body = {k: v for k, v in body.items() if k in ("model", "messages", "system")}
        req = check_request(GenRequest(id="count", messages=_messages(body)), self.app.service)
        try:
            ids = await asyncio.to_thread(self.app.service.prepare, req)
        except ValueError as e:
            raise ApiError(str(e), param=getattr(e, "param", None)) from None
        return JSONResponse({"input_tokens": len(ids)})

    async def messages(self, request: Request) -> Response:
        body = await self.app.body(request)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError("'stream' must be a boolean", param="stream")
        mid = "msg_" + uuid.uuid4().hex
        req = check_request(GenRequest(id=mid, **_fields(body)), self.app.service)
        run = await self.app.run(req).start()
        head = {"id": mid, "type": "message", "role": "assistant",
                "model": self.app.service.model_name}
        if stream:
            return StreamingResponse(self._events(run, head, len(req.tokens or ())),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        text, ids, last, _ = await run.collect(request)
        prompt, gen = usage_of(last, len(ids))
        return JSONResponse({**head, "content": [{"type": "text", "text": text}],
                             **_stop(last), "usage": {"input_tokens": prompt,
                                                      "output_tokens": gen}})

    async def _events(self, run: Run, head: dict, n_prompt: int) -> AsyncIterator[str]:
        start = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": n_prompt, "output_tokens": 0}}
        yield sse({"type": "message_start", "message": start}, "message_start")
        yield sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, "content_block_start")
        n = 0
        try:
            async for chunk in run.chunks():
                n += len(chunk.token_ids)
                if chunk.text:
                    yield sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": chunk.text}},
                              "content_block_delta")
                if chunk.finish_reason is not None:
                    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                    yield sse({"type": "message_delta", "delta": _stop(chunk),
                               "usage": {"output_tokens": usage_of(chunk, n)[1]}},
                              "message_delta")
                    yield sse({"type": "message_stop"}, "message_stop")
        except ApiError as e:
            yield sse({"type": "error", "error": {"type": e.kind, "message": str(e)}}, "error")


def _stop(last: Any) -> dict:
    seq = getattr(last, "stop_sequence", None)
    if seq is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": seq}
    return {"stop_reason": _STOP_REASONS.get(last.finish_reason, last.finish_reason),
            "stop_sequence": None}
