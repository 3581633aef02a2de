"""The broker's kernel relay (``broker/_relay.py``), in process, on real sockets: bytes go
through intact both ways, half-closes pass, resets end it, the counts are splice's, and the
relay's code reads no byte into Python."""

from __future__ import annotations

import ast
import inspect
import os
import socket
import struct
import textwrap

import trio

from ssh_to_job.broker import _relay


def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = trio.socket.socketpair()
    return a, b


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view[: 1 << 16])
        view = view[n:]


async def _read_all(sock: trio.socket.SocketType) -> bytes:
    out = bytearray()
    while chunk := await sock.recv(1 << 16):
        out += chunk
    return bytes(out)


async def test_relay_moves_bytes_both_ways_and_passes_half_closes() -> None:
    """8 MiB each way arrive intact; each side's end of stream reaches the other as a
    half-close; the relay ends when both ways are done and counts what splice moved."""
    client, client_far = _pair()
    starter, starter_far = _pair()
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    stats = _relay.RelayStats()
    got: dict[str, bytes] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay.relay, client_far, starter_far, stats)

            async def at_client() -> None:
                await _send_all(client, up)
                client.shutdown(socket.SHUT_WR)
                got["client"] = await _read_all(client)

            async def at_starter() -> None:
                got["starter"] = await _read_all(starter)
                await _send_all(starter, down)
                starter.shutdown(socket.SHUT_WR)

            nursery.start_soon(at_client)
            nursery.start_soon(at_starter)
    assert got["starter"] == up
    assert got["client"] == down
    assert (stats.to_starter, stats.to_client) == (len(up), len(down))
    for s in (client, client_far, starter, starter_far):
        s.close()


async def test_relay_ends_when_a_side_resets() -> None:
    """A peer that resets its connection (RST) ends the relay, both ways, instead of hanging it."""
    listener = trio.socket.socket()
    client = trio.socket.socket()
    starter, starter_far = _pair()
    try:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await client.connect(listener.getsockname())
        client_far, _ = await listener.accept()
        stats = _relay.RelayStats()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay.relay, client_far, starter_far, stats)
                await _send_all(client, b"x" * 1000)
                assert await starter.recv(1000) == b"x" * 1000
                # Linger 0: close sends RST. The starter side stays open: only the reset can
                # end the relay here.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
        assert stats.to_starter == 1000
        client_far.close()
    finally:
        for s in (listener, client, starter, starter_far):
            s.close()


def test_the_relay_code_reads_no_session_byte() -> None:
    """The relay's functions move bytes only with os.splice: no recv, read, send or write of
    any kind appears in them, so no session byte is ever in this process's memory."""
    for fn in (_relay.relay, _relay._one_way):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        called = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called.add(node.func.attr)
        assert "splice" in called or fn is _relay.relay
        forbidden = {"recv", "recv_into", "recvmsg", "read", "readv", "send", "sendall", "write"}
        assert not called & forbidden, (fn.__name__, called & forbidden)


async def test_a_cancelled_relay_ends_at_once_and_cuts_both_sides() -> None:
    """Cancelling the relay (the broker stops) ends it promptly although both sides are idle
    and open: its threads are woken by shutting the sockets down, and both peers see the end."""
    client, client_far = _pair()
    starter, starter_far = _pair()
    stats = _relay.RelayStats()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay.relay, client_far, starter_far, stats)
                await _send_all(client, b"ping")
                assert await starter.recv(4) == b"ping"
                nursery.cancel_scope.cancel()
            assert await _read_all(client) == b""
            assert await _read_all(starter) == b""
        assert stats.to_starter == 4
    finally:
        for s in (client, client_far, starter, starter_far):
            s.close()
