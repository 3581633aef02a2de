"""The shim handshake, sans-IO (preload.ShimHandshake), and the two drivers that use it: the
blocking ``preload.run_handshake`` and the starter's trio one, fed the same byte streams."""

from __future__ import annotations

import socket

import pytest
import trio

from ssh_to_job import preload
from ssh_to_job.starter._session import _shim_handshake

CFG = preload.ShimConfig(uid=1234, gid=1234, name="someone", home="/tmp", shell="/bin/sh")


def _feed(data: bytes, step: int) -> int | None:
    hs = preload.ShimHandshake(CFG)
    out = None
    for i in range(0, len(data), step):
        out = hs.receive_data(data[i : i + step])
        if out is not None:
            return out
    return out


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_ok_line_whole_and_byte_by_byte(step: int) -> None:
    """An ``ok <pid>`` line gives the pid whether it arrives at once or a byte at a time."""
    assert _feed(b"ok 4242\n", step) == 4242


def test_config_bytes_are_the_encoded_config() -> None:
    """What the handshake sends is exactly the encoded configuration."""
    assert preload.ShimHandshake(CFG).config == preload.encode_config(CFG)


def test_partial_line_needs_more_data() -> None:
    """Half a line is not an answer yet."""
    hs = preload.ShimHandshake(CFG)
    assert hs.receive_data(b"ok 12") is None
    assert hs.receive_data(b"3\n") == 123


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"err uid mismatch\n", "refused its configuration: uid mismatch"),
        (b"ok 1\nextra", "unexpected data after"),
        (b"x" * (preload.ACK_MAX + 1), "unexpected answer"),
        (b"hello\n", "unexpected answer"),
    ],
)
def test_bad_answers_raise_shim_error(data: bytes, match: str) -> None:
    """Refusals, trailing junk, overlong lines and garbage are ShimErrors saying which."""
    with pytest.raises(preload.ShimError, match=match):
        _feed(data, len(data))


def test_end_of_stream_without_answer_names_a_missing_shim() -> None:
    """End of stream with nothing said means the shim did not load."""
    hs = preload.ShimHandshake(CFG)
    with pytest.raises(preload.ShimError, match="did not load"):
        hs.receive_data(b"")


def test_data_after_a_complete_answer_is_refused() -> None:
    """Once the pid is known, more bytes are an error (they would be sshd's)."""
    hs = preload.ShimHandshake(CFG)
    assert hs.receive_data(b"ok 7\n") == 7
    with pytest.raises(preload.ShimError, match="unexpected data"):
        hs.receive_data(b"x")


def test_blocking_driver_uses_the_same_rules() -> None:
    """run_handshake sends the config and parses the answer with the same object."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"ok 99\n")
        assert preload.run_handshake(ours, CFG, 5) == 99
        assert theirs.recv(65536) == preload.encode_config(CFG)


async def test_trio_driver_uses_the_same_rules() -> None:
    """The starter's trio driver sends the config and accepts the same answer."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"ok 99\n")
        with trio.fail_after(5):
            await _shim_handshake(ours, CFG, 5)
        assert theirs.recv(65536) == preload.encode_config(CFG)


async def test_trio_driver_refusal() -> None:
    """The trio driver raises the same ShimError for a refusal."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"err no\n")
        with pytest.raises(preload.ShimError, match="refused its configuration: no"):
            await _shim_handshake(ours, CFG, 5)


async def test_trio_driver_times_out_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    """A silent shim fails the trio driver after its timeout, measured on trio's clock."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        start = trio.current_time()
        with pytest.raises(preload.ShimError, match="no answer from the shim within 10 s"):
            await _shim_handshake(ours, CFG, 10)
        assert trio.current_time() - start == pytest.approx(10)
