"""The client's session path without attrs: its two requests and three replies, and Ed25519.

``ssh-to-job`` builds two messages (``ssh_request``, ``session_open``) and reads three
(``ssh_grant``, ``error``, ``session_ready``). Building the attrs classes and codecs of every
message type, and importing attrs and ``nacl.signing`` for it, cost each session ~60 ms of
CPU before the first byte went to the broker. This module writes and checks those five
messages with the standard library's ``json`` only, byte for byte as ``_messages`` does
(``tests/test_wirelean.py`` proves it with Hypothesis), and calls libsodium through pynacl's
own cffi binding, without ``nacl.bindings``' import of every primitive.

It must never be laxer than ``_messages``: the same strict JSON (no duplicate keys, no NaN),
the same field types, no unknown or missing fields, and only the replies the transition table
allows in that state (``_state``). Everything else — the daemons, ``stj``, other messages —
uses the full codec.
"""

from __future__ import annotations

import _json  # json's C half, without json's (and re's) import
import binascii
import math

from ._canonical import KEY_LEN, SIG_LEN
from ._errors import LocalProtocolError, RemoteProtocolError
from ._frame import DEFAULT_MAX_FRAME, HEADER

# Not typing.TYPE_CHECKING: importing typing costs more than this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_INT_LIMIT = 1 << 63

# Field kinds of the replies (all of the session path's replies are flat).
_STR, _BYTES, _BOOL, _FLOAT = range(4)
_REQUIRED = object()


class Reply:
    """A decoded reply: ``TYPE`` and its fields as attributes, as the attrs class has them."""

    TYPE = ""
    FIELDS: tuple[tuple[str, int, object], ...] = ()

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n, _k, _d in self.FIELDS)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like attrs.define


class SshGrant(Reply):
    """``wire.SshGrant``'s fields (sent with the session socket)."""

    TYPE = "ssh_grant"
    FIELDS = (
        ("session_id", _STR, _REQUIRED),
        ("job", _STR, _REQUIRED),
        ("capability", _BYTES, _REQUIRED),
        ("starter_id", _STR, _REQUIRED),
        ("starter_key", _BYTES, _REQUIRED),
    )
    session_id: str
    job: str
    capability: bytes
    starter_id: str
    starter_key: bytes


class Error(Reply):
    """``wire.Error``'s fields: a refusal or failure, with a message meant for a person."""

    TYPE = "error"
    FIELDS = (("code", _STR, _REQUIRED), ("message", _STR, _REQUIRED))
    code: str
    message: str


class SessionReady(Reply):
    """``wire.SessionReady``'s fields: the starter's signed host key."""

    TYPE = "session_ready"
    FIELDS = (
        ("host_key", _STR, _REQUIRED),
        ("login", _STR, _REQUIRED),
        ("signature", _BYTES, _REQUIRED),
        ("banner", _STR, ""),
        ("agent_forwarding", _BOOL, False),
        ("mux_persist", _FLOAT, 0.0),
    )
    host_key: str
    login: str
    signature: bytes
    banner: str
    agent_forwarding: bool
    mux_persist: float


_Expect = tuple[str, str, str, dict[str, type[Reply]]]
#: What the peer may answer to each request (``_state``'s CONTROL and SESSION tables): who
#: answers, on which channel, in which state (for ``Connection``'s wording of a reply out of
#: turn), and the replies allowed.
GRANT_REPLIES: _Expect = (
    "broker",
    "control",
    "ssh_request",
    {"ssh_grant": SshGrant, "error": Error},
)
READY_REPLIES: _Expect = (
    "starter",
    "session",
    "opening",
    {"session_ready": SessionReady, "error": Error},
)


# --------------------------------------------------------------------------- requests


def _not_json(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


#: ``json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)``: the same
#: C encoder json.dumps builds for those arguments, made here without importing json (which
#: imports re: ~4 ms of every session's start-up). No circular-reference markers: this one
#: encoder serves every call, the bodies here are flat, and a marker left by a failed call
#: would haunt the next.
_encode = _json.make_encoder(
    None, _not_json, _json.encode_basestring, None, ":", ",", False, False, False
)


class _Strict:
    """The settings ``json.loads(text, parse_constant=_no_constant,
    object_pairs_hook=_no_duplicates)`` gives its C scanner."""

    strict = True
    object_hook = None
    parse_float = float
    parse_int = int

    def __init__(self) -> None:
        self.parse_constant = _no_constant
        self.object_pairs_hook = _no_duplicates


def _loads(text: str) -> object:
    """``json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)`` on
    json's C scanner directly; anything it does not take whole goes to json.loads itself, so
    that every refusal is json's own, word for word."""
    ws = " \t\n\r"
    start = len(text) - len(text.lstrip(ws))
    try:
        obj, end = _scan(text, start)
    except (StopIteration, ValueError, RecursionError):
        obj, end = None, -1
    if end != len(text.rstrip(ws)) or end < start:
        import json  # only for a frame that will be refused: for json's exact message

        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    return obj


def _frame(body: dict[str, object], name: str) -> bytes:
    try:
        text = "".join(_encode(body, 0))
        payload = text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise LocalProtocolError(f"cannot encode {name!r}: {exc}") from None
    if len(payload) > DEFAULT_MAX_FRAME:
        raise LocalProtocolError(
            f"frame of {len(payload)} bytes exceeds the {DEFAULT_MAX_FRAME}-byte limit"
        )
    return HEADER.pack(len(payload)) + payload


def ssh_request_frame(job: str, client_key: str) -> bytes:
    """The frame of ``wire.SshRequest(job=job, client_key=client_key)``."""
    return _frame({"job": job, "client_key": client_key, "type": "ssh_request"}, "ssh_request")


def session_open_frame(capability: bytes, shells: tuple[str, ...], persist: str) -> bytes:
    """The frame of ``wire.SessionOpen(capability=..., shells=..., persist=...)``."""
    body: dict[str, object] = {
        "capability": binascii.b2a_base64(capability, newline=False).decode("ascii"),
        "shells": list(shells),
        "persist": persist,
        "type": "session_open",
    }
    return _frame(body, "session_open")


# --------------------------------------------------------------------------- replies


def _fail(path: str, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"field {path}: {what}")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of repeated keys silently; a strict decoder has one reading only.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return obj


_scan = _json.make_scanner(_Strict())  # type: ignore[arg-type]


def _value(kind: int, v: object, path: str) -> object:
    if kind == _STR:
        if type(v) is not str:
            raise _fail(path, "expected a string")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(path, "string is not valid Unicode (lone surrogate)") from None
        return v
    if kind == _BYTES:
        if type(v) is not str:
            raise _fail(path, "expected base64 text")
        try:
            return binascii.a2b_base64(v.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            raise _fail(path, "invalid base64") from None
    if kind == _BOOL:
        if type(v) is not bool:
            raise _fail(path, "expected true or false")
        return v
    if type(v) is int and -_INT_LIMIT <= v < _INT_LIMIT:
        return float(v)
    if type(v) is not float or not math.isfinite(v):
        raise _fail(path, "expected a finite number")
    return v


def decode_reply(payload: bytes, expect: _Expect) -> Reply:
    """One frame's payload as one of ``replies`` (``GRANT_REPLIES`` or ``READY_REPLIES``);
    ``RemoteProtocolError`` for anything ``decode_message`` or the table would refuse."""
    try:
        body = _loads(payload.decode("utf-8"))
    except ValueError as exc:
        raise RemoteProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("frame nests too deeply") from None
    if type(body) is not dict:
        raise RemoteProtocolError("frame is not a JSON object")
    name = body.get("type")
    who, channel, state, replies = expect
    cls = replies.get(name) if isinstance(name, str) else None
    if cls is None:
        raise RemoteProtocolError(
            f"{who} may not send {name!r} on a {channel} connection in state {state!r}"
        )
    known = {n for n, _k, _d in cls.FIELDS}
    unknown = set(body) - known - {"type"}
    if unknown:
        raise _fail(cls.__name__, f"unknown field(s) {sorted(unknown)}")
    values: dict[str, object] = {}
    for field, kind, default in cls.FIELDS:
        if field not in body:
            if default is _REQUIRED:
                raise _fail(field, "missing")
            values[field] = default
        else:
            values[field] = _value(kind, body[field], field)
    return cls(**values)


# --------------------------------------------------------------------------- Ed25519


def _sodium() -> tuple[Any, Any]:
    # pynacl's own cffi binding of libsodium: nacl.bindings would import (and size-check)
    # every primitive it wraps, ~12 ms, for the two calls made here.
    from nacl._sodium import ffi, lib

    if lib.sodium_init() < 0:  # pragma: no cover - libsodium could not initialise
        raise RuntimeError("libsodium failed to initialise")
    return ffi, lib


def ed25519_seed_keypair(seed: bytes) -> bytes:
    """The 32-byte Ed25519 public key of ``seed`` (as ``nacl.signing.SigningKey(seed)``)."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    ffi, lib = _sodium()
    pk = ffi.new("unsigned char[]", KEY_LEN)
    sk = ffi.new("unsigned char[]", 64)
    if lib.crypto_sign_seed_keypair(pk, sk, seed) != 0:
        raise RuntimeError("libsodium could not make a key pair")  # pragma: no cover
    return bytes(ffi.buffer(pk, KEY_LEN))


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """``wire.verify``: whether ``signature`` is ``public_key``'s Ed25519 over ``message``."""
    if len(public_key) != KEY_LEN or len(signature) != SIG_LEN:
        return False
    ffi, lib = _sodium()
    signed = signature + message
    out = ffi.new("unsigned char[]", len(signed))
    out_len = ffi.new("unsigned long long *")
    ok: bool = lib.crypto_sign_open(out, out_len, signed, len(signed), public_key) == 0
    return ok


# --------------------------------------------------------------------------- job ids


class LocalJobId:
    """A job of the pool's own queue as ``_jobid.parse_job_id`` reads it, without attrs or
    ``re``: ``cluster``, ``cluster.proc`` or ``cluster.proc.node``, ASCII digits only."""

    __slots__ = ("cluster", "node", "proc")

    def __init__(self, cluster: int, proc: int | None = None, node: int | None = None) -> None:
        self.cluster = cluster
        self.proc = proc
        self.node = node

    @property
    def one(self) -> str:
        """The single job this id names for ssh: a bare cluster means proc 0."""
        return f"{self.cluster}.{self.proc or 0}"

    def __repr__(self) -> str:
        return f"LocalJobId(cluster={self.cluster!r}, proc={self.proc!r}, node={self.node!r})"


def parse_job_id(text: str) -> LocalJobId:
    """``wire.parse_job_id`` (same ids accepted, same error), as a ``LocalJobId``."""
    parts = text.strip().split(".")
    if 1 <= len(parts) <= 3 and all(
        part and len(part) <= most and part.isascii() and part.isdigit()
        for part, most in zip(parts, (12, 9, 9), strict=False)
    ):
        nums = [int(p) for p in parts] + [None, None]
        return LocalJobId(nums[0], nums[1], nums[2])  # type: ignore[arg-type]
    raise ValueError(
        f"{text!r} is not a job id (expected cluster, cluster.proc or cluster.proc.node)"
    )
