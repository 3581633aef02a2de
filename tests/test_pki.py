"""The pool CA (common._pki), join tokens and the enrolment exchange (common._token), no network."""

from __future__ import annotations

import datetime
import os
import pathlib
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from ssh_to_job import common, wire
from ssh_to_job.common import (
    BrokerEnrollment,
    BrokerPki,
    EnrollCa,
    EnrollError,
    EnrollHello,
    EnrollReply,
    EnrollRequest,
    JoinToken,
    PkiError,
    PoolCA,
    StarterEnrollment,
    StarterPki,
    TokenBook,
    TokenError,
    decode_enroll,
    encode_enroll,
    parse_token,
)
from ssh_to_job.common._token import RETAIN

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_broker_pki_lays_out_its_files_privately(tmp_path: pathlib.Path) -> None:
    """The CA key and broker key are 0600 in a 0700 directory, certificates 0644."""
    pki = BrokerPki.open(tmp_path / "pki", hosts=("127.0.0.1", "broker.example"))
    assert _mode(tmp_path / "pki") == 0o700
    assert _mode(pki.directory / common.CA_KEY) == 0o600
    assert _mode(pki.key_file) == 0o600
    assert _mode(pki.ca_file) == 0o644
    assert _mode(pki.cert_file) == 0o644
    cert = common.load_cert(pki.cert_file)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert common.identity_of(cert) == wire.PeerName(pki.pool_id, "broker", "broker")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_reopening_keeps_the_pool_and_the_broker_certificate(tmp_path: pathlib.Path) -> None:
    """A restarted broker keeps its CA, pool id and (unchanged hosts) its certificate."""
    first = BrokerPki.open(tmp_path, hosts=("127.0.0.1",))
    serial = common.load_cert(first.cert_file).serial_number
    again = BrokerPki.open(tmp_path, hosts=("127.0.0.1",))
    assert again.pool_id == first.pool_id
    assert common.load_cert(again.cert_file).serial_number == serial
    moved = BrokerPki.open(tmp_path, hosts=("198.18.0.1",))
    assert common.load_cert(moved.cert_file).serial_number != serial


def test_broker_certificate_is_renewed_when_a_third_of_its_life_is_left(
    tmp_path: pathlib.Path,
) -> None:
    """needs_renewal turns true at 2/3 of the life, and open() then reissues."""
    pki = BrokerPki.open(tmp_path, now=NOW - datetime.timedelta(days=61))
    cert = common.load_cert(pki.cert_file)
    assert not common.needs_renewal(cert, NOW - datetime.timedelta(days=2))
    assert common.needs_renewal(cert, NOW)
    again = BrokerPki.open(tmp_path, now=NOW)
    assert common.load_cert(again.cert_file).serial_number != cert.serial_number


def test_a_key_readable_by_others_is_refused(tmp_path: pathlib.Path) -> None:
    """load_private_key refuses a key file with group or other bits."""
    pki = BrokerPki.open(tmp_path)
    os.chmod(pki.key_file, 0o640)
    with pytest.raises(PkiError, match="readable by others"):
        common.load_private_key(pki.key_file)


def test_starter_certificate_names_pool_role_and_name(tmp_path: pathlib.Path) -> None:
    """A starter certificate verifies against its CA with its stj:// identity and clientAuth."""
    pki = BrokerPki.open(tmp_path)
    key = common.new_private_key()
    cert = pki.issue("starter", "exec-1", key.public_key())
    ident = common.verify_leaf(cert, [pki.ca.cert], pool_id=pki.pool_id, role="starter")
    assert ident.uri == f"stj://{pki.pool_id}/starter/exec-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert [c.name for c in pki.issued()] == ["broker", "exec-1"]


def test_verify_leaf_refuses_other_pools_roles_names_and_dates(tmp_path: pathlib.Path) -> None:
    """A leaf fails for a foreign CA, another pool id, the wrong role or name, and out of date."""
    ca = PoolCA.generate(now=NOW)
    other = PoolCA.generate(now=NOW)
    cert = ca.issue("starter", "s1", common.new_private_key().public_key(), now=NOW)
    kw = {"pool_id": ca.pool_id, "now": NOW}
    assert common.verify_leaf(cert, [ca.cert], **kw).name == "s1"  # type: ignore[arg-type]
    with pytest.raises(PkiError, match="not signed by the pool CA"):
        common.verify_leaf(cert, [other.cert], **kw)  # type: ignore[arg-type]
    with pytest.raises(PkiError, match="pool"):
        common.verify_leaf(cert, [ca.cert], pool_id=other.pool_id, now=NOW)
    with pytest.raises(PkiError, match="not a broker one"):
        common.verify_leaf(cert, [ca.cert], role="broker", **kw)  # type: ignore[arg-type]
    with pytest.raises(PkiError, match="names 's1', not 's2'"):
        common.verify_leaf(cert, [ca.cert], name="s2", **kw)  # type: ignore[arg-type]
    late = NOW + datetime.timedelta(days=91)
    with pytest.raises(PkiError, match="not valid now"):
        common.verify_leaf(cert, [ca.cert], pool_id=ca.pool_id, now=late)


def test_same_ca_key_other_pool_id_is_another_pool() -> None:
    """The pool id in the URI is checked even where the chain verifies (a reused CA)."""
    ca = PoolCA.generate(now=NOW)
    forged = PoolCA(ca.key, PoolCA.generate(pool_id="otherpool", now=NOW).cert)
    cert = ca.issue("starter", "s1", common.new_private_key().public_key(), now=NOW)
    with pytest.raises(PkiError):
        common.verify_leaf(cert, [forged.cert], pool_id="otherpool", now=NOW)


def test_only_the_broker_gets_host_names() -> None:
    """Starter and client certificates carry no DNS or IP SANs."""
    ca = PoolCA.generate()
    with pytest.raises(ValueError, match="only the broker"):
        ca.issue("starter", "s", common.new_private_key().public_key(), dns_names=["x"])


def test_revocation_by_name_and_reload_on_change(tmp_path: pathlib.Path) -> None:
    """Revoking a name revokes each serial issued to it; another process's edit is seen."""
    pki = BrokerPki.open(tmp_path)
    a = pki.issue("starter", "a", common.new_private_key().public_key())
    a2 = pki.issue("starter", "a", common.new_private_key().public_key())
    b = pki.issue("starter", "b", common.new_private_key().public_key())
    assert not pki.revocations.is_revoked(a.serial_number)
    assert sorted(pki.revoke("starter", "a")) == sorted([a.serial_number, a2.serial_number])
    assert pki.revocations.is_revoked(a.serial_number)
    assert pki.revocations.is_revoked(a2.serial_number)
    assert not pki.revocations.is_revoked(b.serial_number)
    # Another reader of the same file (the broker process) sees an edit made by hand.
    reader = common.RevocationList(pki.directory / common.REVOKED)
    assert reader.is_revoked(a.serial_number)
    with open(reader.path, "a") as f:
        f.write(f"{b.serial_number:x}  # by hand\n")
    assert reader.is_revoked(b.serial_number)
    (reader.path).write_text("not-hex\n")
    with pytest.raises(PkiError, match="not a hex serial"):
        reader.is_revoked(1)


def test_ca_rotation_bundle_trusts_both_cas(tmp_path: pathlib.Path) -> None:
    """A new CA with the same pool id in a bundle with the old: leaves of both verify."""
    old = PoolCA.generate(now=NOW)
    new = PoolCA.generate(pool_id=old.pool_id, now=NOW)
    new.save(tmp_path)
    (tmp_path / common.CA_CERT).write_bytes(common.cert_pem(new.cert) + common.cert_pem(old.cert))
    assert PoolCA.load(tmp_path).cert == new.cert
    bundle = common.load_ca_bundle(tmp_path / common.CA_CERT)
    for ca in (old, new):
        leaf = ca.issue("starter", "s", common.new_private_key().public_key(), now=NOW)
        common.verify_leaf(leaf, bundle, pool_id=old.pool_id, now=NOW)
    (tmp_path / "mixed").write_bytes(
        common.cert_pem(new.cert) + common.cert_pem(PoolCA.generate().cert)
    )
    with pytest.raises(PkiError, match="one pool"):
        common.load_ca_bundle(tmp_path / "mixed")


# --------------------------------------------------------------------------- tokens


def test_token_round_trips_through_its_printable_form() -> None:
    """str() and parse_token are inverses, and the form is one shell-safe word."""
    book = TokenBook()
    token = book.create(b"\x01" * 32, 600, now=1000.0)
    text = str(token)
    assert text.startswith("stj1.")
    assert text.count(".") == 3
    assert all(c.isalnum() or c in "._-" for c in text)
    assert parse_token(text) == token
    assert parse_token(f"  {text}\n") == token


@pytest.mark.parametrize(
    "bad",
    ["", "stj1", "stj2.0123456789abcdef.x.y", "stj1.0123456789ABCDEF.aaa.bbb", "stj1.0.a.b"],
)
def test_malformed_tokens_are_refused_clearly(bad: str) -> None:
    """Anything but a well-formed token is a TokenError that says so."""
    with pytest.raises(TokenError) as info:
        parse_token(bad)
    assert info.value.code == "token_malformed"


def test_truncated_token_is_refused() -> None:
    """A token missing characters (a bad copy and paste) is refused, not misread."""
    text = str(TokenBook().create(b"\x02" * 32, 60, now=0.0))
    with pytest.raises(TokenError, match="truncated"):
        parse_token(text[:-1])


def test_token_is_single_use_and_expires() -> None:
    """A token works once; then "already used"; an unused one after its ttl "expired"."""
    book = TokenBook()
    t1 = book.create(b"\0" * 32, 600, now=1000.0)
    t2 = book.create(b"\0" * 32, 600, now=1000.0)
    book.redeem(t1.token_id, t1.secret, "exec-1", now=1001.0)
    with pytest.raises(TokenError, match="already used \\(by exec-1") as used:
        book.redeem(t1.token_id, t1.secret, "exec-2", now=1002.0)
    assert used.value.code == "token_used"
    with pytest.raises(TokenError, match="expired") as expired:
        book.redeem(t2.token_id, t2.secret, "exec-2", now=1600.0)
    assert expired.value.code == "token_expired"


def test_wrong_secret_reveals_nothing() -> None:
    """A wrong secret reads as an unknown token, and the token stays good."""
    book = TokenBook()
    t = book.create(b"\0" * 32, 600, now=0.0)
    with pytest.raises(TokenError) as info:
        book.redeem(t.token_id, b"\x00" * 32, "x", now=1.0)
    assert info.value.code == "token_unknown"
    book.redeem(t.token_id, t.secret, "x", now=2.0)


def test_token_book_keeps_only_hashes_and_survives_a_restart(tmp_path: pathlib.Path) -> None:
    """The saved book is 0600, holds no secret, and a used token stays used after loading."""
    book = TokenBook()
    t = book.create(b"\0" * 32, 600, now=0.0)
    book.redeem(t.token_id, t.secret, "s", now=1.0)
    path = tmp_path / "tokens.json"
    book.save(path)
    assert _mode(path) == 0o600
    data = path.read_bytes()
    assert t.secret.hex().encode() not in data
    assert str(t).split(".")[2].encode() not in data
    again = TokenBook.load(path)
    with pytest.raises(TokenError, match="already used"):
        again.redeem(t.token_id, t.secret, "s", now=2.0)
    assert TokenBook.load(tmp_path / "none").records == {}
    path.write_bytes(b"{}")
    with pytest.raises(TokenError, match="damaged"):
        TokenBook.load(path)


def test_purge_forgets_old_tokens() -> None:
    """Records go a day after expiry, so the book does not grow for ever."""
    book = TokenBook()
    book.create(b"\0" * 32, 60, now=0.0)
    book.purge(now=60 + RETAIN - 1)
    assert len(book.records) == 1
    book.purge(now=60 + RETAIN)
    assert book.records == {}


def test_token_ttl_is_bounded() -> None:
    """A zero or week-plus ttl is refused."""
    with pytest.raises(ValueError, match="ttl"):
        TokenBook().create(b"\0" * 32, 0, now=0.0)
    with pytest.raises(ValueError, match="ttl"):
        TokenBook().create(b"\0" * 32, 8 * 86400, now=0.0)


# --------------------------------------------------------------------------- codec

_SAMPLES = [
    EnrollHello(),
    EnrollCa("-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"),
    EnrollRequest("0123456789abcdef", b"\x00\xff" * 16, "exec-1", "PEM"),
    EnrollReply("cert", "ca"),
    wire.Error("token_used", "join token already used"),
]


def test_codec_bytes_exactly() -> None:
    """The encoding is wire's: compact JSON, type first, bytes as standard base64."""
    assert encode_enroll(EnrollHello()) == b'{"type":"enroll_hello","version":1}'
    req = EnrollRequest("0123456789abcdef", b"\x00\x01", "s", "K")
    assert encode_enroll(req) == (
        b'{"type":"enroll_request","token_id":"0123456789abcdef",'
        b'"secret":"AAE=","name":"s","public_key":"K"}'
    )


@pytest.mark.parametrize("msg", _SAMPLES)
def test_codec_round_trips_samples(msg: object) -> None:
    """Every message decodes to itself."""
    assert decode_enroll(encode_enroll(msg)) == msg  # type: ignore[arg-type]


@given(
    token_id=st.text(max_size=40),
    secret=st.binary(max_size=64),
    name=st.text(max_size=40),
    key=st.text(max_size=200),
)
def test_codec_round_trips_any_request(token_id: str, secret: bytes, name: str, key: str) -> None:
    """Any request, with any text (lone surrogates aside) and bytes, round-trips."""
    msg = EnrollRequest(token_id, secret, name, key)
    try:
        data = encode_enroll(msg)
    except UnicodeEncodeError:
        return  # lone surrogates cannot be sent; nothing to decode
    assert decode_enroll(data) == msg


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"type":"nope"}', "unknown or missing"),
        (b'{"type":["enroll_hello"]}', "unknown or missing"),
        (b'{"version":1}', "unknown or missing"),
        (b'{"type":"enroll_hello","version":1,"x":2}', "unknown field"),
        (b'{"type":"enroll_hello","version":true}', "must be int"),
        (b'{"type":"enroll_hello","version":"1"}', "must be int"),
        (b'{"type":"enroll_ca"}', "missing"),
        (b'{"type":"enroll_ca","ca_certs":1}', "must be str"),
        (b'{"type":"enroll_ca","ca_certs":"\\ud800"}', "Unicode"),
        (b'{"type":"enroll_hello","version":NaN}', "not valid JSON"),
        (b'{"type":"enroll_hello","type":"enroll_hello"}', "not valid JSON"),
        (
            b'{"type":"enroll_request","token_id":"a","secret":"!!","name":"n","public_key":"k"}',
            "not base64",
        ),
        (b"\xff", "not valid JSON"),
    ],
)
def test_codec_refuses_malformed_payloads(payload: bytes, why: str) -> None:
    """Each malformed payload is the peer's error, with a reason."""
    with pytest.raises(wire.RemoteProtocolError, match=why):
        decode_enroll(payload)


@given(st.binary(max_size=300))
def test_codec_never_crashes_on_garbage(data: bytes) -> None:
    """Arbitrary bytes decode or raise RemoteProtocolError, nothing else."""
    try:
        decode_enroll(data)
    except wire.RemoteProtocolError:
        pass


def test_framed_messages_decode_fed_all_at_once_and_byte_by_byte() -> None:
    """In wire frames, the messages come out the same however the bytes arrive; junk after
    the last frame is the peer's error."""
    stream = b"".join(wire.encode_frame(encode_enroll(m)) for m in _SAMPLES)  # type: ignore[arg-type]
    for chunk in (len(stream), 1, 7):
        dec = wire.FrameDecoder()
        out = []
        for i in range(0, len(stream), chunk):
            dec.receive_data(stream[i : i + chunk])
            while isinstance(frame := dec.next_frame(), bytes):
                out.append(decode_enroll(frame))
        assert out == _SAMPLES
    dec = wire.FrameDecoder()
    dec.receive_data(stream + b"\x00\x00")
    dec.receive_data(b"")
    for _ in _SAMPLES:
        assert isinstance(dec.next_frame(), bytes)
    with pytest.raises(wire.RemoteProtocolError, match="middle of a frame"):
        dec.next_frame()


def test_codec_refuses_to_encode_foreign_objects() -> None:
    """Encoding something that is not an enrolment message is our own error."""
    with pytest.raises(wire.LocalProtocolError):
        encode_enroll(wire.Ping())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- enrolment


def _broker(tmp_path: pathlib.Path) -> tuple[BrokerPki, TokenBook]:
    return BrokerPki.open(tmp_path / "broker"), TokenBook()


def _enroll_side(pki: BrokerPki, book: TokenBook, now: float = 10.0) -> BrokerEnrollment:
    return BrokerEnrollment(
        pki.ca_file.read_bytes(),
        book,
        lambda name, key: pki.issue("starter", name, key),
        now=lambda: now,
    )


def _over_the_wire(msg: object) -> object:
    return decode_enroll(encode_enroll(msg))  # type: ignore[arg-type]


def test_enrolment_exchange_end_to_end(tmp_path: pathlib.Path) -> None:
    """Hello, CA, request, reply: the starter ends with a certificate that verifies and saves."""
    pki, book = _broker(tmp_path)
    token = book.create(pki.ca.fingerprint, 600, now=0.0)
    broker_der = common.load_cert(pki.cert_file).public_bytes(Encoding.DER)
    starter = StarterEnrollment(parse_token(str(token)), "exec-1")
    side = _enroll_side(pki, book)
    ca_msg = _over_the_wire(side.on_hello(_over_the_wire(starter.hello())))
    request = _over_the_wire(starter.on_ca(ca_msg, broker_der))
    assert isinstance(request, EnrollRequest)
    assert request.secret == token.secret
    reply = _over_the_wire(side.on_request(request))
    done = starter.on_reply(reply)
    assert done.pool_id == pki.pool_id
    saved = StarterPki.save(tmp_path / "starter", done.key, done.certificate, done.ca_certs)
    loaded = StarterPki.load(tmp_path / "starter")
    assert (loaded.pool_id, loaded.name) == (pki.pool_id, "exec-1")
    assert _mode(saved.key_file) == 0o600
    assert _mode(saved.directory) == 0o700
    assert "exec-1" in [c.name for c in pki.issued()]
    # The same token again: refused with the reason.
    again = StarterEnrollment(token, "exec-2")
    side2 = _enroll_side(pki, book, now=20.0)
    req2 = again.on_ca(side2.on_hello(again.hello()), broker_der)
    with pytest.raises(EnrollError, match="already used") as info:
        side2.on_request(req2)
    assert info.value.error() == wire.Error("token_used", info.value.message)
    with pytest.raises(EnrollError, match="already used") as refused:
        again.on_reply(info.value.error())
    assert refused.value.refused


def test_expired_token_is_refused_by_the_broker(tmp_path: pathlib.Path) -> None:
    """A token past its ttl gets an Error saying it expired and no certificate."""
    pki, book = _broker(tmp_path)
    token = book.create(pki.ca.fingerprint, 60, now=0.0)
    der = common.load_cert(pki.cert_file).public_bytes(Encoding.DER)
    starter = StarterEnrollment(token, "late")
    side = _enroll_side(pki, book, now=61.0)
    req = starter.on_ca(side.on_hello(starter.hello()), der)
    with pytest.raises(EnrollError, match="expired"):
        side.on_request(req)
    assert "late" not in [c.name for c in pki.issued()]


def test_starter_keeps_the_secret_from_a_broker_of_another_ca(tmp_path: pathlib.Path) -> None:
    """A broker whose CA does not match the token's hash never gets the secret."""
    pki, book = _broker(tmp_path)
    impostor = BrokerPki.open(tmp_path / "impostor")
    token = book.create(pki.ca.fingerprint, 600, now=0.0)
    der = common.load_cert(impostor.cert_file).public_bytes(Encoding.DER)
    starter = StarterEnrollment(token, "s")
    with pytest.raises(EnrollError, match="does not match the join token"):
        starter.on_ca(EnrollCa(impostor.ca_file.read_text()), der)


def test_starter_refuses_a_real_ca_sent_by_a_host_with_another_certificate(
    tmp_path: pathlib.Path,
) -> None:
    """Replaying the genuine (public) CA while presenting another TLS certificate fails."""
    pki, book = _broker(tmp_path)
    impostor = BrokerPki.open(tmp_path / "impostor")
    token = book.create(pki.ca.fingerprint, 600, now=0.0)
    der = common.load_cert(impostor.cert_file).public_bytes(Encoding.DER)
    with pytest.raises(EnrollError, match="not trusted"):
        StarterEnrollment(token, "s").on_ca(EnrollCa(pki.ca_file.read_text()), der)
    # A starter certificate of the right pool is not a broker's either.
    key = common.new_private_key()
    starter_der = pki.issue("starter", "x", key.public_key()).public_bytes(Encoding.DER)
    with pytest.raises(EnrollError, match="not a broker one"):
        StarterEnrollment(token, "s").on_ca(EnrollCa(pki.ca_file.read_text()), starter_der)


def test_broker_refuses_out_of_order_and_bad_requests(tmp_path: pathlib.Path) -> None:
    """A request before hello, a bad name, or a non-Ed25519 key are refused with codes."""
    pki, book = _broker(tmp_path)
    token = book.create(pki.ca.fingerprint, 600, now=0.0)
    pem = common.public_key_pem(common.new_private_key().public_key())
    req = EnrollRequest(token.token_id, token.secret, "ok", pem)
    with pytest.raises(EnrollError, match="after enroll_hello"):
        _enroll_side(pki, book).on_request(req)
    side = _enroll_side(pki, book)
    side.on_hello(EnrollHello())
    with pytest.raises(EnrollError) as bad_name:
        side.on_request(EnrollRequest(token.token_id, token.secret, "../x", pem))
    assert bad_name.value.code == "bad_name"
    with pytest.raises(EnrollError) as bad_key:
        side.on_request(EnrollRequest(token.token_id, token.secret, "ok", "junk"))
    assert bad_key.value.code == "bad_key"
    with pytest.raises(EnrollError, match="version 2"):
        _enroll_side(pki, book).on_hello(EnrollHello(version=2))
    # None of that spent the token.
    assert isinstance(side.on_request(req), EnrollReply)


def test_starter_checks_the_issued_certificate(tmp_path: pathlib.Path) -> None:
    """A reply whose certificate is for another key or name is refused."""
    pki, book = _broker(tmp_path)
    token = book.create(pki.ca.fingerprint, 600, now=0.0)
    der = common.load_cert(pki.cert_file).public_bytes(Encoding.DER)
    starter = StarterEnrollment(token, "me")
    starter.on_ca(EnrollCa(pki.ca_file.read_text()), der)
    other = pki.issue("starter", "me", common.new_private_key().public_key())
    with pytest.raises(EnrollError, match="not for our key"):
        starter.on_reply(EnrollReply(common.cert_pem(other).decode(), pki.ca_file.read_text()))
    wrong = pki.issue("starter", "you", common.new_private_key().public_key())
    with pytest.raises(EnrollError, match="not valid"):
        starter.on_reply(EnrollReply(common.cert_pem(wrong).decode(), ""))


def test_join_token_rejects_bad_fields() -> None:
    """JoinToken itself refuses ids and lengths parse_token would never produce."""
    with pytest.raises(ValueError, match="16 lowercase hex"):
        JoinToken("x", b"\0" * 32, b"\0" * 32)
    with pytest.raises(ValueError, match="32 bytes"):
        JoinToken("0123456789abcdef", b"\0", b"\0" * 32)


# ------------------------------------------------------------------ identities and start-up


@given(
    pool=st.from_regex(wire.POOL_ID_RE, fullmatch=True),
    role=st.sampled_from(sorted(wire.ROLES)),
    name=st.from_regex(wire.PEER_NAME_RE, fullmatch=True),
)
def test_peer_uri_round_trips(pool: str, role: str, name: str) -> None:
    """Every valid identity prints as one stj:// URI that parses back to itself."""
    peer = wire.PeerName(pool, role, name)
    assert wire.parse_peer_uri(peer.uri) == peer


@pytest.mark.parametrize(
    "uri",
    [
        "stj://pool/starter",
        "stj://pool/starter/a/b",
        "stj://Pool/starter/a",
        "stj://pool/admin/a",
        "stj://pool/starter/-a",
        "stj://pool/starter/a%2F",
        "https://pool/starter/a",
        "stj://pool/starter/a ",
        "stj://-pool/starter/a",
    ],
)
def test_peer_uri_refuses_everything_else(uri: str) -> None:
    """Anything but the one spelling of a valid identity is a ValueError."""
    with pytest.raises(ValueError, match="not"):
        wire.parse_peer_uri(uri)


def test_common_does_not_load_cryptography_until_asked() -> None:
    """Importing common (every client's start-up) does not import cryptography; PoolCA does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ssh_to_job import common\n"
        "assert 'cryptography' not in sys.modules, 'loaded too early'\n"
        "common.PoolCA\n"
        "assert 'cryptography' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True, timeout=60)


_HOSTILE_PKI: list[BrokerPki] = []


def _hostile_pki() -> BrokerPki:
    # One broker for every Hypothesis example (made lazily: hypothesis and tmp_path do not mix).
    if not _HOSTILE_PKI:
        import tempfile

        _HOSTILE_PKI.append(BrokerPki.open(pathlib.Path(tempfile.mkdtemp()) / "pki"))
    return _HOSTILE_PKI[0]


@given(
    token_id=st.one_of(st.text(max_size=20), st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
    secret=st.binary(max_size=40),
    name=st.one_of(st.text(max_size=30), st.from_regex(wire.PEER_NAME_RE, fullmatch=True)),
    key=st.one_of(
        st.text(max_size=100), st.just(common.public_key_pem(common.new_private_key().public_key()))
    ),
)
def test_broker_side_refuses_any_forged_request_cleanly(
    token_id: str, secret: bytes, name: str, key: str
) -> None:
    """Whatever a peer without the secret sends, the broker answers with an EnrollError and
    issues nothing."""
    pki = _hostile_pki()
    book = TokenBook()
    book.create(pki.ca.fingerprint, 600, now=0.0)
    issued: list[str] = []
    side = BrokerEnrollment(
        pki.ca_file.read_bytes(),
        book,
        lambda n, k: issued.append(n) or pki.ca.issue("starter", n, k),  # type: ignore[func-returns-value]
        now=lambda: 1.0,
    )
    side.on_hello(EnrollHello())
    with pytest.raises(EnrollError):
        side.on_request(EnrollRequest(token_id, secret, name, key))
    assert issued == []
