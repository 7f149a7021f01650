"""Every message of the system, and its wire format.

Wire format: two ZeroMQ frames ``[tag, payload]``. ``tag`` is one byte naming the type, so a
receiver can reject a type before decoding anything; ``payload`` is a msgpack map of the fields
plus ``"v"``, the protocol version. No pickle, no msgpack extension types.

``decode(frames, accept)`` is strict and raises only ``ProtocolError(code, message)``: wrong frame
count, unknown tag, a tag not accepted on that socket, wrong version, missing or extra fields,
wrong field types (``True`` is not an int), non-finite or out-of-range numbers, oversize input.
``encode`` runs the same checks, so a bad message fails at its sender.

Sockets and the types they accept:

- worker (DEALER) <- coordinator: ``LoadRequest``, ``Shutdown``  (``WORKER_ACCEPTS``)
- coordinator (ROUTER) <- worker: ``Hello``, ``LoadDone``, ``LoadFailed``  (``COORDINATOR_ACCEPTS``)
- daemon <- client: ``Generate``, ``StatusRequest``, ``Cancel``, ``Shutdown``  (``DAEMON_ACCEPTS``)
- client <- daemon: ``Token``, ``Done``, ``Error``, ``StatusReply``  (``CLIENT_ACCEPTS``)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, ClassVar

import msgpack

from flashmoe.errors import FlashMoeError
from flashmoe.protocol.request import BOUNDS, MAX_STOP, MAX_STOP_CHARS, Request

PROTOCOL_VERSION = 4  # 2: Generate.prompt_ids; 3: LoadRequest.urgent; 4: Generate.stop, logprobs
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the default of settings.max_message_bytes

_U63 = (1 << 63) - 1
_MAX_STR = 1 << 20
_MAX_LIST = 1 << 20
_MAX_DEPTH = 8


class ProtocolError(FlashMoeError):
    """A malformed or unexpected message. ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- field checks: each takes (value, field name) and returns the (normalized) value ------------

Check = Callable[[Any, str], Any]


def _bad(name: str, want: str, v: Any) -> ProtocolError:
    return ProtocolError("bad_field", f"{name}: expected {want}, got {type(v).__name__}")


def _int(lo: int = 0, hi: int = _U63) -> Check:
    def check(v: Any, name: str) -> int:
        if type(v) is not int:
            raise _bad(name, "int", v)
        if not lo <= v <= hi:
            raise ProtocolError("bad_field", f"{name}: {v} out of range [{lo}, {hi}]")
        return v

    return check


def _float(lo: float = -math.inf, hi: float = math.inf) -> Check:
    def check(v: Any, name: str) -> float:
        if type(v) not in (float, int):
            raise _bad(name, "number", v)
        v = float(v)
        if not math.isfinite(v) or not lo <= v <= hi:
            raise ProtocolError("bad_field", f"{name}: {v} not a finite number in [{lo}, {hi}]")
        return v

    return check


def _str(max_len: int = _MAX_STR) -> Check:
    def check(v: Any, name: str) -> str:
        if type(v) is not str:
            raise _bad(name, "str", v)
        if len(v) > max_len:
            raise ProtocolError("bad_field", f"{name}: string of {len(v)} chars > {max_len}")
        return v

    return check


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise _bad(name, "bool", v)
    return v


def _optional(inner: Check) -> Check:
    return lambda v, name: None if v is None else inner(v, name)


def _list(item: Check, max_len: int = _MAX_LIST) -> Check:
    def check(v: Any, name: str) -> list:
        if type(v) not in (list, tuple):
            raise _bad(name, "list", v)
        if len(v) > max_len:
            raise ProtocolError("bad_field", f"{name}: list of {len(v)} items > {max_len}")
        return [item(x, f"{name}[{i}]") for i, x in enumerate(v)]

    return check


def _tuple(*items: Check) -> Check:
    def check(v: Any, name: str) -> list:
        if type(v) not in (list, tuple) or len(v) != len(items):
            raise ProtocolError("bad_field", f"{name}: expected a list of {len(items)} items")
        return [c(x, f"{name}[{i}]") for i, (c, x) in enumerate(zip(items, v, strict=True))]

    return check


def _record(**items: Check) -> Check:
    def check(v: Any, name: str) -> dict:
        if type(v) is not dict or set(v) != set(items):
            raise ProtocolError("bad_field", f"{name}: expected a map with keys {sorted(items)}")
        return {k: c(v[k], f"{name}.{k}") for k, c in items.items()}

    return check


def _plain(v: Any, name: str, depth: int = 0) -> Any:
    """Free-form data (stats, status): str-keyed maps, lists, str, int, finite float, bool, None."""
    if depth > _MAX_DEPTH:
        raise ProtocolError("bad_field", f"{name}: nested deeper than {_MAX_DEPTH}")
    t = type(v)
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        if not math.isfinite(v):
            raise ProtocolError("bad_field", f"{name}: non-finite number")
        return v
    if t in (list, tuple):
        return [_plain(x, name, depth + 1) for x in v]
    if t is dict:
        if not all(type(k) is str for k in v):
            raise ProtocolError("bad_field", f"{name}: map keys must be strings")
        return {k: _plain(x, f"{name}.{k}", depth + 1) for k, x in v.items()}
    raise _bad(name, "plain data", v)


def _map(v: Any, name: str) -> dict:
    if type(v) is not dict:
        raise _bad(name, "map", v)
    return _plain(v, name)


_ID = _str(256)
_REQ = _int()
_TOKEN_IDS = _list(_int(0, (1 << 32) - 1))
_EXTENT = _tuple(_str(4096), _int(), _int(), _int())

# -- message types --------------------------------------------------------------------------

_BY_TAG: dict[int, type] = {}


def _message(tag: int, **schema: Check) -> Callable[[type], type]:
    """Register a dataclass as a message type with a one-byte tag and a per-field check."""

    def wrap(cls: type) -> type:
        names = [f.name for f in fields(cls)]
        assert names == list(schema), (cls.__name__, names, list(schema))
        assert 0 < tag < 256 and tag not in _BY_TAG
        cls.TAG = tag
        cls.SCHEMA = schema
        _BY_TAG[tag] = cls
        return cls

    return wrap


# Worker side ----------------------------------------------------------------------------------


@_message(1, worker=_int(), pid=_int(1), version=_str(64))
@dataclass(slots=True)
class Hello:
    """A loader worker announces itself (``version``: the flashmoe package version)."""

    worker: int
    pid: int
    version: str
    TAG: ClassVar[int]


@_message(
    2,
    req=_REQ,
    generation=_int(),
    slot=_int(),
    extents=_list(_EXTENT, 4096),
    checksum=_optional(_int(0, (1 << 32) - 1)),
    direct=_bool,
    urgent=_bool,
)
@dataclass(slots=True)
class LoadRequest:
    """Fill ``slot``: each extent is ``[path, file offset, length, offset in slot]``.
    ``urgent``: somebody waits for it; otherwise (a guess) it is read only with the I/O
    threads that urgent loads leave free, a few at a time."""

    req: int
    generation: int
    slot: int
    extents: list[list]
    checksum: int | None = None
    direct: bool = False
    urgent: bool = True
    TAG: ClassVar[int]


@_message(3, req=_REQ, generation=_int(), slot=_int(), nbytes=_int(), us=_int())
@dataclass(slots=True)
class LoadDone:
    req: int
    generation: int
    slot: int
    nbytes: int
    us: int
    TAG: ClassVar[int]


@_message(4, req=_REQ, generation=_int(), slot=_int(), error=_str())
@dataclass(slots=True)
class LoadFailed:
    req: int
    generation: int
    slot: int
    error: str
    TAG: ClassVar[int]


@_message(5)
@dataclass(slots=True)
class Shutdown:
    """Stop (a worker, or the daemon when a client sends it)."""

    TAG: ClassVar[int]


# Client side ----------------------------------------------------------------------------------

_ROLE_MESSAGE = _record(role=_str(64), content=_str())


def _generate_fields() -> list[tuple]:
    """The request's own fields (``request.Request``), less what the wire does not carry
    (tools) or the engine fills in (its tokenization), and how the reply comes."""
    out: list[tuple] = []
    for f in fields(Request):
        if f.name in ("tools", "tokens"):
            continue
        if f.name == "id":
            out.append((f.name, f.type))
        elif f.default_factory is not MISSING:
            out.append((f.name, f.type, field(default_factory=f.default_factory)))
        else:
            out.append((f.name, f.type, field(default=f.default)))
    return [*out, ("stream", bool, field(default=True)),
            ("prompt_ids", "list[int] | None", field(default=None)), ("TAG", ClassVar[int])]


Generate = _message(
    16,
    id=_ID,
    prompt=_optional(_str()),
    messages=_optional(_list(_ROLE_MESSAGE, 4096)),
    max_tokens=_int(*BOUNDS["max_tokens"]),
    temperature=_float(*BOUNDS["temperature"]),
    top_p=_float(*BOUNDS["top_p"]),
    top_k=_int(*BOUNDS["top_k"]),
    min_p=_float(*BOUNDS["min_p"]),
    seed=_optional(_int(*BOUNDS["seed"])),
    stop=_list(_str(MAX_STOP_CHARS), MAX_STOP),
    logprobs=_bool,
    top_logprobs=_int(*BOUNDS["top_logprobs"]),
    stream=_bool,
    prompt_ids=_optional(_list(_int(0, (1 << 31) - 1), 1 << 20)),
)(make_dataclass("Generate", _generate_fields(), slots=True, namespace={
    "__module__": __name__,
    "__doc__": "Generate from exactly one of ``prompt`` (raw text), ``prompt_ids`` (token "
               "ids, used as they are) or ``messages`` (chat), with a request's fields."}))


@_message(17, id=_ID, text=_str(), ids=_TOKEN_IDS)
@dataclass(slots=True)
class Token:
    id: str
    text: str
    ids: list[int]
    TAG: ClassVar[int]


@_message(18, id=_ID, text=_str(), ids=_TOKEN_IDS, stats=_map, finish_reason=_str(64))
@dataclass(slots=True)
class Done:
    id: str
    text: str
    ids: list[int]
    stats: dict
    finish_reason: str
    TAG: ClassVar[int]


@_message(19, id=_optional(_ID), code=_str(64), message=_str())
@dataclass(slots=True)
class Error:
    """A request failed; ``id`` is None when the request itself could not be read."""

    id: str | None
    code: str
    message: str
    TAG: ClassVar[int]


@_message(20)
@dataclass(slots=True)
class StatusRequest:
    TAG: ClassVar[int]


@_message(21, status=_map)
@dataclass(slots=True)
class StatusReply:
    status: dict
    TAG: ClassVar[int]


@_message(22, id=_ID)
@dataclass(slots=True)
class Cancel:
    id: str
    TAG: ClassVar[int]


ALL_TYPES: frozenset[type] = frozenset(_BY_TAG.values())
WORKER_ACCEPTS = frozenset({LoadRequest, Shutdown})
COORDINATOR_ACCEPTS = frozenset({Hello, LoadDone, LoadFailed})
DAEMON_ACCEPTS = frozenset({Generate, StatusRequest, Cancel, Shutdown})
CLIENT_ACCEPTS = frozenset({Token, Done, Error, StatusReply})


def _cross_check(msg: Any) -> None:
    if type(msg) is Generate and sum(
            x is not None for x in (msg.prompt, msg.prompt_ids, msg.messages)) != 1:
        raise ProtocolError("bad_field",
                            "Generate needs exactly one of prompt, prompt_ids or messages")


# -- encode / decode ------------------------------------------------------------------------


def encode(msg: Any) -> list[bytes]:
    """Frames ``[tag, msgpack payload]`` for a message; checks its fields first."""
    cls = type(msg)
    if _BY_TAG.get(getattr(cls, "TAG", None)) is not cls:
        raise ProtocolError("unknown_type", f"not a message type: {cls.__name__}")
    payload: dict[str, Any] = {"v": PROTOCOL_VERSION}
    for name, check in cls.SCHEMA.items():
        payload[name] = check(getattr(msg, name), name)
    _cross_check(msg)
    return [bytes((cls.TAG,)), msgpack.packb(payload, use_bin_type=True)]


def decode(
    frames: list[bytes], accept: frozenset[type] | set[type], max_bytes: int = MAX_MESSAGE_BYTES
) -> Any:
    """Decode ``[tag, payload]`` into one of the ``accept``ed types, or raise ProtocolError."""
    if type(frames) not in (list, tuple) or len(frames) != 2:
        n = len(frames) if isinstance(frames, (list, tuple)) else "?"
        raise ProtocolError("bad_frames", f"expected 2 frames [tag, payload], got {n}")
    tag, payload = frames
    if not isinstance(tag, (bytes, bytearray, memoryview)) or not isinstance(
        payload, (bytes, bytearray, memoryview)
    ):
        raise ProtocolError("bad_frames", "frames must be bytes")
    if len(tag) != 1:
        raise ProtocolError("bad_frames", f"type frame must be 1 byte, got {len(tag)}")
    if len(payload) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(payload)} bytes > {max_bytes}")
    cls = _BY_TAG.get(tag[0])
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message tag {tag[0]}")
    if cls not in accept:
        raise ProtocolError("unexpected_type", f"{cls.__name__} is not accepted here")
    try:
        data = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, FormatError, StackError...)
        raise ProtocolError("bad_payload", f"undecodable msgpack: {type(e).__name__}") from None
    if type(data) is not dict:
        raise ProtocolError("bad_payload", "payload must be a map")
    v = data.pop("v", None)
    if type(v) is not int:
        raise ProtocolError("bad_version", "payload has no protocol version")
    if v != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {v}, expected {PROTOCOL_VERSION}")
    schema = cls.SCHEMA
    if data.keys() != schema.keys():
        missing = sorted(k for k in schema if k not in data)
        extra = sorted(str(k) for k in data if k not in schema)
        raise ProtocolError(
            "bad_fields", f"{cls.__name__}: missing {missing or 'none'}, extra {extra or 'none'}"
        )
    try:
        msg = cls(**{name: check(data[name], name) for name, check in schema.items()})
    except ProtocolError:
        raise
    except Exception as e:  # a check that tripped on something unforeseen is still bad input
        raise ProtocolError("bad_field", f"{cls.__name__}: {type(e).__name__}") from None
    _cross_check(msg)
    return msg


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_payload", f"msgpack extension type {code} not allowed")
