"""What every HTTP dialect (OpenAI, Ollama, Anthropic) shares: errors, JSON bodies, one request
run on the service.

A ``Run`` submits a ``Request`` to the daemon's ``Service`` and hands its chunks to the event
loop (they come back on the engine thread, through ``call_soon_threadsafe``). It is checked and
tokenized on a worker thread, so a huge prompt never stalls the event loop that serves every other
stream; past ``max_queued_requests`` in flight it is refused with a 429 and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from flashmoe.orchestrator.service import public_error
from flashmoe.protocol.request import Request as GenRequest
from flashmoe.protocol.request import RequestError

MAX_JSON_DEPTH = 64
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered as JSON, by default OpenAI's ``{"error": {message, type, param,
    code}}``; each dialect may shape it its own way (``ApiError.shape``)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}

    def response(self, dialect: str = "openai") -> JSONResponse:
        if dialect == "ollama":
            content: dict = {"error": str(self)}
        elif dialect == "anthropic":
            content = {"type": "error", "error": {"type": self.kind, "message": str(self)}}
        else:
            content = {"error": self.body()}
        return JSONResponse(content, status_code=self.status, headers=self.headers)


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object body: 413 past ``limit`` bytes, 415 unless
    ``application/json``, 400 for anything but a JSON object nested at most ``MAX_JSON_DEPTH``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading it
        raise ApiError(f"request body over {limit} bytes", 413)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(f"Content-Type must be application/json, got {ctype or 'none'!r}", 415)
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(f"request body over {limit} bytes", 413)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    if _depth(body) > MAX_JSON_DEPTH:
        raise ApiError(f"request body nested deeper than {MAX_JSON_DEPTH}")
    return body


def message_objects(body: dict) -> list[dict]:
    """``body["messages"]``: a non-empty list of objects, or a 400 that names it."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object", param="messages")
    return msgs


def check_request(req: GenRequest, service: Any) -> GenRequest:
    """``req.check`` with the service's limits, as a 400 naming the field."""
    try:
        return req.check(service.settings.max_tokens_limit)
    except RequestError as e:
        raise ApiError(str(e), param=e.param) from None


class Gate:
    """At most ``limit`` HTTP requests in flight (0: no limit); counted on the event loop, from
    the moment one is accepted until its last chunk arrives."""

    def __init__(self, limit: int):
        self.limit, self.n = limit, 0

    def enter(self) -> None:
        if self.limit and self.n >= self.limit:
            raise ApiError(f"server busy: {self.limit} requests in flight (max_queued_requests);"
                           f" retry in {RETRY_AFTER_S} s", 429, kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.n += 1

    def leave(self) -> None:
        self.n -= 1


class Run:
    """One request on the service; iterate ``chunks()`` or ``collect()`` it."""

    def __init__(self, service: Any, req: GenRequest, gate: Gate):
        self.service, self.req, self.gate = service, req, gate
        self._chunks: asyncio.Queue = asyncio.Queue()
        self.finished = False

    async def start(self) -> Run:
        """Check, tokenize (on a worker thread) and queue the request; an invalid one is a 400,
        a full queue a 429, a stopping daemon a 503."""
        self.gate.enter()
        loop = asyncio.get_running_loop()

        def arrive(chunk: Any) -> None:  # event loop
            if chunk.finish_reason is not None:
                self.gate.leave()
            self._chunks.put_nowait(chunk)

        def on_chunk(chunk: Any) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(arrive, chunk)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass

        try:
            await asyncio.to_thread(self.service.submit, self.req, on_chunk)
        except BaseException as e:
            self.gate.leave()
            if isinstance(e, RequestError):
                raise ApiError(str(e), param=e.param) from None
            if isinstance(e, ValueError):
                raise ApiError(str(e)) from None
            if isinstance(e, RuntimeError):  # ServiceStopping
                raise ApiError(str(e), 503, kind="server_error") from None
            raise
        return self

    async def chunks(self) -> AsyncIterator[Any]:
        """The chunks up to the last (``finish_reason`` set); an error or cancellation raises
        ``ApiError``. Leaving early cancels the request."""
        try:
            while True:
                chunk = await self._chunks.get()
                if chunk.finish_reason is not None:
                    self.finished = True
                    raise_for(chunk)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if not self.finished:  # the client went away (starlette cancels us), or we stopped
                self.service.cancel(self.req.id)

    async def collect(self, request: Request) -> tuple[str, list[int], Any, list[dict]]:
        """(text, token ids, last chunk, logprobs) of the whole request; a client that
        disconnects meanwhile cancels it."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.service, self.req.id))
        text, ids, lps, last = [], [], [], None
        try:
            async for chunk in self.chunks():
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                lps.extend(chunk.logprobs or ())
                last = chunk
        finally:
            watcher.cancel()
        return "".join(text), ids, last, lps


async def _cancel_on_disconnect(request: Request, service: Any, req_id: str) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            service.cancel(req_id)
            return


def raise_for(chunk: Any) -> None:
    if chunk.finish_reason == "error":
        raise ApiError(f"generation failed: {public_error(chunk.error or 'engine error')}", 500,
                       kind="server_error")
    if chunk.finish_reason == "cancelled":
        raise ApiError("request cancelled (the server is stopping)", 503, kind="server_error")


def usage_of(last: Any, n: int) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of a finished request."""
    stats = last.stats or {}
    return int(stats.get("prompt_tokens") or 0), int(stats.get("generation_tokens") or n)


def sse(obj: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n"


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
