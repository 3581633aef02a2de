"""Message encoding: byte-exact JSON, a Hypothesis round trip of every type, strict decoding."""

from __future__ import annotations

import collections.abc
import gc
import json
import re
import types
import typing
from typing import Any, cast

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job import wire
from ssh_to_job.wire import (
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    decode_message,
    encode_frame,
    encode_message,
)
from ssh_to_job.wire._messages import MAX_HEAD

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
#: The actions ``stj`` can ask for; Act refuses anything else.
ACTIONS = ("continue", "hold", "release", "rm", "suspend")

# Fields whose validators narrow the type: the strategy must stay inside what the class accepts.
OVERRIDES: dict[tuple[type, str], st.SearchStrategy[Any]] = {
    (wire.Submit, "count"): st.integers(min_value=0, max_value=2**63 - 1),
    (wire.Act, "action"): st.sampled_from(ACTIONS),
    (wire.JobSpec, "debug_on"): st.sets(st.sampled_from(("exit", "signal", "timeout"))).map(tuple),
    (wire.JobSpec, "debug_hold_ttl"): st.floats(min_value=0, max_value=366 * 86400),
    (wire.JobSpec, "time_limit"): st.floats(min_value=0, max_value=366 * 86400),
    (wire.JobSpec, "ssh_from"): st.lists(
        st.sampled_from(("10.0.0.0/8", "198.18.0.5", "2001:db8::/32")), max_size=3
    ).map(tuple),
}


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for one field annotation; an annotation we do not know fails loudly."""
    origin = typing.get_origin(tp)
    if tp is int:
        return INT64
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is bool:
        return st.booleans()
    if tp is str:
        return st.text(max_size=20)
    if tp is bytes:
        return st.binary(max_size=40)
    if origin is types.UnionType or origin is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is tuple:
        item, _ellipsis = typing.get_args(tp)
        return st.lists(strategy_for(item), max_size=3).map(tuple)
    if origin is collections.abc.Mapping:
        return st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    if isinstance(tp, type) and attrs.has(tp):
        return from_fields(tp)
    raise TypeError(f"no strategy for {tp!r}")


def from_fields(cls: type) -> st.SearchStrategy[Any]:
    """Build ``cls`` with every attrs field drawn (defaults included, so they vary too)."""
    hints = typing.get_type_hints(cls)
    return st.builds(
        cls,
        **{
            f.name: OVERRIDES[(cls, f.name)]
            if (cls, f.name) in OVERRIDES
            else strategy_for(hints[f.name])
            for f in attrs.fields(cls)
        },
    )


#: Every message class, in a stable order (by TYPE).
ALL_TYPES: list[type[Message]] = [wire.MESSAGE_TYPES[name] for name in sorted(wire.MESSAGE_TYPES)]
STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    cls: from_fields(cls) for cls in ALL_TYPES
}
any_message = st.one_of([STRATEGIES[cls] for cls in ALL_TYPES])


def all_subclasses(cls: type) -> set[type]:
    # attrs' slotted classes replace the class the decorator saw; the discarded original
    # stays in __subclasses__ until the cycle collector runs, so collect first.
    gc.collect()
    out: set[type] = set()
    subs: list[type] = cls.__subclasses__()
    for sub in subs:
        out |= {sub} | all_subclasses(sub)
    return out


# --------------------------------------------------------------------------- the registry


def test_every_message_class_is_registered_and_covered() -> None:
    """Every Message subclass and every exported one is in MESSAGE_TYPES and has a strategy."""
    exported = {
        obj
        for name in wire.__all__
        if isinstance(obj := getattr(wire, name), type) and issubclass(obj, Message)
    } - {Message}
    assert all_subclasses(Message) == exported == set(wire.MESSAGE_TYPES.values())
    assert set(STRATEGIES) == set(wire.MESSAGE_TYPES.values())
    assert len(wire.MESSAGE_TYPES) == 54


def test_type_names_are_snake_case_of_class_names() -> None:
    """Each registry key is its class's TYPE, spelled as the class name in snake_case."""
    for name, cls in wire.MESSAGE_TYPES.items():
        assert cls.TYPE == name
        assert name == re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def test_no_field_is_named_type() -> None:
    """No message has a field called ``type``, which the encoding reserves for the name."""
    for cls in wire.MESSAGE_TYPES.values():
        assert "type" not in attrs.fields_dict(cast("type[attrs.AttrsInstance]", cls))


# --------------------------------------------------------------------------- byte-exact


@pytest.mark.parametrize(
    ("msg", "body"),
    [
        (wire.Ping(), b'{"type":"ping"}'),
        (wire.SubmitReply(cluster=32, count=2), b'{"cluster":32,"count":2,"type":"submit_reply"}'),
        (
            wire.Welcome(broker_key=b"\x00\x01\x02"),
            b'{"broker_key":"AAEC","type":"welcome"}',
        ),
        (
            wire.Error(code="denied", message="caf\u00e9 \u2603"),
            b'{"code":"denied","message":"caf\xc3\xa9 \xe2\x98\x83","type":"error"}',
        ),
        (
            wire.Submit(spec=wire.JobSpec(executable="/bin/sleep", args=("60",), env={"A": "1"})),
            b'{"spec":{"executable":"/bin/sleep","args":["60"],"env":{"A":"1"},"initialdir":"/",'
            b'"hold_on_failure":false,"debug_on":[],"debug_hold_ttl":0.0,"time_limit":0.0,'
            b'"ssh":true,"ssh_users":[],"ssh_from":[]},"count":1,"type":"submit"}',
        ),
        (
            wire.SessionOpen(capability=b"cap", shells=("bash", "sh")),
            b'{"capability":"Y2Fw","shells":["bash","sh"],"persist":"","type":"session_open"}',
        ),
        (
            wire.JobTable(columns=("id", "args"), rows='[["1.0",["\\"\n\u00fc"]]]', last=False),
            b'{"columns":["id","args"],"last":false,"type":"job_table"}\n'
            b'[["1.0",["\\"\n\xc3\xbc"]]]',
        ),
        (
            wire.JobList(jobs=(), last=False),
            b'{"jobs":[],"last":false,"type":"job_list"}',
        ),
    ],
    ids=lambda v: v.TYPE if isinstance(v, Message) else "",
)
def test_encoding_is_byte_exact(msg: Message, body: bytes) -> None:
    """Compact JSON, fields in declaration order, ``type`` last, bytes as base64, raw UTF-8."""
    assert encode_message(msg) == body
    assert decode_message(body) == msg


def test_job_table_rows_are_the_body_after_the_header() -> None:
    """A job_table's rows follow its header and a line feed as raw UTF-8, never as a JSON
    string; its header is strict and bounded, and rows given twice or not as the body, or
    not UTF-8, are refused."""
    head = b'{"columns":[],"type":"job_table"}'
    assert decode_message(head + b"\n") == wire.JobTable(columns=(), rows="")
    # Everything after the first line feed is the body, line feeds and JSON text included.
    got = decode_message(head + b'\n\n{"type":"ping"}\n')
    assert got == wire.JobTable(columns=(), rows='\n{"type":"ping"}\n')
    # The header is decoded as strictly as any payload.
    refused(b'{"columns":[],"type":"job_table","columns":[]}\n[]', "not valid UTF-8 JSON")
    refused(b'{"columns":[],"type":"job_table","x":1}\n[]', r"unknown field\(s\) \['x'\]")
    refused(b'{"type":"job_table"}\n[]', "field columns: missing")
    refused(b'{"columns":[],"rows":"[]","type":"job_table"}\n[]', "rows: given in the header")
    refused(head + b"\n[\xff]", "field rows: not valid UTF-8")
    refused(head + b"\n\xed\xa0\x80", "field rows: not valid UTF-8")
    # Without a body (rows as a string field, or the line feed inside the JSON) it is refused.
    refused(b'{"columns":[],"rows":"[]","type":"job_table"}', "after a line feed")
    refused(b'{"columns":[],\n"rows":"[]","type":"job_table"}', "after a line feed")
    # A header over MAX_HEAD bytes is not looked for: the payload is then one JSON value.
    pad = b" " * (MAX_HEAD - len(head) + 1)
    refused(head[:-1] + pad + b"}\n[]", "not valid UTF-8 JSON")
    assert decode_message(head[:-1] + pad[1:] + b"}\n[]") == wire.JobTable(columns=(), rows="[]")
    big = wire.JobTable(columns=("x" * MAX_HEAD,), rows="[]")
    with pytest.raises(LocalProtocolError, match="header is over"):
        encode_message(big)
    # Other messages may still hold JSON whitespace, line feeds included.
    assert decode_message(b'{"type":"ping"}\n') == wire.Ping()
    assert decode_message(b'{"type":\n"ping"}') == wire.Ping()


def test_whole_frame_bytes() -> None:
    """A ping on the wire is exactly the 4-byte length 15 and its 15 bytes of JSON."""
    assert encode_frame(encode_message(wire.Ping())) == b'\x00\x00\x00\x0f{"type":"ping"}'


def test_decoding_ignores_key_order_and_whitespace() -> None:
    """Any key order and JSON whitespace decode to the same message."""
    msg = decode_message(b' { "count" : 2 ,\n "type":"submit_reply", "cluster":32 } ')
    assert msg == wire.SubmitReply(cluster=32, count=2)


def test_missing_defaulted_fields_take_their_defaults() -> None:
    """Fields with defaults may be left out; the decoded message has the defaults."""
    assert decode_message(b'{"type":"query"}') == wire.Query(ids=(), history=False, owner="")
    job = decode_message(b'{"type":"submit","spec":{"executable":"x"}}')
    assert job == wire.Submit(spec=wire.JobSpec("x"), count=1)


def test_optional_fields_accept_null() -> None:
    """``null`` is accepted exactly where a field is optional, and means None."""
    info = {
        "id": "1.0",
        "owner": "ann",
        "owner_uid": 1000,
        "state": "running",
        "executable": "x",
        "args": [],
        "submitted": 5,
        "started": None,
        "exit_code": None,
    }
    msg = decode_message(json.dumps({"type": "job_list", "jobs": [info]}).encode())
    assert isinstance(msg, wire.JobList)
    assert msg.jobs[0].started is None
    assert msg.jobs[0].submitted == 5.0
    assert type(msg.jobs[0].submitted) is float


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_every_type(cls: type[Message], data: st.DataObject) -> None:
    """decode(encode(m)) == m for every message type, and encoding is deterministic."""
    msg = data.draw(STRATEGIES[cls])
    body = encode_message(msg)
    back = decode_message(body)
    assert back == msg
    assert type(back) is cls
    assert encode_message(back) == body


@settings(max_examples=60)
@given(msgs=st.lists(any_message, min_size=1, max_size=5), junk=st.binary(max_size=3))
def test_round_trip_through_frames(msgs: list[Message], junk: bytes) -> None:
    """Messages framed into one stream decode back whole, at once and byte by byte, junk kept."""
    stream = b"".join(encode_frame(encode_message(m)) for m in msgs) + junk
    for chunk in (len(stream), 1):
        dec = wire.FrameDecoder()
        got = []
        for i in range(0, len(stream), chunk):
            dec.receive_data(stream[i : i + chunk])
            while isinstance(frame := dec.next_frame(), bytes):
                got.append(decode_message(frame))
        assert got == msgs
        assert dec.buffered == junk


# --------------------------------------------------------------------------- strict decoding


def refused(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(payload)


def body(type_: str, **fields: Any) -> bytes:
    return json.dumps({"type": type_, **fields}).encode()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not valid UTF-8 JSON"),
        (b"{", "not valid UTF-8 JSON"),
        (b'{"type":"ping"} x', "not valid UTF-8 JSON"),
        (b'{"type":"ping"}{}', "not valid UTF-8 JSON"),
        (b'\xff{"type":"ping"}', "not valid UTF-8 JSON"),
        (b'{"type":"ping",}', "not valid UTF-8 JSON"),
        (b"{'type':'ping'}", "not valid UTF-8 JSON"),
    ],
    ids=[
        "empty",
        "unterminated",
        "trailing-junk",
        "two-objects",
        "bad-utf8",
        "trailing-comma",
        "single-quotes",
    ],
)
def test_malformed_json(payload: bytes, match: str) -> None:
    """A payload that is not exactly one UTF-8 JSON value is the peer's error."""
    refused(payload, match)


@pytest.mark.parametrize(
    "payload", [b"[]", b'"ping"', b"null", b"1", b"true", b'[{"type":"ping"}]']
)
def test_non_object(payload: bytes) -> None:
    """A payload that is JSON but not an object is refused."""
    refused(payload, "not a JSON object")


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b'{"type":"nope"}',
        b'{"type":1}',
        b'{"type":null}',
        b'{"type":"Ping"}',
        b'{"type":["ping"]}',
        b'{"type":"message"}',
    ],
)
def test_unknown_type(payload: bytes) -> None:
    """A missing, misspelt or non-string ``type`` is refused."""
    refused(payload, "unknown message type")


def test_unknown_field() -> None:
    """A field the message does not have is refused, by name, at top level and nested."""
    refused(body("ping", extra=1), r"field Ping: unknown field\(s\) \['extra'\]")
    refused(body("submit", spec={"executable": "x", "shell": "sh"}), r"field spec: unknown .*shell")


def test_duplicate_key() -> None:
    """A key given twice is refused, instead of silently keeping the last one."""
    refused(b'{"type":"ping","type":"ping"}', "duplicate key 'type'")
    refused(b'{"type":"submit_reply","cluster":1,"cluster":2,"count":1}', "duplicate key")


def test_missing_field() -> None:
    """A required field that is absent is refused with its path."""
    refused(body("ssh_request", job="1.0"), "field client_key: missing")
    refused(body("submit", spec={}), "field spec.executable: missing")
    run = {"id": "1.0", "uid": 1, "gid": 1, "owner": "a"}
    refused(body("run_job", job=run), "field job.spec: missing")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"cluster": True, "count": 1}, "field cluster: expected an integer"),
        ({"cluster": 1, "count": False}, "field count: expected an integer"),
        ({"cluster": 1.0, "count": 1}, "field cluster: expected an integer"),
        ({"cluster": "1", "count": 1}, "field cluster: expected an integer"),
        ({"cluster": None, "count": 1}, "field cluster: expected an integer"),
        ({"cluster": 2**63, "count": 1}, "field cluster: expected an integer"),
        ({"cluster": -(2**63) - 1, "count": 1}, "field cluster: expected an integer"),
        ({"cluster": 10**400, "count": 1}, "field cluster: expected an integer"),
    ],
    ids=["true", "false", "float", "string", "null", "2**63", "-2**63-1", "10**400"],
)
def test_integers_are_strict(fields: dict[str, Any], match: str) -> None:
    """Integer fields take only JSON integers in the signed 64-bit range, never booleans."""
    refused(body("submit_reply", **fields), match)


def test_integer_range_edges_accepted() -> None:
    """The signed 64-bit extremes themselves are accepted."""
    low = decode_message(body("submit_reply", cluster=-(2**63), count=2**63 - 1))
    assert low == wire.SubmitReply(cluster=-(2**63), count=2**63 - 1)


def test_integer_too_long_for_python() -> None:
    """An integer of thousands of digits is the peer's error, not a bare ValueError."""
    refused(b'{"type":"submit_reply","cluster":' + b"9" * 5000 + b',"count":1}', "not valid")


def jobinfo(**over: Any) -> bytes:
    info = {
        "id": "1.0",
        "owner": "a",
        "owner_uid": 1,
        "state": "r",
        "executable": "x",
        "args": [],
        "submitted": 1.5,
    }
    info.update(over)
    return json.dumps({"type": "job_list", "jobs": [info]}).encode()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (jobinfo(submitted="1.5"), "jobs\\[0\\].submitted: expected a finite number"),
        (jobinfo(submitted=True), "jobs\\[0\\].submitted: expected a finite number"),
        (jobinfo(submitted=10**400), "jobs\\[0\\].submitted: expected a finite number"),
        (jobinfo().replace(b"1.5", b"1e400"), "jobs\\[0\\].submitted: expected a finite number"),
        (jobinfo().replace(b"1.5", b"NaN"), "NaN is not JSON"),
        (jobinfo().replace(b"1.5", b"-Infinity"), "-Infinity is not JSON"),
    ],
    ids=["string", "bool", "huge-int", "1e400", "NaN", "-Infinity"],
)
def test_floats_are_finite_numbers(payload: bytes, match: str) -> None:
    """Number fields take finite JSON numbers only: no NaN, no infinity, no overflow."""
    refused(payload, match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"broker_key": "!!!!"}, "field broker_key: invalid base64"),
        ({"broker_key": "AAE"}, "field broker_key: invalid base64"),
        ({"broker_key": "AA EC"}, "field broker_key: invalid base64"),
        ({"broker_key": "AAEC\n"}, "field broker_key: invalid base64"),
        ({"broker_key": "AA-_"}, "field broker_key: invalid base64"),
        ({"broker_key": "\u00e9\u00e9\u00e9\u00e9"}, "field broker_key: invalid base64"),
        ({"broker_key": 5}, "field broker_key: expected base64 text"),
        ({"broker_key": [0, 1]}, "field broker_key: expected base64 text"),
    ],
    ids=["punctuation", "unpadded", "space", "newline", "urlsafe", "non-ascii", "int", "list"],
)
def test_bytes_are_strict_base64(fields: dict[str, Any], match: str) -> None:
    """Bytes fields take standard, padded base64 text with nothing else in it."""
    refused(body("welcome", **fields), match)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (body("query", history=0), "field history: expected true or false"),
        (body("query", history="true"), "field history: expected true or false"),
        (body("error", code=1, message="m"), "field code: expected a string"),
        (body("error", code=None, message="m"), "field code: expected a string"),
        (body("query", ids="1.0"), "field ids: expected a list"),
        (body("query", ids={"0": "1.0"}), "field ids: expected a list"),
        (body("query", ids=["1.0", 2]), r"field ids\[1\]: expected a string"),
        (body("submit", spec={"executable": "x", "env": []}), "spec.env: expected an object"),
        (body("submit", spec={"executable": "x", "env": {"A": 1}}), "spec.env.A: expected a str"),
        (body("submit", spec="x"), "field spec: expected an object"),
        (body("act_reply", results=[["1.0", True, ""]]), r"results\[0\]: expected an object"),
        (body("error", code="\ud800", message="m"), "field code: string is not valid Unicode"),
        (body("submit", spec={"executable": "x", "env": {"\udfff": ""}}), "spec.env: string is"),
        (body("submit", spec={"executable": "x", "env": {"A": "\ud800"}}), "spec.env.A: string"),
    ],
    ids=[
        "bool-int",
        "bool-str",
        "str-int",
        "str-null",
        "list-str",
        "list-obj",
        "list-item",
        "map-list",
        "map-value",
        "obj-str",
        "obj-list",
        "surrogate",
        "surrogate-key",
        "surrogate-value",
    ],
)
def test_wrong_types_name_the_field(payload: bytes, match: str) -> None:
    """A value of the wrong JSON type is refused with the path of the field that holds it."""
    refused(payload, match)


def test_validators_are_the_peers_error() -> None:
    """A value the class's own validator refuses is a RemoteProtocolError naming the field."""
    refused(body("act", action="shutdown"), "field Act: 'action' must be in")
    refused(body("submit", spec={"executable": "x"}, count=-1), "count must be >= 0, not -1")


def test_act_accepts_exactly_the_known_actions() -> None:
    """Act takes rm, hold, release, suspend and continue, and nothing else."""
    for action in ACTIONS:
        assert decode_message(body("act", action=action)) == wire.Act(action=action)
    with pytest.raises(ValueError, match="action"):
        wire.Act(action="kill")


def test_list_length_limit() -> None:
    """A list of more than 100 000 items is refused even when the frame would allow it."""
    ok = b'{"type":"ack","ids":[' + b",".join([b'""'] * 100_000) + b"]}"
    assert decode_message(ok) == wire.Ack(ids=("",) * 100_000)
    refused(ok.replace(b'"ids":[', b'"ids":["",'), "field ids: expected a list")


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"type":"query","ids":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"type":"query","ids":' + b"[" * 500 + b"]" * 500 + b"}",
    ],
    ids=["lists", "objects", "inside-a-field", "moderate"],
)
def test_deep_nesting(payload: bytes) -> None:
    """Deeply nested JSON is refused as the peer's error, not a crash of the decoder."""
    with pytest.raises(RemoteProtocolError):
        decode_message(payload)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=15,
)


@given(payload=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_remote_errors(payload: bytes) -> None:
    """Whatever bytes arrive, decoding yields a message or a RemoteProtocolError, nothing else."""
    try:
        decode_message(payload)
    except RemoteProtocolError:
        pass


@settings(max_examples=200)
@given(msg=any_message, data=st.data())
def test_mutated_fields_only_raise_remote_errors(msg: Message, data: st.DataObject) -> None:
    """Replacing any field of a valid message with any JSON value decodes or is refused cleanly."""
    head, lf, rows = encode_message(msg).partition(b"\n")
    obj = json.loads(head)
    if lf:  # a job_table: its rows are the body, raw text the codec does not parse
        obj["rows"] = rows.decode()
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(JSON)
    text = obj.pop("rows") if lf and type(obj.get("rows")) is str else None
    try:
        decoded = decode_message(
            json.dumps(obj).encode() + (b"" if text is None else b"\n" + text.encode())
        )
    except RemoteProtocolError:
        return
    assert isinstance(decoded, Message)


# --------------------------------------------------------------------------- encoding misuse


def test_encode_refuses_non_messages() -> None:
    """Encoding something that is not a message is our own error."""
    with pytest.raises(LocalProtocolError, match="not a protocol message"):
        encode_message(wire.JobSpec(executable="x"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not a protocol message"):
        encode_message(Message())


@pytest.mark.parametrize(
    "msg",
    [
        wire.JobUpdate(report=wire.JobReport(id="1.0", running=False, started=float("nan"))),
        wire.JobUpdate(report=wire.JobReport(id="1.0", running=False, finished=float("inf"))),
        wire.Error(code="x", message="\ud800"),
    ],
    ids=["nan", "inf", "surrogate"],
)
def test_encode_refuses_what_the_decoder_would(msg: Message) -> None:
    """A message the peer's decoder would refuse (NaN, infinity, lone surrogate) is not sent."""
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode_message(msg)
