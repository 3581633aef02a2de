"""The frame codec: 4-byte big-endian length, payload, size limit, end-of-stream rules."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssh_to_job import wire
from ssh_to_job.wire import CLOSED, NEED_DATA, FrameDecoder, LocalProtocolError, RemoteProtocolError


def encode(payload: bytes) -> bytes:
    return wire.encode_frame(payload)


def drain(dec: FrameDecoder) -> list[bytes]:
    """Every whole frame the decoder holds now, stopping at NEED_DATA or CLOSED."""
    out = []
    while isinstance(frame := dec.next_frame(), bytes):
        out.append(frame)
    return out


def feed_whole(dec: FrameDecoder, data: bytes) -> list[bytes]:
    dec.receive_data(data)
    return drain(dec)


def feed_bytewise(dec: FrameDecoder, data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        out += drain(dec)
    return out


FEEDERS: list[Callable[[FrameDecoder, bytes], list[bytes]]] = [feed_whole, feed_bytewise]

PAYLOADS = [b"", b"x", b'{"type":"ping"}', bytes(range(256)) * 3]


def test_header_is_four_bytes_big_endian() -> None:
    """encode_frame writes the payload length as 4 big-endian bytes before the payload."""
    assert encode(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode(b"") == b"\x00\x00\x00\x00"
    assert encode(b"\x00" * 258)[:4] == b"\x00\x00\x01\x02"


def test_default_limit_is_one_mebibyte() -> None:
    """The default payload limit is 1 MiB, and a payload of exactly the limit is allowed."""
    assert wire.DEFAULT_MAX_FRAME == 1 << 20
    frame = wire.encode_frame(b"a" * wire.DEFAULT_MAX_FRAME)
    assert frame[:4] == b"\x00\x10\x00\x00"
    assert FrameDecoder().max_size == 1 << 20


def test_encode_refuses_oversize_payload() -> None:
    """Encoding a payload over the limit is our own error, and one byte under is fine."""
    assert wire.encode_frame(b"12345", max_size=5) == b"\x00\x00\x00\x0512345"
    with pytest.raises(LocalProtocolError, match="6 bytes exceeds the 5-byte limit"):
        wire.encode_frame(b"123456", max_size=5)


@pytest.mark.parametrize("feeder", FEEDERS)
def test_frames_come_out_in_order(feeder: Callable[[FrameDecoder, bytes], list[bytes]]) -> None:
    """Several frames in one stream come out whole and in order, however the stream is cut."""
    dec = FrameDecoder()
    stream = b"".join(encode(p) for p in PAYLOADS)
    assert feeder(dec, stream) == PAYLOADS
    assert dec.next_frame() is NEED_DATA
    assert dec.buffered == b""


@pytest.mark.parametrize("feeder", FEEDERS)
def test_trailing_junk_stays_buffered(feeder: Callable[[FrameDecoder, bytes], list[bytes]]) -> None:
    """Bytes after the last whole frame are kept, unparsed, in ``buffered``."""
    junk = b"\x00\x00\x00\x09SSH-2"
    dec = FrameDecoder()
    assert feeder(dec, encode(b"one") + encode(b"two") + junk) == [b"one", b"two"]
    assert dec.next_frame() is NEED_DATA
    assert dec.buffered == junk


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_any_chunking_gives_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    """Cutting a stream of frames at arbitrary points changes nothing about what comes out."""
    stream = b"".join(encode(p) for p in payloads)
    points = sorted({c for c in cuts if c <= len(stream)} | {0, len(stream)})
    dec = FrameDecoder()
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        dec.receive_data(stream[a:b])
        got += drain(dec)
    assert got == payloads
    dec.receive_data(b"")
    assert dec.next_frame() is CLOSED


def test_oversize_refused_from_header_alone() -> None:
    """A header announcing more than the limit is refused before any payload byte arrives."""
    dec = FrameDecoder(max_size=10)
    for byte in b"\x00\x00\x00":
        dec.receive_data(bytes([byte]))
        assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"\x0b")
    with pytest.raises(RemoteProtocolError, match="11-byte frame; the limit is 10"):
        dec.next_frame()


def test_header_at_the_limit_waits_for_payload() -> None:
    """A header announcing exactly the limit is accepted and waits for its payload."""
    dec = FrameDecoder(max_size=10)
    dec.receive_data(b"\x00\x00\x00\x0a12345")
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"67890")
    assert dec.next_frame() == b"1234567890"


def test_largest_announced_length_refused() -> None:
    """A 4 GiB announcement is refused with the default limit, not buffered for."""
    dec = FrameDecoder()
    dec.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError, match="4294967295-byte frame"):
        dec.next_frame()


def test_oversize_after_good_frames() -> None:
    """Good frames before an oversize header are delivered, then the oversize one is refused."""
    dec = FrameDecoder(max_size=4)
    dec.receive_data(encode(b"ok") + struct.pack(">I", 5))
    assert dec.next_frame() == b"ok"
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()


def test_clean_eof_between_frames() -> None:
    """End of stream right after a whole frame is a clean close, and stays one."""
    dec = FrameDecoder()
    dec.receive_data(encode(b"last"))
    dec.receive_data(b"")
    assert dec.next_frame() == b"last"
    assert dec.next_frame() is CLOSED
    assert dec.next_frame() is CLOSED
    dec.receive_data(b"")  # a second end of stream is harmless
    assert dec.next_frame() is CLOSED


def test_clean_eof_on_empty_stream() -> None:
    """End of stream before any byte is a clean close."""
    dec = FrameDecoder()
    dec.receive_data(b"")
    assert dec.next_frame() is CLOSED


@pytest.mark.parametrize(
    "partial",
    [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05", b"\x00\x00\x00\x05abcd"],
    ids=["1-header-byte", "3-header-bytes", "header-only", "short-payload"],
)
def test_eof_mid_frame_is_the_peers_error(partial: bytes) -> None:
    """End of stream inside a header or a payload is a RemoteProtocolError, not a close."""
    dec = FrameDecoder()
    dec.receive_data(partial)
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=f"middle of a frame \\({len(partial)} bytes"):
        dec.next_frame()


def test_data_after_eof_is_our_error() -> None:
    """Feeding bytes after announcing end of stream is a bug in the caller."""
    dec = FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        dec.receive_data(b"x")


def test_zero_length_frame() -> None:
    """A zero-length frame is a frame: it comes out as an empty payload."""
    dec = FrameDecoder()
    dec.receive_data(b"\x00\x00\x00\x00\x00\x00\x00\x01z")
    assert dec.next_frame() == b""
    assert dec.next_frame() == b"z"
    assert dec.next_frame() is NEED_DATA


def test_sentinels_are_distinct_and_named() -> None:
    """NEED_DATA and CLOSED are two different singletons of Sentinel, named, and stay the same
    object when copied or pickled (so ``is`` holds everywhere)."""
    import copy
    import pickle

    assert NEED_DATA is wire.Sentinel.NEED_DATA
    assert CLOSED is wire.Sentinel.CLOSED
    assert NEED_DATA is not CLOSED
    assert (repr(NEED_DATA), repr(CLOSED)) == ("Sentinel.NEED_DATA", "Sentinel.CLOSED")
    assert copy.deepcopy(CLOSED) is CLOSED
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA
