"""wire.lean, the client's attrs-free session codec, is byte for byte and refusal for refusal
the full codec (``encode_message``/``decode_message`` and the transition table) on the five
messages it handles; its Ed25519 calls agree with pynacl's; its job ids with ``parse_job_id``."""

from __future__ import annotations

import json
from typing import Any, cast

import attrs
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job import wire
from ssh_to_job.wire import lean

TEXT = st.text(max_size=20)
#: Values of every JSON type, and strings that are (or are not) base64, for mutated fields.
JSON_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.sampled_from(["", "AAAA", "AA==", "A", "@@@@", "\udc80", "é"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

GRANT = st.builds(
    wire.SshGrant,
    session_id=TEXT,
    job=TEXT,
    capability=st.binary(max_size=40),
    starter_id=TEXT,
    starter_key=st.binary(max_size=40),
)
ERROR = st.builds(wire.Error, code=TEXT, message=TEXT)
READY = st.builds(
    wire.SessionReady,
    host_key=TEXT,
    login=TEXT,
    signature=st.binary(max_size=70),
    banner=TEXT,
    agent_forwarding=st.booleans(),
    mux_persist=st.floats(allow_nan=False, allow_infinity=False),
)


def full(
    payload: bytes, channel: wire.Channel, request: wire.Message, peer: wire.Role
) -> wire.Message | Exception:
    """What a client's wire.Connection makes of ``payload`` after sending ``request``."""
    conn = wire.Connection(channel, wire.Role.CLIENT, peer)
    conn.send(request)
    conn.receive_data(wire.encode_frame(payload, max_size=1 << 30))
    try:
        event = conn.next_event()
    except wire.RemoteProtocolError as exc:
        return exc
    assert isinstance(event, wire.Message)
    return event


def lean_decode(payload: bytes, expect: Any) -> lean.Reply | Exception:
    try:
        return lean.decode_reply(payload, expect)
    except wire.RemoteProtocolError as exc:
        return exc


def same(a: wire.Message | Exception, b: lean.Reply | Exception) -> None:
    """Both refuse, or both accept the same type with the same field values."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert isinstance(a, Exception), (a, b)
        assert isinstance(b, Exception), (a, b)
        return
    assert a.TYPE == b.TYPE
    fields = {name: getattr(a, name) for name, _kind, _default in b.FIELDS}
    assert fields == b.__dict__


@pytest.mark.parametrize(
    ("full_cls", "lean_cls"),
    [
        (wire.SshGrant, lean.SshGrant),
        (wire.Error, lean.Error),
        (wire.SessionReady, lean.SessionReady),
    ],
)
def test_lean_replies_have_the_message_fields(
    full_cls: type[wire.Message], lean_cls: type[lean.Reply]
) -> None:
    """Each lean reply has its message's type name, fields in order and defaults: a field
    added to the message without the lean codec fails here, not in a user's session."""
    assert lean_cls.TYPE == full_cls.TYPE
    want = [
        (f.name, lean._REQUIRED if f.default is attrs.NOTHING else f.default)
        for f in attrs.fields(cast(Any, full_cls))
    ]
    assert [(name, default) for name, _kind, default in lean_cls.FIELDS] == want


def test_lean_requests_have_the_message_fields() -> None:
    """ssh_request and session_open carry exactly the message's fields (defaults included)."""
    assert [f.name for f in attrs.fields(wire.SshRequest)] == ["job", "client_key"]
    assert [f.name for f in attrs.fields(wire.SessionOpen)] == ["capability", "shells", "persist"]


SSH_REQUEST = wire.SshRequest(job="1.0", client_key="ssh-ed25519 AAAA")
SESSION_OPEN = wire.SessionOpen(capability=b"cap")


def as_grant_reply(payload: bytes) -> None:
    same(
        full(payload, wire.Channel.CONTROL, SSH_REQUEST, wire.Role.BROKER),
        lean_decode(payload, lean.GRANT_REPLIES),
    )


def as_ready_reply(payload: bytes) -> None:
    same(
        full(payload, wire.Channel.SESSION, SESSION_OPEN, wire.Role.STARTER),
        lean_decode(payload, lean.READY_REPLIES),
    )


@given(job=TEXT, key=TEXT)
def test_ssh_request_frame_is_byte_identical(job: str, key: str) -> None:
    """ssh_request_frame gives encode_frame(encode_message(SshRequest)) exactly, refusals too."""
    try:
        want: bytes | None = wire.encode_frame(
            wire.encode_message(wire.SshRequest(job=job, client_key=key))
        )
    except wire.LocalProtocolError:
        want = None
    try:
        got: bytes | None = lean.ssh_request_frame(job, key)
    except wire.LocalProtocolError:
        got = None
    assert got == want


@given(cap=st.binary(max_size=80), shells=st.lists(TEXT, max_size=3).map(tuple), persist=TEXT)
def test_session_open_frame_is_byte_identical(
    cap: bytes, shells: tuple[str, ...], persist: str
) -> None:
    """session_open_frame gives the full codec's SessionOpen frame exactly, refusals too."""
    msg = wire.SessionOpen(capability=cap, shells=shells, persist=persist)
    try:
        want: bytes | None = wire.encode_frame(wire.encode_message(msg))
    except wire.LocalProtocolError:
        want = None
    try:
        got: bytes | None = lean.session_open_frame(cap, shells, persist)
    except wire.LocalProtocolError:
        got = None
    assert got == want


def test_oversize_request_is_a_local_error() -> None:
    """A request past the frame limit is refused before sending, as encode_frame refuses it."""
    with pytest.raises(wire.LocalProtocolError, match="exceeds"):
        lean.ssh_request_frame("1.0", "k" * wire.DEFAULT_MAX_FRAME)


@settings(max_examples=150)
@given(msg=st.one_of(GRANT, ERROR))
def test_grant_replies_decode_as_the_full_codec(msg: wire.Message) -> None:
    """Every ssh_grant and error the broker can send decodes to the same values."""
    payload = wire.encode_message(msg)
    got = lean.decode_reply(payload, lean.GRANT_REPLIES)
    same(full(payload, wire.Channel.CONTROL, SSH_REQUEST, wire.Role.BROKER), got)


@settings(max_examples=150)
@given(msg=st.one_of(READY, ERROR))
def test_ready_replies_decode_as_the_full_codec(msg: wire.Message) -> None:
    """Every session_ready and error a starter can send decodes to the same values."""
    payload = wire.encode_message(msg)
    got = lean.decode_reply(payload, lean.READY_REPLIES)
    same(full(payload, wire.Channel.SESSION, SESSION_OPEN, wire.Role.STARTER), got)


def mutated(msgs: st.SearchStrategy[wire.Message]) -> st.SearchStrategy[bytes]:
    """A valid reply's JSON with fields dropped, retyped or added, or its type renamed."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        body: dict[str, Any] = json.loads(wire.encode_message(draw(msgs)))
        for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
            body.pop(key, None)
        for key in draw(st.lists(st.sampled_from(sorted(body) or ["x"]), max_size=2)):
            body[key] = draw(JSON_VALUE)
        if draw(st.booleans()):
            body[draw(st.sampled_from(["extra", "type", "banner", "job"]))] = draw(JSON_VALUE)
        if draw(st.booleans()):
            body["type"] = draw(
                st.sampled_from(["ssh_grant", "error", "session_ready", "ping", "nope", 7])
            )
        return json.dumps(body).encode()

    return build()


@settings(max_examples=400)
@given(payload=mutated(st.one_of(GRANT, ERROR, READY)))
def test_mutated_replies_are_judged_alike(payload: bytes) -> None:
    """A damaged reply is refused by both codecs or accepted by both with the same values,
    in both states (a broker's answer to ssh_request, a starter's to session_open)."""
    as_grant_reply(payload)
    as_ready_reply(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b"{",
        b'{"type":"error","code":"a","message":"b","code":"c"}',
        b'{"type":"session_ready","host_key":"k","login":"l","signature":"","mux_persist":NaN}',
        b'{"type":"session_ready","host_key":"k","login":"l","signature":"","mux_persist":1e400}',
        b'{"type":"session_ready","host_key":"k","login":"l","signature":"","mux_persist":true}',
        b'{"type":"session_ready","host_key":"k","login":"l","signature":"","mux_persist":3}',
        b'{"type":"error","code":"\\ud800","message":""}',
        b'{"type":"ssh_grant","session_id":"s","job":"j","capability":"A","starter_id":"x",'
        b'"starter_key":""}',
        b"\xff",
        b"[" * 100_000,
    ],
)
def test_edge_payloads_are_judged_alike(payload: bytes) -> None:
    """Duplicate keys, NaN, overflowing and boolean numbers, lone surrogates, bad base64, bad
    UTF-8 and deep nesting: the lean codec decides as the full one does."""
    as_grant_reply(payload)
    as_ready_reply(payload)


@given(payload=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_remote_errors(payload: bytes) -> None:
    """Whatever a peer sends, decode_reply returns a reply or raises RemoteProtocolError."""
    for expect in (lean.GRANT_REPLIES, lean.READY_REPLIES):
        try:
            lean.decode_reply(payload, expect)
        except wire.RemoteProtocolError:
            pass


@settings(max_examples=30)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=64))
def test_ed25519_agrees_with_pynacl(seed: bytes, message: bytes) -> None:
    """The seed's public key is pynacl's, its signatures verify, and a changed message,
    signature or key does not."""
    sk = nacl.signing.SigningKey(seed)
    assert lean.ed25519_seed_keypair(seed) == bytes(sk.verify_key)
    sig = sk.sign(message).signature
    pk = bytes(sk.verify_key)
    assert lean.verify(pk, message, sig) is True
    assert wire.verify(pk, message, sig) is True
    assert lean.verify(pk, message + b"x", sig) is False
    assert lean.verify(pk, message, bytes([sig[0] ^ 1]) + sig[1:]) is False
    other = bytes(nacl.signing.SigningKey(bytes(31) + b"\x01").verify_key)
    assert lean.verify(other, message, sig) == (other == pk)
    assert lean.verify(pk[:31], message, sig) is False
    assert lean.verify(pk, message, sig[:63]) is False


def test_keypair_is_fresh_and_readable() -> None:
    """ed25519_keypair (now on wire.lean) gives a new key each time whose file holds its seed."""
    (priv1, pub1), (_priv2, pub2) = wire.ed25519_keypair(), wire.ed25519_keypair()
    assert pub1 != pub2
    seed = wire.ed25519_seed(priv1)
    assert wire.ed25519_public_of(pub1) == bytes(nacl.signing.SigningKey(seed).verify_key)


JOB_TEXT = st.one_of(
    st.from_regex(r"\A[0-9]{1,13}(\.[0-9]{0,10}){0,3}\Z"),
    st.text(alphabet="0123456789. \t\n٣x", max_size=16),
)


@given(text=JOB_TEXT)
def test_job_ids_parse_as_parse_job_id(text: str) -> None:
    """The lean job id reader accepts exactly what parse_job_id accepts, with the same parts
    and the same error."""

    def outcome(parse: Any) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            return str(exc)

    want, got = outcome(wire.parse_job_id), outcome(lean.parse_job_id)
    if isinstance(want, str):
        assert got == want
        return
    assert (got.cluster, got.proc, got.node, got.one) == (
        want.cluster,
        want.proc,
        want.node,
        want.one,
    )
