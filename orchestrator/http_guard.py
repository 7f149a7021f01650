"""Who may talk to the HTTP API: the API key, the Host and Origin headers, the bound address.

A web page the user visits can send requests to a server on loopback: a cross-site ``fetch``
(the browser sends ``Origin``) or, through DNS rebinding, a request whose ``Host`` is the
attacker's name. So every request's ``Host`` must name the bound address or a loopback name
(unless the server listens on every address, where clients use names we cannot know and the
API key guards it), and a request with an ``Origin`` is refused unless that origin was allowed
(``--allow-origin``), which then also gets CORS headers and preflight answers.
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from starlette.requests import Request

from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.http_common import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_WILDCARDS = {"0.0.0.0", "::", ""}
_CORS_HEADERS = "Authorization, Content-Type, x-api-key, anthropic-version"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, allow_public: bool) -> str | None:
    """Refuse an empty key, and a non-loopback address without a key unless ``allow_public``
    (then return the warning to print). Raises ``FlashMoeError`` with the reason."""
    if api_key is not None and not api_key.strip():
        raise FlashMoeError("--api-key is empty (leave it out to serve loopback without a key)")
    if is_loopback(host) or api_key:
        return None
    if not allow_public:
        raise FlashMoeError(f"--http {host} is reachable beyond this machine and no --api-key is "
                         "set; add --api-key KEY, or --allow-public to serve it without one")
    return (f"warning: serving HTTP on {host} without an API key: anyone who can reach this "
            "address can use the model")


def _host_name(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware in front of the app: Host and Origin checks, CORS for allowed origins."""

    def __init__(self, app, host: str, origins: list[str] | None = None):
        self.app = app
        self.any_host = host in _WILDCARDS
        self.hosts = LOOPBACK_NAMES | {host.lower()}
        self.origins = {o.rstrip("/") for o in origins or ()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", "").strip().lower())
        if not self.any_host and host not in self.hosts:
            return await _refuse(send, 421, f"Host {host!r} is not this server's address "
                                 "(a DNS rebinding request?)")
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        if origin.rstrip("/") not in self.origins and "*" not in self.origins:
            return await _refuse(send, 403, f"cross-origin request from {origin!r} refused "
                                 "(allow it with --allow-origin)")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", _CORS_HEADERS.encode()),
                (b"access-control-max-age", b"600")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        return await self.app(scope, receive, send_cors)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": "forbidden"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def check_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries the key: ``Authorization: Bearer KEY`` (OpenAI, Ollama)
    or ``x-api-key: KEY`` (Anthropic)."""
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    alt = request.headers.get("x-api-key")
    want = f"Bearer {api_key}"
    if hmac.compare_digest(given.encode(), want.encode()) or (
            alt is not None and hmac.compare_digest(alt.encode(), api_key.encode())):
        return
    raise ApiError("invalid or missing API key (Authorization: Bearer KEY)", 401,
                   code="invalid_api_key", kind="authentication_error")


