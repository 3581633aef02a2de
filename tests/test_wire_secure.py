"""The control channel's encryption after the signed handshake, sans-IO, byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job import wire


def _handshake() -> tuple[wire.Connection, wire.Connection]:
    """A full starter/broker handshake in lock-step, with encryption switched on as in the
    daemons: the broker after sending welcome, the starter after receiving it."""
    starter_seed, broker_seed = wire.new_signing_key(), wire.new_signing_key()
    s = wire.Connection(wire.Channel.STARTER, wire.Role.STARTER, wire.Role.BROKER)
    b = wire.Connection(wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER)
    es, eb = wire.Ephemeral(), wire.Ephemeral()
    b.receive_data(
        s.send(
            wire.StarterHello(
                starter_id="x",
                starter_key=wire.public_key_of(starter_seed),
                nonce=es.public,
                slots=1,
            )
        )
    )
    hello = b.next_event()
    assert isinstance(hello, wire.StarterHello)
    statement = wire.broker_auth_statement("x", hello.nonce, eb.public)
    s.receive_data(
        b.send(wire.BrokerHello(nonce=eb.public, signature=wire.sign(broker_seed, statement)))
    )
    bh = s.next_event()
    assert isinstance(bh, wire.BrokerHello)
    transcript = wire.starter_auth_statement("x", es.public, bh.nonce)
    b.receive_data(s.send(wire.StarterAuth(signature=wire.sign(starter_seed, transcript))))
    assert isinstance(b.next_event(), wire.StarterAuth)
    welcome = b.send(wire.Welcome())
    up_b, down_b = wire.channel_keys(eb.shared(es.public), es.public, eb.public, transcript)
    b.start_encryption(send_key=down_b, receive_key=up_b)
    s.receive_data(welcome)
    assert isinstance(s.next_event(), wire.Welcome)
    up_s, down_s = wire.channel_keys(es.shared(eb.public), es.public, eb.public, transcript)
    s.start_encryption(send_key=up_s, receive_key=down_s)
    assert (up_s, down_s) == (up_b, down_b)
    assert up_s != down_s
    return s, b


def test_frames_after_welcome_are_sealed_and_open_on_the_other_side() -> None:
    """After the handshake, a frame's body is ciphertext on the wire and decodes correctly."""
    s, b = _handshake()
    sync = wire.StarterSync(jobs=(wire.JobReport(id="7.0", running=True, pid=42),))
    data = s.send(sync)
    assert b'"starter_sync"' not in data
    assert b"7.0" not in data
    b.receive_data(data)
    assert b.next_event() == sync
    s.receive_data(b.send(wire.Ack(ids=("7.0",))))
    assert s.next_event() == wire.Ack(ids=("7.0",))


def test_one_byte_at_a_time_still_opens() -> None:
    """Encrypted frames fed one byte at a time decode exactly as when fed whole."""
    s, b = _handshake()
    data = s.send(wire.Ping()) + s.send(wire.Ping())
    events = []
    for i in range(len(data)):
        b.receive_data(data[i : i + 1])
        ev = b.next_event()
        while isinstance(ev, wire.Message):
            events.append(ev)
            ev = b.next_event()
    assert events == [wire.Ping(), wire.Ping()]


@pytest.mark.parametrize("index", [4, 10, -1])
def test_a_flipped_byte_is_refused(index: int) -> None:
    """Changing any byte of a sealed frame makes the receiver refuse it (and go final)."""
    s, b = _handshake()
    data = bytearray(s.send(wire.Ping()))
    data[index] ^= 0x01
    b.receive_data(bytes(data))
    with pytest.raises(wire.RemoteProtocolError, match="failed authentication"):
        b.next_event()
    with pytest.raises(wire.RemoteProtocolError):
        b.next_event()


def test_replayed_and_reordered_frames_are_refused() -> None:
    """A frame sent twice, or two frames swapped, fail: nonces are counters."""
    s, b = _handshake()
    first = s.send(wire.Ping())
    b.receive_data(first)
    assert b.next_event() == wire.Ping()
    b.receive_data(first)
    with pytest.raises(wire.RemoteProtocolError):
        b.next_event()
    s2, b2 = _handshake()
    first = s2.send(wire.Ping())
    second = s2.send(wire.JobUpdate(report=wire.JobReport(id="1.0", running=True)))
    b2.receive_data(second + first)
    with pytest.raises(wire.RemoteProtocolError):
        b2.next_event()


def test_another_channels_frame_does_not_open() -> None:
    """A frame sealed on one connection cannot be spliced into another one."""
    s1, _b1 = _handshake()
    _s2, b2 = _handshake()
    b2.receive_data(s1.send(wire.Ping()))
    with pytest.raises(wire.RemoteProtocolError):
        b2.next_event()


def test_degenerate_peer_key_is_refused() -> None:
    """An all-zero X25519 'nonce' (a small-order point) is the peer's error, not a crash."""
    with pytest.raises(wire.RemoteProtocolError):
        wire.Ephemeral().shared(bytes(32))
    with pytest.raises(wire.RemoteProtocolError):
        wire.Ephemeral().shared(b"short")


def test_encryption_cannot_be_started_twice() -> None:
    """Switching encryption on twice is our own bug, reported as such."""
    s, _b = _handshake()
    with pytest.raises(wire.LocalProtocolError):
        s.start_encryption(bytes(32), bytes(32))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=2000), min_size=1, max_size=5))
def test_output_payloads_round_trip(chunks: list[bytes]) -> None:
    """Arbitrary output payloads survive sealing and opening in order."""
    s, b = _handshake()
    data = b"".join(
        s.send(wire.OutputData(request=i, data=c, found=True)) for i, c in enumerate(chunks)
    )
    b.receive_data(data)
    got = []
    ev = b.next_event()
    while isinstance(ev, wire.Message):
        got.append(ev)
        ev = b.next_event()
    assert got == [wire.OutputData(request=i, data=c, found=True) for i, c in enumerate(chunks)]
