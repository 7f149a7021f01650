"""Malformed input: thousands of random and mutated messages on the daemon's socket, hundreds of
malformed HTTP requests. Each gets an error answer where the framing allows, the daemon never
dies, its memory stays flat, and a correct request afterwards gets the same token ids."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import msgpack
import pytest
from support import CHAT, MAX_TOKENS, PROMPTS, Daemon, free_port, rss, scratch_dir

from flashmoe.orchestrator.lifecycle import parse_http
from flashmoe.protocol import sockets
from flashmoe.protocol.messages import (
    CLIENT_ACCEPTS,
    DAEMON_ACCEPTS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Cancel,
    Error,
    Generate,
    ProtocolError,
    Shutdown,
    StatusReply,
    StatusRequest,
    decode,
    encode,
)

KEY = "sk-fuzz"
IPC_CASES = 3000
HTTP_CASES = 400
RSS_SLACK = 50 * 2**20


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    top = scratch_dir()
    port = free_port()
    d = Daemon(tiny_model, "--http", str(port), "--api-key", KEY, sock=top / "d.sock")
    st = d.wait_ready()
    d.url = st["http"]
    yield d
    d.close()
    shutil.rmtree(top, ignore_errors=True)


def test_access(server: Daemon) -> None:
    """Socket 0600 (its runtime directory 0700: test_faults), HTTP on loopback when --http
    gives only a port, the API key wanted everywhere but /health."""
    assert server.socket.stat().st_mode & 0o777 == 0o600
    assert server.url.startswith("http://127.0.0.1:")
    assert parse_http("8000") == ("127.0.0.1", 8000) and parse_http(":8000")[0] == "127.0.0.1"
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            assert http.get(path).status_code in (401, 404), path
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200


# -- the IPC socket ---------------------------------------------------------------------------


def _valid(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(4)
    if kind == 0:
        return encode(StatusRequest())
    if kind == 1:
        return encode(Cancel(id=f"c{rng.randrange(100)}"))
    if kind == 2:
        return encode(Generate(id="g", messages=CHAT, max_tokens=3))
    return encode(Generate(id="g", prompt=PROMPTS[0], max_tokens=3, temperature=0.5, seed=3))


_JUNK = [None, True, -1, 2**64, 1.5, float("nan"), "", "x" * 300, b"\x00\xff", [], {}, [1, "a"],
         {"role": "user"}, {1: 2}]  # fmt: skip


def _structured(rng: random.Random) -> list[bytes]:
    """A msgpack map for a real tag with wrong, missing or extra fields, or a wrong version."""
    tag = rng.choice([Generate.TAG, StatusRequest.TAG, Cancel.TAG, Shutdown.TAG, 0, 99, 255])
    fields = {"v": PROTOCOL_VERSION, "id": "s", "prompt": "hi", "messages": None,
              "max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
              "seed": None, "stream": False}  # fmt: skip
    what = rng.randrange(4)
    if what == 0:
        fields[rng.choice(list(fields))] = rng.choice(_JUNK)
    elif what == 1:
        del fields[rng.choice(list(fields))]
    elif what == 2:
        fields[rng.choice(["extra", "", "v2"])] = rng.choice(_JUNK)
    else:
        fields["v"] = rng.choice([0, 2, -1, "1", None, 1.0])
    try:
        payload = msgpack.packb(fields, use_bin_type=True, strict_types=False)
    except (ValueError, OverflowError, TypeError):
        payload = b"\xc1"
    return [bytes([tag]), payload]


def _mutated(rng: random.Random) -> list[bytes]:
    frames = [bytearray(f) for f in _valid(rng)]
    for _ in range(rng.randint(1, 4)):
        f = frames[rng.randrange(len(frames))]
        op = rng.randrange(4)
        if op == 0 and f:
            f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
        elif op == 1:
            del f[rng.randrange(len(f) + 1) :]
        elif op == 2:
            f[rng.randrange(len(f) + 1) : 0] = rng.randbytes(rng.randint(1, 8))
        elif f:
            f[rng.randrange(len(f))] = rng.randrange(256)
    return [bytes(f) for f in frames]


def _huge_lengths(rng: random.Random) -> list[bytes]:
    """msgpack headers that announce far more than the frame holds."""
    head = rng.choice([b"\xdb\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                       b"\xc6\xff\xff\xff\xf0", b"\x81\xa2id\xdb\x10\x00\x00\x00"])  # fmt: skip
    return [bytes([Generate.TAG]), head + rng.randbytes(rng.randint(0, 16))]


def _frames(rng: random.Random) -> list[bytes]:
    n = rng.randrange(6)
    if n == 0:
        return _mutated(rng)
    if n == 1:
        return _structured(rng)
    if n == 2:
        return _huge_lengths(rng)
    if n == 3:  # wrong frame counts
        return [rng.randbytes(rng.randint(0, 4)) for _ in range(rng.choice([1, 3, 4, 7]))]
    return [rng.randbytes(rng.randint(0, 3)), rng.randbytes(rng.randint(0, 64))]


def _invalid_requests() -> list[Generate]:
    """Well-formed messages the engine must refuse (not the protocol)."""
    return [
        Generate(id="e1", prompt=""),
        Generate(id="e2", messages=[]),
        Generate(id="e3", messages=[{"role": "robot", "content": "hi"}]),
        Generate(id="e4", prompt="hi", max_tokens=10**6),
        Generate(id="e5", prompt="hi", top_p=0.0),
    ]


def expected(frames: list[bytes]) -> tuple[str, object]:
    """What the daemon must answer: ("error", code), ("status", None) or ("skip", None)."""
    try:
        msg = decode(frames, DAEMON_ACCEPTS, MAX_MESSAGE_BYTES)
    except ProtocolError as e:
        return "error", e.code
    return ("status", None) if type(msg) is StatusRequest else ("skip", None)


def _ask(sock, frames: list[bytes]):
    sock.send_multipart(frames)
    got = sockets.recv_with_timeout(sock, 10)
    assert got is not None, f"no answer to {frames!r}"
    return decode(got, CLIENT_ACCEPTS)


def test_ipc_fuzz(server: Daemon, reference: dict) -> None:
    rng = random.Random(1234)
    ids = reference[PROMPTS[0]][0]
    pid = server.proc.pid
    sock = sockets.dealer(server.paths.endpoint)
    counts = {"error": 0, "status": 0, "skip": 0}
    try:
        with server.client() as c:
            assert c.generate(PROMPTS[0], max_tokens=MAX_TOKENS).token_ids == ids
        for i in range(IPC_CASES):
            if i == IPC_CASES // 10:
                rss0 = rss(pid)
            frames = _frames(rng)
            kind, code = expected(frames)
            counts[kind] += 1
            if kind == "skip":  # a valid message by chance: a Generate would really run
                continue
            reply = _ask(sock, frames)
            if kind == "status":
                assert type(reply) is StatusReply
            else:
                assert type(reply) is Error and reply.id is None and reply.code == code, (
                    frames,
                    reply,
                )
        for msg in _invalid_requests():
            reply = _ask(sock, encode(msg))
            assert type(reply) is Error and reply.id == msg.id, reply
            assert reply.code == "invalid_request", reply
        # Over zmq's own size limit: the peer is cut off, no answer; the daemon goes on.
        sock.send_multipart([bytes([Generate.TAG]), b"\x00" * (MAX_MESSAGE_BYTES + 4096)])
        assert sockets.recv_with_timeout(sock, 1) is None
    finally:
        sock.close(linger=0)
    grew = rss(pid) - rss0
    print(f"ipc fuzz: {counts}, daemon RSS {rss0 / 2**20:.1f} -> {rss(pid) / 2**20:.1f} MiB")
    assert server.proc.poll() is None
    assert counts["error"] > IPC_CASES * 0.8
    assert grew < RSS_SLACK, grew
    with server.client() as c:
        assert c.generate(PROMPTS[0], max_tokens=MAX_TOKENS).token_ids == ids
        assert c.status()["requests_running"] == 0


# -- HTTP ---------------------------------------------------------------------------------------

_BAD_FIELDS = {
    "model": [None, 3, ["m"], "gpt-4", ""],
    "messages": ["hi", [], [1], [{"role": "user"}], [{"role": 1, "content": "x"}],
                 [{"role": "robot", "content": "x"}], [{"role": "user", "content": [{"a": 1}]}],
                 {"role": "user"}],
    "max_tokens": ["10", -1, 0, 10**12, 1.5, True, [3]],
    "temperature": [-0.5, "hot", True, 1e9, [0]],
    "top_p": [2, -1, "1", 0.0],
    "top_k": [-1, 2.5, "3", 2**40],
    "min_p": [-0.1, 1.5, "0"],
    "seed": [-1, 2**70, 1.5, "s"],
    "n": [2, 0, "1"],
    "stop": [[""], 3, ["x"] * 17],
    "stream": ["yes", 1, {}],
    "stream_options": ["x", {"include_usage": "yes"}],
}  # fmt: skip
_BAD_PROMPTS = [3, [], [1, "a"], [[1], [2]], [10**9], [-1], {"p": 1}, None, ""]
_NON_FINITE = [b'{"model": "M", "prompt": "x", "temperature": NaN}',
               b'{"model": "M", "prompt": "x", "top_p": Infinity}',
               b'{"model": "M", "prompt": "x", "max_tokens": 1e400}']  # fmt: skip


_JSON = {"Content-Type": "application/json"}


def _http_case(rng: random.Random, name: str) -> tuple[str, str, dict]:
    """(method, path, httpx kwargs) of a request that must get a 4xx."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"model": name, "max_tokens": 2}
    body.update({"messages": CHAT} if chat else {"prompt": PROMPTS[0]})
    what = rng.randrange(10)
    if what < 5:
        names = sorted(n for n in _BAD_FIELDS if chat or n != "messages")  # ignored there
        for field in rng.sample(names, rng.randint(1, 2)):
            body[field] = rng.choice(_BAD_FIELDS[field])
        return "POST", path, {"json": body}
    if what == 5:
        body.pop("messages", None)
        body["prompt"] = rng.choice(_BAD_PROMPTS)
        return "POST", "/v1/completions", {"json": body}
    if what == 6:
        raw = json.dumps(body).encode()
        cut = raw[: rng.randrange(len(raw))] + rng.randbytes(rng.randint(0, 4))
        raw = rng.choice([cut, rng.randbytes(20), b"", b"[]", b"1", b"[" * 10**5])
        return "POST", path, {"content": raw, "headers": _JSON}
    if what == 7:
        raw = rng.choice(_NON_FINITE).replace(b'"M"', json.dumps(name).encode())
        return "POST", "/v1/completions", {"content": raw, "headers": _JSON}
    if what == 8:
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        return method, rng.choice([path, "/v1/models/x", "/v2/chat", "/../etc", "/%00"]), {}
    return "POST", path, {"json": body, "headers": {"Authorization": rng.choice(["", "Bearer x"])}}


def test_http_fuzz(server: Daemon, reference: dict) -> None:
    rng = random.Random(99)
    name = reference["name"]
    ids, text = reference["chat"]
    pid = server.proc.pid
    seen: dict[int, int] = {}
    hdr = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=hdr) as http:
        for i in range(HTTP_CASES):
            if i == HTTP_CASES // 10:
                rss0 = rss(pid)
            method, path, kw = _http_case(rng, name)
            r = http.request(method, path, **kw)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert 400 <= r.status_code < 500, (method, path, kw, r.status_code, r.text)
            if r.status_code in (400, 401, 413):
                err = r.json()["error"]
                assert err["message"] and err["type"], r.text
        for _ in range(3):  # huge bodies, declared or not
            big = b"{" + b" " * (MAX_MESSAGE_BYTES + 10) + b"}"
            assert http.post("/v1/completions", content=big).status_code == 413
        grew = rss(pid) - rss0
        print(f"http fuzz: {dict(sorted(seen.items()))}, daemon RSS "
              f"{rss0 / 2**20:.1f} -> {rss(pid) / 2**20:.1f} MiB")  # fmt: skip
        assert server.proc.poll() is None
        assert grew < RSS_SLACK, grew
        body = {"model": name, "messages": CHAT, "max_tokens": MAX_TOKENS}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
    with server.client() as c:
        assert c.chat(CHAT, max_tokens=MAX_TOKENS).token_ids == ids
