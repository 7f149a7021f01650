"""Ollama's API on the same server: ``POST /api/chat``, ``POST /api/generate`` (NDJSON streamed,
Ollama's default, or one object with ``"stream": false``), ``GET /api/tags``, ``POST
/api/show``, ``GET /api/ps``, ``GET /api/version``.

Ollama's names: ``options.num_predict`` (absent or negative: until the model stops, within
``max_tokens_limit``), ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``.
Sampling is greedy unless asked, as on the other routes. ``generate`` renders ``prompt`` (and
``system``) with the chat template, as Ollama does, unless ``raw``. Options that only tune
Ollama's own runtime (``num_ctx``, ``num_thread``, ...) and ``keep_alive`` change nothing here
and are accepted; options that would change the output are refused by name.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashmoe import __version__
from flashmoe.orchestrator.http_common import (
    STREAM_HEADERS,
    ApiError,
    Run,
    check_request,
    message_objects,
    usage_of,
)
from flashmoe.orchestrator.http_tools import ToolCalls
from flashmoe.protocol.request import Request as GenRequest

_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p",
            "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop"}
_RUNTIME = {"num_ctx", "num_thread", "num_gpu", "num_batch", "main_gpu", "use_mmap", "low_vram",
            "vocab_only", "use_mlock", "numa", "num_keep"}
_CHAT = {"model", "messages", "tools", "stream", "options", "keep_alive", "format", "think",
         "logprobs", "top_logprobs"}
_GENERATE = {"model", "prompt", "system", "raw", "stream", "options", "keep_alive", "format",
             "think", "images", "logprobs", "top_logprobs"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _fields(body: dict, accepted: set, limit: int) -> dict:
    bad = sorted(k for k, v in body.items() if k not in accepted and v is not None)
    bad += [k for k in ("format", "think", "images") if body.get(k) not in (None, "", False, [])]
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise ApiError("'options' must be an object", param="options")
    bad += sorted(f"options.{k}" for k in opts if k not in _OPTIONS and k not in _RUNTIME)
    if bad:
        raise ApiError(f"unsupported parameter(s): {', '.join(bad)}", param=bad[0])
    out = {_OPTIONS[k]: v for k, v in opts.items() if k in _OPTIONS and v is not None}
    n = out.get("max_tokens")
    if n is None or (type(n) is int and n < 0):  # Ollama's "until it stops"
        out["max_tokens"] = limit
    if body.get("logprobs") is not None:
        out["logprobs"] = body["logprobs"]
    if body.get("top_logprobs") is not None:
        out["top_logprobs"] = body["top_logprobs"]
    return out


def _stream_flag(body: dict) -> bool:
    v = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(v, bool):
        raise ApiError("'stream' must be a boolean", param="stream")
    return v


def _messages(body: dict) -> list[dict]:
    out = []
    for m in message_objects(body):
        if m.get("images"):
            raise ApiError("images are not supported", param="messages")
        m = {k: v for k, v in m.items() if v is not None and k not in ("images", "thinking")}
        if "tool_name" in m:
            m["name"] = m.pop("tool_name")
        out.append(m)
    return out


class Ollama:
    def __init__(self, app: Any):
        self.app = app

    def routes(self) -> list[Route]:
        return [Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/tags", self.tags), Route("/api/ps", self.ps),
                Route("/api/show", self.show, methods=["POST"]),
                Route("/api/version", self.version)]

    def _model(self) -> dict:
        svc = self.app.service
        engine = svc.engine
        store = getattr(engine, "store", None)
        config = getattr(store, "config", {}) or {}
        quant = getattr(store, "quantization", None) or {}
        details = {"parent_model": "", "format": "safetensors",
                   "family": str(config.get("model_type", "")),
                   "families": [str(config.get("model_type", ""))],
                   "parameter_size": "", "quantization_level":
                       f"Q{quant['bits']}" if isinstance(quant, dict) and "bits" in quant
                       else str(getattr(engine, "compute_dtype", "")).split(".")[-1].upper()}
        size = int(getattr(engine, "dense_bytes", 0) or 0) + int(getattr(engine, "budget", 0) or 0)
        return {"name": svc.model_name, "model": svc.model_name, "modified_at": _now(),
                "size": size, "digest": "", "details": details}

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def tags(self, request: Request) -> Response:
        self.app.auth(request)
        return JSONResponse({"models": [self._model()]})

    async def ps(self, request: Request) -> Response:
        self.app.auth(request)
        m = self._model()
        m.update(expires_at="9999-12-31T23:59:59Z", size_vram=0)
        return JSONResponse({"models": [m]})

    async def show(self, request: Request) -> Response:
        body = await self.app.body(request, model_field=None)
        self.app.check_model(body.get("model", body.get("name")), "name")
        m = self._model()
        tok = self.app.tokenizer()
        caps = ["completion"] + (["tools"] if getattr(tok, "has_tool_calling", False) else [])
        template = getattr(tok, "chat_template", None)
        config = getattr(getattr(self.app.service.engine, "store", None), "config", {}) or {}
        info = {f"general.{k}": v for k, v in config.items() if isinstance(v, (int, float, str))}
        return JSONResponse({"modelfile": "", "parameters": "", "license": "",
                             "template": template if isinstance(template, str) else "",
                             "details": m["details"], "model_info": info,
                             "capabilities": caps, "modified_at": m["modified_at"]})

    async def chat(self, request: Request) -> Response:
        body = await self.app.body(request)
        limit = self.app.service.settings.max_tokens_limit
        fields = _fields(body, _CHAT, limit)
        tools = ToolCalls.for_request(self.app.tokenizer(), body)
        fields.update(messages=_messages(body), tools=tools.tools if tools else None)
        return await self._run(request, body, fields, chat=True, tools=tools)

    async def generate(self, request: Request) -> Response:
        body = await self.app.body(request)
        fields = _fields(body, _GENERATE, self.app.service.settings.max_tokens_limit)
        prompt, system = body.get("prompt"), body.get("system")
        if not isinstance(prompt, str) or not (system is None or isinstance(system, str)):
            raise ApiError("'prompt' (and 'system') must be strings", param="prompt")
        if prompt == "":  # Ollama's "load the model" request
            return JSONResponse({"model": self.app.service.model_name, "created_at": _now(),
                                 "response": "", "done": True, "done_reason": "load"})
        if body.get("raw"):
            fields["prompt"] = prompt
        else:
            fields["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
        return await self._run(request, body, fields, chat=False)

    async def _run(self, request: Request, body: dict, fields: dict, chat: bool,
                   tools: ToolCalls | None = None) -> Response:
        req = check_request(GenRequest(id=f"ollama-{id(request):x}-{time.monotonic_ns()}",
                                       **fields), self.app.service)
        t0 = time.perf_counter_ns()
        run = await self.app.run(req).start()
        if _stream_flag(body):
            return StreamingResponse(self._lines(run, chat, tools, t0),
                                     media_type="application/x-ndjson", headers=STREAM_HEADERS)
        text, ids, last, lps = await run.collect(request)
        return JSONResponse(self._piece(chat, text, lps, last, len(ids), t0, tools))

    def _piece(self, chat: bool, text: str, lps: list[dict] | None, last: Any = None,
               n: int = 0, t0: int = 0, tools: ToolCalls | None = None) -> dict:
        out: dict = {"model": self.app.service.model_name, "created_at": _now()}
        calls = []
        if last is not None and tools:
            calls, text = tools.parse(text)
        if chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = [
                    {"function": {"name": c["function"]["name"],
                                  "arguments": json.loads(c["function"]["arguments"])}}
                    for c in calls]
        else:
            out["response"] = text
        if lps:
            tt = self.app.token_text
            out["logprobs"] = [{"token": tt(e["token"]), "logprob": e["logprob"],
                                "top_logprobs": [{"token": tt(t), "logprob": lp}
                                                 for t, lp in e.get("top", ())]} for e in lps]
        out["done"] = last is not None
        if last is not None:
            prompt, gen = usage_of(last, n)
            stats = last.stats or {}
            ttft = int(float(stats.get("time_to_first_token_s") or 0) * 1e9)
            total = time.perf_counter_ns() - t0
            out.update(done_reason=last.finish_reason, total_duration=total, load_duration=0,
                       prompt_eval_count=prompt, prompt_eval_duration=ttft, eval_count=gen,
                       eval_duration=max(0, total - ttft))
        return out

    async def _lines(self, run: Run, chat: bool, tools: ToolCalls | None,
                     t0: int) -> AsyncIterator[str]:
        n, held = 0, []
        try:
            async for chunk in run.chunks():
                n += len(chunk.token_ids)
                if tools:
                    held.append(chunk.text)
                elif chunk.text or chunk.logprobs:
                    yield json.dumps(self._piece(chat, chunk.text, chunk.logprobs)) + "\n"
                if chunk.finish_reason is not None:
                    text = "".join(held)
                    yield json.dumps(self._piece(chat, text, None, chunk, n, t0, tools)) + "\n"
        except ApiError as e:
            yield json.dumps({"error": str(e)}) + "\n"
