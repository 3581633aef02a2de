"""Signed statements and capabilities: canonical bytes, every check, replay; and job ids."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job import wire
from ssh_to_job.wire import (
    CLOCK_SKEW,
    MAX_CAP_LIFETIME,
    Capability,
    CapabilityError,
    JobId,
    ReplayCache,
    parse_job_id,
    sign,
    sign_capability,
    verify,
    verify_capability,
)

BROKER_SK = bytes(range(32))
BROKER_PK = wire.public_key_of(BROKER_SK)
OTHER_SK = bytes(range(1, 33))
STARTER_PK = b"\x01" * 32
T0 = 1_700_000_000

CAP = Capability(
    session_id="s1",
    job="32.0",
    owner_uid=1000,
    requester_uid=1001,
    client_key="ssh-ed25519 AAAA",
    starter_id="st1",
    starter_key=STARTER_PK,
    issued_at=T0,
    expires_at=T0 + MAX_CAP_LIFETIME,
)
BLOB = sign_capability(CAP, BROKER_SK)


def field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


# --------------------------------------------------------------------------- primitives


def test_sign_is_standard_ed25519() -> None:
    """sign/public_key_of reproduce RFC 8032's first Ed25519 test vector."""
    sk = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    assert wire.public_key_of(sk).hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert sign(sk, b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
        "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_verify_answers_false_never_raises() -> None:
    """verify says False for a wrong signature, key, message or malformed lengths."""
    sig = sign(BROKER_SK, b"m")
    assert verify(BROKER_PK, b"m", sig)
    assert not verify(BROKER_PK, b"n", sig)
    assert not verify(wire.public_key_of(OTHER_SK), b"m", sig)
    assert not verify(BROKER_PK, b"m", sig[:-1])
    assert not verify(BROKER_PK, b"m", sig + b"\0")
    assert not verify(BROKER_PK[:31], b"m", sig)
    assert not verify(b"\xff" * 32, b"m", sig)
    assert not verify(BROKER_PK, b"m", b"\0" * 64)


def test_new_signing_keys_are_fresh() -> None:
    """new_signing_key gives a different 32-byte seed each time, with a 32-byte public key."""
    a, b = wire.new_signing_key(), wire.new_signing_key()
    assert len(a) == len(b) == 32
    assert a != b
    assert len(wire.public_key_of(a)) == 32


def test_same_secret() -> None:
    """same_secret compares bytes for equality."""
    assert wire.same_secret(b"abc", b"abc")
    assert not wire.same_secret(b"abc", b"abd")
    assert not wire.same_secret(b"abc", b"ab")


# --------------------------------------------------------------------------- canonical bytes


def test_statements_are_byte_exact() -> None:
    """Each statement is its NUL-terminated domain, then 4-byte-length-prefixed fields."""
    assert wire.host_key_statement("s1", "ann", "ssh-ed25519 AAAA") == (
        b"ssh-to-job host key v1\x00" + field(b"s1") + field(b"ann") + field(b"ssh-ed25519 AAAA")
    )
    assert wire.host_key_statement("\u00e9", "", "") == (
        b"ssh-to-job host key v1\x00" + field(b"\xc3\xa9") + field(b"") + field(b"")
    )


def test_capability_encoding_is_byte_exact() -> None:
    """A capability is its domain, nine fields in order (ints as decimal ASCII), then 64 bytes."""
    body = (
        b"ssh-to-job capability v1\x00"
        + field(b"s1")
        + field(b"32.0")
        + field(b"1000")
        + field(b"1001")
        + field(b"ssh-ed25519 AAAA")
        + field(b"st1")
        + field(STARTER_PK)
        + field(b"1700000000")
        + field(b"1700000060")
    )
    assert CAP.encode() == body
    assert BLOB[:-64] == body
    assert len(BLOB) == len(body) + 64
    assert verify(BROKER_PK, body, BLOB[-64:])
    assert Capability.decode(body) == CAP


def test_field_boundaries_are_unambiguous() -> None:
    """Moving bytes between neighbouring fields changes the statement."""
    assert wire.host_key_statement("ab", "c", "") != wire.host_key_statement("a", "bc", "")
    assert wire.host_key_statement("s", "", "x") != wire.host_key_statement("s", "x", "")


# --------------------------------------------------------------------------- capabilities


def test_round_trip() -> None:
    """A capability signed by the broker verifies with its key and gives back every field."""
    assert verify_capability(BLOB, BROKER_PK, now=T0) == CAP
    assert verify_capability(BLOB, BROKER_PK, now=T0 + 30.5) == CAP


@settings(max_examples=50)
@given(
    st.builds(
        Capability,
        session_id=st.text(),
        job=st.text(),
        owner_uid=st.integers(),
        requester_uid=st.integers(),
        client_key=st.text(),
        starter_id=st.text(),
        starter_key=st.binary(),
        issued_at=st.integers(-(2**40), 2**40),
        expires_at=st.just(0),
    ),
    st.integers(0, MAX_CAP_LIFETIME),
)
def test_round_trip_any_fields(cap: Capability, lifetime: int) -> None:
    """Any field values survive signing and verification unchanged."""
    cap = attrs.evolve(cap, expires_at=cap.issued_at + lifetime)
    blob = sign_capability(cap, BROKER_SK)
    assert Capability.decode(blob[:-64]) == cap
    assert verify_capability(blob, BROKER_PK, now=cap.issued_at) == cap


@given(pos=st.integers(0, len(BLOB) - 1), flip=st.integers(1, 255))
def test_any_single_byte_tampered(pos: int, flip: int) -> None:
    """Changing any one byte of a capability, body or signature, makes it fail verification."""
    bad = bytearray(BLOB)
    bad[pos] ^= flip
    with pytest.raises(CapabilityError):
        verify_capability(bytes(bad), BROKER_PK, now=T0)


@pytest.mark.parametrize("name", [f.name for f in attrs.fields(Capability)])
def test_every_field_is_signed(name: str) -> None:
    """Swapping any one field for another value under the old signature is refused."""
    value = getattr(CAP, name)
    other: Any = value + 1 if isinstance(value, int) else value + value[:1]
    forged = attrs.evolve(CAP, **{name: other}).encode() + BLOB[-64:]
    with pytest.raises(CapabilityError, match="signature does not verify"):
        verify_capability(forged, BROKER_PK, now=T0)


def test_wrong_broker_key() -> None:
    """A capability signed by another broker does not verify."""
    with pytest.raises(CapabilityError, match="another broker"):
        verify_capability(sign_capability(CAP, OTHER_SK), BROKER_PK, now=T0)
    with pytest.raises(CapabilityError):
        verify_capability(BLOB, b"", now=T0)


def test_expiry_allows_clock_skew_and_no_more() -> None:
    """A capability verifies until CLOCK_SKEW seconds after expiry, and not a moment later."""
    assert CLOCK_SKEW == 5
    end = CAP.expires_at + CLOCK_SKEW
    assert verify_capability(BLOB, BROKER_PK, now=end) == CAP
    with pytest.raises(CapabilityError, match="expired 5 s ago"):
        verify_capability(BLOB, BROKER_PK, now=end + 0.001)
    with pytest.raises(CapabilityError, match="expired 3600 s ago"):
        verify_capability(BLOB, BROKER_PK, now=CAP.expires_at + 3600)


def test_not_yet_valid() -> None:
    """A capability issued in the future is refused beyond CLOCK_SKEW seconds of skew."""
    start = CAP.issued_at - CLOCK_SKEW
    assert verify_capability(BLOB, BROKER_PK, now=start) == CAP
    with pytest.raises(CapabilityError, match="not valid yet"):
        verify_capability(BLOB, BROKER_PK, now=start - 0.001)


def test_overlong_lifetime_refused_at_signing() -> None:
    """The broker cannot sign a capability that lives longer than MAX_CAP_LIFETIME seconds."""
    assert MAX_CAP_LIFETIME == 60
    with pytest.raises(ValueError, match="lifetime exceeds 60 s"):
        sign_capability(attrs.evolve(CAP, expires_at=T0 + 61), BROKER_SK)


def test_overlong_lifetime_refused_at_verify() -> None:
    """A correctly signed capability with a lifetime over the limit is still refused."""
    long = attrs.evolve(CAP, expires_at=T0 + 61)
    blob = long.encode() + sign(BROKER_SK, long.encode())
    with pytest.raises(CapabilityError, match="lifetime is longer than allowed"):
        verify_capability(blob, BROKER_PK, now=T0)


def test_truncated_blobs() -> None:
    """Every proper prefix of a capability, and one with bytes appended, is refused."""
    for n in range(len(BLOB)):
        with pytest.raises(CapabilityError):
            verify_capability(BLOB[:n], BROKER_PK, now=T0)
    with pytest.raises(CapabilityError):
        verify_capability(BLOB + b"\0", BROKER_PK, now=T0)
    with pytest.raises(CapabilityError, match="truncated"):
        verify_capability(BLOB[:64], BROKER_PK, now=T0)


def signed(body: bytes) -> bytes:
    return body + sign(BROKER_SK, body)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"ssh-to-job capability v1\x00" + field(b"s1") * 8, "has 8 fields, expected 9"),
        (CAP.encode() + field(b""), "has 10 fields, expected 9"),
        (CAP.encode()[:-3], "truncated"),
        (CAP.encode() + b"\x00\x00", "truncated"),
        (CAP.encode().replace(field(b"1000"), field(b"10x0")), "malformed field"),
        (CAP.encode().replace(field(b"s1"), field(b"\xff\xfe")), "malformed field"),
        (CAP.encode().replace(field(b"1000"), field(b" 1000")), "not in canonical form"),
        (CAP.encode().replace(field(b"1000"), field(b"+1000")), "not in canonical form"),
        (CAP.encode().replace(field(b"1000"), field(b"01000")), "not in canonical form"),
        (CAP.encode().replace(field(b"1000"), field(b"1_000")), "not in canonical form"),
        (CAP.encode().replace(field(b"1000"), field("١٠٠٠".encode())), "not in canonical form"),
        (b"ssh-to-job capability v2\x00" + CAP.encode()[25:], "wrong domain"),
    ],
    ids=[
        "8-fields",
        "10-fields",
        "short-field",
        "short-length",
        "not-a-number",
        "not-utf8",
        "space",
        "plus",
        "leading-zero",
        "underscore",
        "arabic-digits",
        "v2",
    ],
)
def test_malformed_but_signed_bodies(body: bytes, match: str) -> None:
    """Even validly signed, a body that is not exactly one canonical capability is refused."""
    with pytest.raises(CapabilityError, match=match):
        verify_capability(signed(body), BROKER_PK, now=T0)


# --------------------------------------------------------------------------- domain separation


STATEMENTS = {
    "host_key": wire.host_key_statement("s1", "st1", "n"),
    "capability": b"ssh-to-job capability v1\x00" + field(b"s1") + field(b"st1") + field(b"n"),
}


def test_statements_with_equal_fields_differ() -> None:
    """The two kinds of statement over the same field bytes are different byte strings."""
    assert len(set(STATEMENTS.values())) == 2
    assert all(s.endswith(field(b"s1") + field(b"st1") + field(b"n")) for s in STATEMENTS.values())


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(STATEMENTS, 2)))
def test_signature_does_not_cross_statements(a: str, b: str) -> None:
    """A signature over one kind of statement never verifies as another kind."""
    sig = sign(BROKER_SK, STATEMENTS[a])
    assert verify(BROKER_PK, STATEMENTS[a], sig)
    assert not verify(BROKER_PK, STATEMENTS[b], sig)


@pytest.mark.parametrize("name", ["host_key"])
def test_statement_is_not_a_capability(name: str) -> None:
    """A broker-signed statement of another kind is refused as a capability."""
    with pytest.raises(CapabilityError, match="wrong domain"):
        verify_capability(signed(STATEMENTS[name]), BROKER_PK, now=T0)


def test_capability_signature_is_not_a_host_key_signature() -> None:
    """The capability's signature does not vouch for a host key with the same session id."""
    stmt = wire.host_key_statement(CAP.session_id, "ann", CAP.client_key)
    assert not verify(BROKER_PK, stmt, BLOB[-64:])


# --------------------------------------------------------------------------- replay


def test_replay_cache_single_use() -> None:
    """Each session id is accepted once while its capability could still verify."""
    cache = ReplayCache()
    cache.use("s1", T0 + 60, now=T0)
    with pytest.raises(CapabilityError, match="already used"):
        cache.use("s1", T0 + 60, now=T0 + 1)
    cache.use("s2", T0 + 60, now=T0 + 1)
    assert len(cache) == 2
    with pytest.raises(CapabilityError, match="already used"):
        cache.use("s1", T0 + 60, now=T0 + 60 + CLOCK_SKEW)


def test_replay_cache_prunes_expired_ids() -> None:
    """Ids are forgotten once their capability can no longer verify, and not before."""
    cache = ReplayCache()
    cache.use("s1", T0 + 10, now=T0)
    cache.use("s2", T0 + 60, now=T0)
    cache.use("s3", T0 + 20, now=T0 + 10 + CLOCK_SKEW)
    assert len(cache) == 3
    cache.use("s4", T0 + 60, now=T0 + 10 + CLOCK_SKEW + 0.5)
    assert len(cache) == 3  # s1 gone
    # The forgotten id is accepted by the cache again, but verify_capability already refuses it:
    # the two windows are the same, so pruning never opens a replay.
    expired = attrs.evolve(CAP, session_id="s1", issued_at=T0 - 50, expires_at=T0 + 10)
    with pytest.raises(CapabilityError, match="expired"):
        verify_capability(sign_capability(expired, BROKER_SK), BROKER_PK, now=T0 + 15.5)
    cache.use("s1", T0 + 10, now=T0 + 15.5)
    cache.use("s5", T0 + 60, now=T0 + 60 + CLOCK_SKEW + 1)
    assert len(cache) == 1


# --------------------------------------------------------------------------- job ids


@pytest.mark.parametrize(
    ("text", "job"),
    [
        ("32", JobId(32)),
        ("32.0", JobId(32, 0)),
        ("32.1.4", JobId(32, 1, 4)),
        ("0", JobId(0)),
        ("007.08", JobId(7, 8)),
        (" 32.0\n", JobId(32, 0)),
        ("999999999999.999999999.999999999", JobId(999999999999, 999999999, 999999999)),
    ],
)
def test_parse_job_id_accepts(text: str, job: JobId) -> None:
    """cluster, cluster.proc and cluster.proc.node parse, with surrounding whitespace ignored."""
    assert parse_job_id(text) == job


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        ".",
        "32.",
        ".0",
        "32..0",
        "32.0.",
        "a",
        "32.a",
        "-1",
        "+1",
        "32.-1",
        "1e3",
        "32.0.1.2",
        "1" * 13,
        "32." + "1" * 10,
        "32 .0",
        "32. 0",
        "32,0",
        "0x20",
        "\u0663\u0662",
        "\uff13\uff12",
        "32.\u0660",
    ],
)
def test_parse_job_id_rejects(text: str) -> None:
    """Anything else, including non-ASCII digits and over-long numbers, is a ValueError."""
    with pytest.raises(ValueError, match="is not a job id"):
        parse_job_id(text)


def test_job_id_one_and_str() -> None:
    """``one`` names a single job (a bare cluster means proc 0); str gives cluster[.proc]."""
    assert JobId(32).one == "32.0"
    assert JobId(32, 3).one == "32.3"
    assert JobId(32, 3, 1).one == "32.3"
    assert str(JobId(32)) == "32"
    assert str(JobId(32, 3)) == "32.3"


def test_job_id_matches() -> None:
    """A bare cluster matches all its procs; cluster.proc matches only that proc."""
    assert JobId(32).matches("32.0")
    assert JobId(32).matches("32.7")
    assert not JobId(32).matches("33.0")
    assert not JobId(32).matches("320.0")
    assert JobId(32, 1).matches("32.1")
    assert JobId(32, 1, 2).matches("32.1")
    assert not JobId(32, 1).matches("32.0")
    assert not JobId(32, 1).matches("3.21")


def test_protocol_doc_worked_example() -> None:
    """The worked example in docs/protocol.md is what the code produces, byte for byte."""
    broker_sk, starter_sk = bytes(range(32)), bytes(range(32, 64))
    starter_pk = wire.public_key_of(starter_sk)
    assert starter_pk.hex() == "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"
    cap = Capability(
        session_id="5e1f",
        job="32.0",
        owner_uid=1000,
        requester_uid=1000,
        client_key="ssh-ed25519 AAAA",
        starter_id="node1",
        starter_key=starter_pk,
        issued_at=1_700_000_000,
        expires_at=1_700_000_060,
    )
    assert sign_capability(cap, broker_sk).hex() == (
        "7373682d746f2d6a6f62206361706162696c69747920763100"
        "00000004"
        "35653166"
        "00000004"
        "33322e30"
        "00000004"
        "31303030"
        "00000004"
        "31303030"
        "00000010"
        "7373682d656432353531392041414141"
        "00000005"
        "6e6f646531"
        "00000020" + starter_pk.hex() + "0000000a"
        "31373030303030303030"
        "0000000a"
        "31373030303030303630"
        "af8f992dd24d229f2a7a4ae41efb8f03fff8bccbe51fe55e9969d3fd0e4005b6"
        "d358f789ba3ff171a8c328932e531c23ded48071ccd6378c08a9f0693498df00"
    )
