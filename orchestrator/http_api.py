"""The HTTP API of ``flashmoe-daemon`` (starlette, served by uvicorn in a thread), in three
dialects on one server: OpenAI (``http_openai``), Ollama (``http_ollama``) and Anthropic Messages
(``http_anthropic``), plus ``GET /health`` and ``GET /metrics`` (Prometheus text).

With an API key, every route but ``/health`` wants it (``Authorization: Bearer KEY``, or
``x-api-key`` as Anthropic's clients send it). ``http_guard`` checks ``Host`` and ``Origin``
before any route runs; bodies must be ``application/json`` and are checked before anything
reaches the engine: every malformed request gets a 4xx JSON error in its dialect's shape.
Handlers talk to the daemon's ``Service`` directly; a client that disconnects has its request
cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flashmoe.orchestrator.http_anthropic import Anthropic
from flashmoe.orchestrator.http_common import ApiError, Gate, Run, read_json
from flashmoe.orchestrator.http_guard import Guard, check_key
from flashmoe.orchestrator.http_ollama import Ollama
from flashmoe.orchestrator.http_openai import OpenAI

log = logging.getLogger("flashmoe.http")


class App:
    """What the dialects share: the service, the key check, the body reader, the tokenizer."""

    def __init__(self, service: Any, api_key: str | None):
        self.service = service
        self.api_key = api_key
        self.gate = Gate(int(getattr(service.settings, "max_queued_requests", 0) or 0))

    def run(self, req: Any) -> Run:
        """``req`` (checked) as a run on the service, within the in-flight limit."""
        return Run(self.service, req, self.gate)

    def auth(self, request: Request) -> None:
        check_key(request, self.api_key)

    async def body(self, request: Request, model_field: str | None = "model") -> dict:
        """The checked JSON body; ``model_field`` must name the served model (if given)."""
        self.auth(request)
        body = await read_json(request, self.service.settings.max_message_bytes)
        if model_field is not None:
            self.check_model(body.get(model_field), model_field)
        return body

    def check_model(self, model: Any, field: str = "model") -> None:
        if not isinstance(model, str):
            raise ApiError(f"'{field}' must be a string", param=field)
        if model != self.service.model_name:
            raise ApiError(
                f"model {model!r} does not exist; this server serves {self.service.model_name!r}",
                404 if field == "name" else 400, param=field, code="model_not_found")

    def tokenizer(self) -> Any:
        return getattr(self.service.engine, "tokenizer", None)

    def token_text(self, token: int) -> str:
        tok = self.tokenizer()
        return tok.decode([token]) if tok is not None else str(token)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.service.model_name})

    async def metrics(self, request: Request) -> Response:
        self.auth(request)
        return Response(prometheus(self.service.status()), media_type="text/plain; version=0.0.4")


def _dialect(path: str) -> str:
    if path.startswith("/api/"):
        return "ollama"
    return "anthropic" if path.startswith("/v1/messages") else "openai"


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
    ("prefix_tokens_reused_total", "counter", "Prompt tokens taken from the prefix cache.",
     ("prefix_tokens_reused",)),
    ("prefix_cache_entries", "gauge", "Sequences in the prefix cache.", ("prefix_cache_entries",)),
    ("prefix_cache_bytes", "gauge", "Bytes of KV cache in the prefix cache.",
     ("prefix_cache_bytes",)),
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


def create_app(service: Any, api_key: str | None = None, host: str = "127.0.0.1",
               allow_origins: list[str] | None = None) -> Guard:
    """The ASGI app serving ``service`` (the daemon's ``Service``) on ``host``: the routes of
    every dialect behind the Host/Origin guard."""
    app = App(service, api_key)

    async def api_error(request: Request, exc: Exception) -> Response:
        return exc.response(_dialect(request.url.path))  # type: ignore[attr-defined]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.detail, exc.status_code).response(_dialect(request.url.path))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        err = ApiError(f"internal error: {type(exc).__name__}", 500, kind="server_error")
        return err.response(_dialect(request.url.path))

    routes = [Route("/health", app.health), Route("/metrics", app.metrics),
              *OpenAI(app).routes(), *Ollama(app).routes(), *Anthropic(app).routes()]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Guard(Starlette(routes=routes, exception_handlers=handlers), host, allow_origins)


class HttpServer:
    """uvicorn serving an app in a daemon thread of this process (signals stay with the daemon)."""

    def __init__(self, app: Any, host: str, port: int):
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
