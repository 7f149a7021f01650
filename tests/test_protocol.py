"""Messages: round trips, strict rejection of malformed input (only ProtocolError), sockets."""

import os
import random
import stat

import msgpack
import pytest

from flashmoe.protocol import messages as m
from flashmoe.protocol import sockets
from flashmoe.protocol.messages import ProtocolError, decode, encode

SAMPLES = [
    m.Hello(worker=3, pid=1234, version="0.1.0"),
    m.LoadRequest(7, 2, 5, [["/x/a.safetensors", 4096, 100, 0], ["/x/b", 1, 2, 128]], 0xDEADBEEF),
    m.LoadRequest(8, 3, 0, [], None, True),
    m.LoadDone(req=7, generation=2, slot=5, nbytes=228, us=1500),
    m.LoadFailed(req=7, generation=2, slot=5, error="short read: /x/a at offset 4196"),
    m.Shutdown(),
    m.Generate(id="r1", prompt="hello", max_tokens=16, temperature=0.7, seed=42, stream=False),
    m.Generate(id="r2", messages=[{"role": "user", "content": "hi"}], top_k=40, min_p=0.05),
    m.Token(id="r1", text=" world", ids=[1917]),
    m.Done(
        id="r1", text="x", ids=[1, 2], stats={"tok_s": 3.5, "n": [1, None]}, finish_reason="stop"
    ),
    m.Error(id=None, code="bad_request", message="unreadable"),
    m.Error(id="r1", code="cancelled", message=""),
    m.StatusRequest(),
    m.StatusReply(status={"workers": [{"pid": 1, "state": "ready"}], "ok": True}),
    m.Cancel(id="r1"),
    m.Generate(id="r3", prompt_ids=[1, 2, 3], max_tokens=4),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    frames = encode(msg)
    assert len(frames) == 2 and len(frames[0]) == 1
    assert decode(frames, m.ALL_TYPES) == msg


def test_every_type_has_a_sample_and_a_socket():
    assert {type(s) for s in SAMPLES} == set(m.ALL_TYPES)
    sockets_ = m.WORKER_ACCEPTS | m.COORDINATOR_ACCEPTS | m.DAEMON_ACCEPTS | m.CLIENT_ACCEPTS
    assert sockets_ == m.ALL_TYPES
    assert len({t.TAG for t in m.ALL_TYPES}) == len(m.ALL_TYPES)


def payload(msg) -> dict:
    return msgpack.unpackb(encode(msg)[1])


def frames_of(msg, **changes) -> list[bytes]:
    p = payload(msg)
    for k, v in changes.items():
        if v is KeyError:
            del p[k]
        else:
            p[k] = v
    return [bytes((msg.TAG,)), msgpack.packb(p)]


def code_of(frames, accept=m.ALL_TYPES, **kw) -> str:
    with pytest.raises(ProtocolError) as e:
        decode(frames, accept, **kw)
    return e.value.code


REQ = SAMPLES[1]


@pytest.mark.parametrize(
    "changes, code",
    [
        (dict(req=True), "bad_field"),  # bool is not an int
        (dict(req=-1), "bad_field"),
        (dict(req=1 << 63), "bad_field"),
        (dict(slot="3"), "bad_field"),
        (dict(direct=1), "bad_field"),
        (dict(checksum=1 << 32), "bad_field"),
        (dict(extents=[["/a", 0, 1]]), "bad_field"),
        (dict(extents=[["/a", 0, 1.0, 0]]), "bad_field"),
        (dict(extents={"a": 1}), "bad_field"),
        (dict(slot=KeyError), "bad_fields"),
        (dict(extra=1), "bad_fields"),
        (dict(v=m.PROTOCOL_VERSION + 1), "bad_version"),
        (dict(v=KeyError), "bad_version"),
        (dict(v=str(m.PROTOCOL_VERSION)), "bad_version"),
    ],
)
def test_bad_fields_rejected(changes, code):
    assert code_of(frames_of(REQ, **changes)) == code


@pytest.mark.parametrize(
    "changes",
    [
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(prompt=None),  # neither prompt nor messages
        dict(messages=[{"role": "user", "content": "x"}]),  # both
        dict(prompt_ids=[1, 2]),  # prompt and prompt_ids
        dict(prompt=None, prompt_ids=[-1]),
        dict(prompt=None, prompt_ids=[1.0]),
        dict(prompt=None, prompt_ids=[True]),
        dict(prompt=None, prompt_ids="12"),
        dict(messages=[{"role": "user"}], prompt=None),
        dict(seed=-1),
        dict(stream="yes"),
    ],
)
def test_bad_generate_rejected(changes):
    assert code_of(frames_of(SAMPLES[6], **changes)) == "bad_field"


def test_frames_and_tags():
    good = encode(REQ)
    assert code_of([good[0]]) == "bad_frames"
    assert code_of([*good, b""]) == "bad_frames"
    assert code_of(b"".join(good)) == "bad_frames"
    assert code_of(["x", good[1]]) == "bad_frames"
    assert code_of([b"\x02\x02", good[1]]) == "bad_frames"
    assert code_of([b"\xfe", good[1]]) == "unknown_type"
    assert code_of(good, m.COORDINATOR_ACCEPTS) == "unexpected_type"
    assert code_of(good, max_bytes=10) == "too_large"
    assert code_of([good[0], b"\xc1"]) == "bad_payload"
    assert code_of([good[0], msgpack.packb([1, 2])]) == "bad_payload"
    assert code_of([good[0], msgpack.packb({1: 2})]) == "bad_payload"
    ext = msgpack.packb({"v": 1, "req": msgpack.ExtType(5, b"x")})
    assert code_of([good[0], ext]) == "bad_payload"
    nested = frames_of(SAMPLES[13], status={"a": [[[[[[[[[[1]]]]]]]]]]})
    assert code_of(nested) == "bad_field"
    assert code_of(frames_of(SAMPLES[13], status={"a": float("nan")})) == "bad_field"


def test_encode_checks_fields():
    with pytest.raises(ProtocolError):
        encode(m.LoadDone(req=1, generation=1, slot=True, nbytes=0, us=0))
    with pytest.raises(ProtocolError):
        encode(object())


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "neg", "big", "float", "nan", "str", "bytes", "bool", "none", "list", "map"]
    k = rng.choice(kinds if depth < 3 else kinds[:9])
    return {
        "int": lambda: rng.randrange(1 << 16),
        "neg": lambda: -rng.randrange(1, 1 << 40),
        "big": lambda: rng.randrange(1 << 63, 1 << 64),
        "float": lambda: rng.uniform(-1e9, 1e9),
        "nan": lambda: float("nan"),
        "str": lambda: "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(8))),
        "bytes": lambda: rng.randbytes(rng.randrange(8)),
        "bool": lambda: rng.random() < 0.5,
        "none": lambda: None,
        "list": lambda: [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))],
        "map": lambda: {str(i): _random_value(rng, depth + 1) for i in range(rng.randrange(4))},
    }[k]()


def test_fuzz_only_protocol_errors():
    rng = random.Random(1234)
    ok = bad = 0
    for i in range(4000):
        base = encode(rng.choice(SAMPLES))
        r = i % 4
        if r == 0:  # garbage payload
            frames = [bytes((rng.randrange(256),)), rng.randbytes(rng.randrange(64))]
        elif r == 1:  # flipped / truncated bytes of a valid payload
            p = bytearray(base[1])
            for _ in range(rng.randrange(1, 4)):
                p[rng.randrange(len(p))] = rng.randrange(256)
            frames = [base[0], bytes(p[: rng.randrange(len(p) + 1)])]
        elif r == 2:  # a valid shape with random values
            p = msgpack.unpackb(base[1])
            key = rng.choice(list(p))
            p[key] = _random_value(rng)
            if rng.random() < 0.2:
                p[str(rng.randrange(10))] = 1
            frames = [base[0], msgpack.packb(p)]
        else:  # random frame lists
            frames = [rng.randbytes(rng.randrange(3)) for _ in range(rng.randrange(4))]
        try:
            decode(frames, m.ALL_TYPES)
            ok += 1
        except ProtocolError:
            bad += 1
    assert bad > 3000 and ok + bad == 4000


def test_runtime_dir_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = sockets.runtime_dir()
    assert d == tmp_path / "flashmoe"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    ep = sockets.fresh_endpoint("t")
    assert ep.startswith("ipc://" + str(d))


def test_router_dealer_round_trip(runtime_dir):
    ep = sockets.fresh_endpoint("t")
    r = sockets.router(ep)
    d = sockets.dealer(ep, identity=b"7")
    try:
        sockets.send_msg(d, SAMPLES[0])
        frames = sockets.recv_with_timeout(r, 5)
        ident, body = sockets.split_routed(frames)
        assert ident == b"7" and decode(body, m.COORDINATOR_ACCEPTS) == SAMPLES[0]
        sockets.send_msg(r, m.Shutdown(), identity=ident)
        assert sockets.recv_msg(d, m.WORKER_ACCEPTS, 5) == m.Shutdown()
        assert sockets.recv_with_timeout(d, 0.01) is None
    finally:
        r.close(0)
        d.close(0)
