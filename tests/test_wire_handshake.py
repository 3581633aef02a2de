"""The starter <-> broker handshake objects, both roles, with no I/O: what each accepts, what
each refuses, and that both sides derive the same channel keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job import wire


def _pair(
    name: str = "exec-1", trusted: bool = True
) -> tuple[wire.StarterHandshake, wire.BrokerHandshake, bytes, bytes]:
    starter_seed, broker_seed = wire.new_signing_key(), wire.new_signing_key()
    starter_key = wire.public_key_of(starter_seed)
    s = wire.StarterHandshake(name, starter_seed, wire.public_key_of(broker_seed), slots=3)
    b = wire.BrokerHandshake(broker_seed, lambda key: trusted and key == starter_key)
    return s, b, starter_seed, broker_seed


def _wire(msg: wire.Message) -> wire.Message:
    """``msg`` framed, then decoded byte by byte, as the peer would see it."""
    data = wire.encode_frame(wire.encode_message(msg))
    rx = wire.FrameDecoder()
    for i in range(len(data)):
        rx.receive_data(data[i : i + 1])
    frame = rx.next_frame()
    assert isinstance(frame, bytes)
    return wire.decode_message(frame)


def test_a_full_handshake_gives_both_sides_matching_keys() -> None:
    """Hello, broker hello, auth, welcome: the keys one side sends with, the other receives with."""
    s, b, _ss, _bs = _pair()
    hello = s.hello()
    assert hello.slots == 3
    auth = s.on_broker_hello(_wire(b.on_hello(_wire(hello))))
    welcome, broker_keys = b.on_auth(_wire(auth))
    starter_keys = s.on_welcome(_wire(welcome))
    assert starter_keys.send == broker_keys.receive
    assert starter_keys.receive == broker_keys.send
    assert starter_keys.send != starter_keys.receive
    assert len(starter_keys.send) == 32
    assert b.hello == hello


def test_two_handshakes_never_share_keys() -> None:
    """Fresh ephemerals per connection: the same two identities get new keys every time."""
    keys = set()
    starter_seed, broker_seed = wire.new_signing_key(), wire.new_signing_key()
    for _ in range(3):
        s = wire.StarterHandshake("n", starter_seed, wire.public_key_of(broker_seed), 1)
        b = wire.BrokerHandshake(broker_seed, lambda _k: True)
        welcome, bk = b.on_auth(s.on_broker_hello(b.on_hello(s.hello())))
        assert s.on_welcome(welcome).send == bk.receive
        keys.add(bk.receive)
    assert len(keys) == 3


def test_untrusted_starter_is_refused_with_a_reason() -> None:
    """A starter key the broker does not trust gets 'untrusted', before any signature is made."""
    s, b, _ss, _bs = _pair(trusted=False)
    with pytest.raises(wire.HandshakeError) as info:
        b.on_hello(s.hello())
    assert info.value.code == "untrusted"
    assert "trusted_starters" in info.value.message
    assert not info.value.refused
    assert info.value.error() == wire.Error("untrusted", info.value.message)


def test_wrong_broker_key_is_refused_by_the_starter() -> None:
    """A broker that signs with another key than the pinned one is refused by the starter."""
    starter_seed = wire.new_signing_key()
    s = wire.StarterHandshake("n", starter_seed, wire.public_key_of(wire.new_signing_key()), 1)
    impostor = wire.BrokerHandshake(wire.new_signing_key(), lambda _k: True)
    with pytest.raises(wire.HandshakeError, match="wrong broker key"):
        s.on_broker_hello(impostor.on_hello(s.hello()))


def test_a_starter_signing_with_another_key_is_refused() -> None:
    """The auth must be signed by the key the hello presented."""
    s, b, _ss, _bs = _pair()
    bh = b.on_hello(s.hello())
    # Same name, a different identity key signs the broker's challenge.
    forged = wire.StarterAuth(
        signature=wire.sign(
            wire.new_signing_key(),
            wire.starter_auth_statement("exec-1", s.hello().nonce, bh.nonce),
        )
    )
    with pytest.raises(wire.HandshakeError, match="starter signature does not verify"):
        b.on_auth(forged)


def test_a_signature_over_other_nonces_is_refused() -> None:
    """A replayed auth from an earlier handshake (other nonces) does not verify."""
    s1, b1, starter_seed, broker_seed = _pair()
    old_auth = s1.on_broker_hello(b1.on_hello(s1.hello()))
    s2 = wire.StarterHandshake("exec-1", starter_seed, wire.public_key_of(broker_seed), 3)
    b2 = wire.BrokerHandshake(broker_seed, lambda k: k == wire.public_key_of(starter_seed))
    b2.on_hello(s2.hello())
    with pytest.raises(wire.HandshakeError):
        b2.on_auth(old_auth)


@pytest.mark.parametrize(
    "hello",
    [
        wire.StarterHello(starter_id="", starter_key=b"k" * 32, nonce=b"n" * 32, slots=1),
        wire.StarterHello(starter_id="x" * 129, starter_key=b"k" * 32, nonce=b"n" * 32, slots=1),
        wire.StarterHello(starter_id="x", starter_key=b"k" * 32, nonce=b"n" * 31, slots=1),
    ],
    ids=["empty-name", "long-name", "short-nonce"],
)
def test_malformed_hello_is_refused(hello: wire.StarterHello) -> None:
    """An empty or over-long name, or a nonce that is not 32 bytes, is a protocol error."""
    b = wire.BrokerHandshake(wire.new_signing_key(), lambda _k: True)
    with pytest.raises(wire.HandshakeError) as info:
        b.on_hello(hello)
    assert info.value.code == "protocol"


def test_the_peers_error_frame_is_a_refusal() -> None:
    """An error frame where the next step was expected becomes HandshakeError(refused=True)."""
    s, _b, _ss, _bs = _pair()
    with pytest.raises(wire.HandshakeError) as info:
        s.on_broker_hello(wire.Error("untrusted", "go away"))
    assert info.value.refused
    assert (info.value.code, info.value.message) == ("untrusted", "go away")
    with pytest.raises(wire.HandshakeError) as info:
        s.on_welcome(wire.Error("untrusted", "starter signature does not verify"))
    assert info.value.refused


def test_steps_out_of_order_are_refused() -> None:
    """Auth before hello, welcome before the broker's hello: refused, never keys."""
    s, b, _ss, _bs = _pair()
    with pytest.raises(wire.HandshakeError):
        b.on_auth(wire.StarterAuth(signature=b"\0" * 64))
    with pytest.raises(wire.HandshakeError):
        s.on_welcome(wire.Welcome())
    with pytest.raises(wire.HandshakeError, match="unexpected ping"):
        b.on_hello(wire.Ping())


@settings(max_examples=25, deadline=None)
@given(name=st.text(min_size=1, max_size=128), slots=st.integers(1, 1000))
def test_any_valid_name_completes(name: str, slots: int) -> None:
    """Every name the broker accepts completes the handshake with matching keys."""
    starter_seed, broker_seed = wire.new_signing_key(), wire.new_signing_key()
    s = wire.StarterHandshake(name, starter_seed, wire.public_key_of(broker_seed), slots)
    b = wire.BrokerHandshake(broker_seed, lambda _k: True)
    welcome, bk = b.on_auth(s.on_broker_hello(b.on_hello(s.hello())))
    assert s.on_welcome(welcome) == wire.ChannelKeys(send=bk.receive, receive=bk.send)
