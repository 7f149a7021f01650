"""The OpenAI-compatible HTTP API of ``flashmoe-daemon`` (starlette, served by uvicorn in a thread).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (Server-Sent Events with
``"stream": true``, one JSON object otherwise), ``GET /v1/models``, ``GET /health``, ``GET
/metrics`` (Prometheus text). With an API key, every route but ``/health`` wants ``Authorization:
Bearer KEY``. Bodies are checked here, before anything reaches the engine: a bad one gets a 400
with an OpenAI-style ``{"error": {...}}``. Sampling defaults to greedy (``temperature`` 0), like
the client library; ``top_k`` and ``min_p`` are accepted as extensions.

Handlers talk to the daemon's ``Service`` directly: a request's chunks come back on the engine
thread and are handed to the event loop with ``call_soon_threadsafe``. A client that disconnects
has its request cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashmoe.orchestrator.service import public_error

DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# -- body checks ----------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"'{name}' must be a number", param=name)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ApiError(f"'{name}' must be in [{lo:g}, {hi:g}], got {v}", param=name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer", param=name)
    if not lo <= v <= hi:
        raise ApiError(f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
    return v


def _content(v: Any, i: int) -> str:
    if isinstance(v, str):
        return v
    # The list form: [{"type": "text", "text": "..."}, ...]; only text parts are supported.
    if isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in v
    ):
        return "".join(p["text"] for p in v)
    raise ApiError(
        f"messages[{i}].content must be a string or a list of text parts", param="messages"
    )


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(
                f"messages[{i}] must be an object with a string 'role'", param="messages"
            )
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p)):
        return p
    raise ApiError(
        "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt"
    )


def _sampling(body: dict, max_tokens_limit: int) -> dict:
    if _integer(body, "n", 1, 1, 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    if body.get("stop") not in (None, "", []):
        raise ApiError("stop sequences are not supported", param="stop")
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    return {
        "max_tokens": _integer(body, name, DEFAULT_MAX_TOKENS, 1, max_tokens_limit),
        "temperature": _number(body, "temperature", 0.0, 0.0, 100.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": _integer(body, "top_k", 0, 0, 2**31 - 1),
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "seed": _integer(body, "seed", None, 0, 2**63 - 1),
    }


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be a boolean", param=name)
    return v


# -- the app ------------------------------------------------------------------------------------


class _Api:
    def __init__(self, service: Any, api_key: str | None):
        self.service = service
        self.api_key = api_key
        self.created = int(time.time())

    def _auth(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(
                "invalid or missing API key (Authorization: Bearer KEY)",
                401,
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        limit = self.service.settings.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refuse before reading it
            raise ApiError(f"request body over {limit} bytes", 413)
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(f"request body over {limit} bytes", 413)
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError("'model' must be a string", param="model")
        if model != self.service.model_name:
            raise ApiError(
                f"model {model!r} does not exist; this server serves {self.service.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return body

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.service.model_name})

    async def models(self, request: Request) -> Response:
        self._auth(request)
        card = {
            "id": self.service.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "flashmoe",
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: Request) -> Response:
        self._auth(request)
        return Response(prometheus(self.service.status()), media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        fields = {"messages": _messages(body)}
        return await self._complete(request, body, fields, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        return await self._complete(request, body, {"prompt": _prompt(body)}, chat=False)

    async def _complete(self, request: Request, body: dict, fields: dict, chat: bool) -> Response:
        from flashmoe.orchestrator.service import new_request

        fields.update(_sampling(body, self.service.settings.max_tokens_limit))
        stream = _flag(body, "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options")
        usage = _flag(opts, "include_usage")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = new_request(id=rid, **fields)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def on_chunk(chunk: Any) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass

        try:
            self.service.submit(req, on_chunk)
        except ValueError as e:
            raise ApiError(str(e)) from None
        except RuntimeError as e:  # ServiceStopping
            raise ApiError(str(e), 503, kind="server_error") from None
        reply = _Reply(rid, self.service.model_name, chat)
        if stream:
            events = self._events(reply, chunks, req.id, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.service, req.id))
        try:
            text, ids, last = [], [], None
            while last is None:
                chunk = await chunks.get()
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    last = chunk
        finally:
            watcher.cancel()
            if last is None:
                self.service.cancel(req.id)
        _raise_for(last)
        return JSONResponse(reply.whole("".join(text), last, len(ids)))

    async def _events(
        self, reply: _Reply, chunks: asyncio.Queue, req_id: str, usage: bool
    ) -> AsyncIterator[str]:
        finished = False
        n = 0
        try:
            if reply.chat:
                yield _sse(reply.piece({"role": "assistant", "content": ""}, None))
            while True:
                chunk = await chunks.get()
                n += len(chunk.token_ids)
                if chunk.finish_reason in ("error", "cancelled"):
                    finished = True
                    try:
                        _raise_for(chunk)
                    except ApiError as e:
                        yield _sse({"error": json.loads(e.response().body)["error"]})
                    break
                if chunk.text:
                    delta = {"content": chunk.text} if reply.chat else chunk.text
                    yield _sse(reply.piece(delta, None))
                if chunk.finish_reason is not None:
                    finished = True
                    yield _sse(reply.piece({} if reply.chat else "", chunk.finish_reason))
                    if usage:
                        yield _sse(reply.usage_piece(chunk, n))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (starlette cancels us) or the server stops
                self.service.cancel(req_id)


async def _cancel_on_disconnect(request: Request, service: Any, req_id: str) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            service.cancel(req_id)
            return


def _raise_for(chunk: Any) -> None:
    if chunk.finish_reason == "error":
        raise ApiError(
            f"generation failed: {public_error(chunk.error or 'engine error')}", 500,
            kind="server_error",
        )
    if chunk.finish_reason == "cancelled":
        raise ApiError("request cancelled (the server is stopping)", 503, kind="server_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Reply:
    """OpenAI response shapes for one request."""

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat = rid, model, chat
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(last: Any, n: int) -> dict:
        stats = last.stats or {}
        prompt = int(stats.get("prompt_tokens") or 0)
        completion = int(stats.get("generation_tokens") or n)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def whole(self, text: str, last: Any, n: int) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
            out = self._head("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
            out = self._head("text_completion")
        out.update(choices=[choice], usage=self._usage(last, n))
        return out

    def piece(self, delta: dict | str, finish_reason: str | None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        return out

    def usage_piece(self, last: Any, n: int) -> dict:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=self._usage(last, n))
        return out


def _find(status: dict, *names: str) -> Any:
    """The first of ``names`` in ``status`` or in one of its nested maps (``pool``, ...)."""
    maps = [status] + [v for v in status.values() if isinstance(v, dict)]
    for name in names:
        for m in maps:
            if isinstance(m.get(name), (int, float)) and not isinstance(m.get(name), bool):
                return m[name]
    return None


_METRICS = (
    ("requests_total", "counter", "Generation requests served.", ("requests_served",)),
    ("requests_cancelled_total", "counter", "Requests cancelled.", ("requests_cancelled",)),
    ("requests_failed_total", "counter", "Requests ended by an error.", ("requests_failed",)),
    ("requests_running", "gauge", "Generation requests in flight.", ("requests_running",)),
    ("tokens_generated_total", "counter", "Tokens generated.", ("tokens_generated",)),
    (
        "expert_hit_rate",
        "gauge",
        "Share of expert lookups served from the pool.",
        ("expert_hit_rate", "hit_rate"),
    ),
    ("bytes_read_total", "counter", "Expert bytes read from storage.", ("bytes_read",)),
    (
        "pool_bytes_used",
        "gauge",
        "Pool bytes holding experts.",
        ("pool_bytes_used", "bytes_used", "used_bytes"),
    ),
    (
        "pool_bytes",
        "gauge",
        "Pool size in bytes.",
        ("pool_bytes", "budget_bytes", "capacity_bytes"),
    ),
    (
        "decode_tokens_per_second",
        "gauge",
        "Decode speed of the last request.",
        ("decode_tokens_per_s", "tokens_per_s"),
    ),
    ("uptime_seconds", "gauge", "Seconds since the daemon started.", ("uptime_s",)),
    ("compute_lanes", "gauge", "Threads that decode concurrent requests.", ("lanes",)),
)


def prometheus(status: dict) -> str:
    """The daemon's status as Prometheus text exposition (metrics named ``flashmoe_*``)."""
    lines = []
    for name, kind, help_text, keys in _METRICS:
        value = _find(status, *keys)
        if value is None:
            continue
        lines += [
            f"# HELP flashmoe_{name} {help_text}",
            f"# TYPE flashmoe_{name} {kind}",
            f"flashmoe_{name} {value}",
        ]
    return "\n".join(lines) + "\n"


def create_app(service: Any, api_key: str | None = None) -> Starlette:
    """The starlette app serving ``service`` (the daemon's ``Service``)."""
    api = _Api(service, api_key)

    async def api_error(request: Request, exc: Exception) -> Response:
        return exc.response()  # type: ignore[attr-defined]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.detail, exc.status_code).response()

    routes = [
        Route("/health", api.health),
        Route("/metrics", api.metrics),
        Route("/v1/models", api.models),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error}
    return Starlette(routes=routes, exception_handlers=handlers)


class HttpServer:
    """uvicorn serving an app in a daemon thread of this process (signals stay with the daemon)."""

    def __init__(self, app: Starlette, host: str, port: int):
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; raise RuntimeError if uvicorn is not up within ``timeout`` seconds."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cannot serve HTTP on {self.url} (port in use?)")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let open responses end (5 s at most), then return."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
