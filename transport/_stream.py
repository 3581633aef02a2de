"""Framed streams and outboxes: the daemons' only I/O layer over the sans-IO ``wire``.

One ``FramedStream`` per connection: reads feed the codec, writes are serialised by a lock.
One ``Outbox`` per long-lived channel: everything said to the peer goes through it, in order,
sent by one task; it is bounded, so a peer that stops reading costs its own connection and
never the daemon's memory.
"""

from __future__ import annotations

import contextlib
import math
import socket

import trio

from ssh_to_job import wire

RECEIVE_SIZE = 65536
#: Messages queued for one peer before it counts as not reading (its connection is closed).
OUTBOX_LIMIT = 4096


class PeerGone(Exception):
    """The peer went away: it closed the stream (``PeerClosed``) or broke it (``PeerBroken``)."""


class PeerClosed(PeerGone):
    """The peer ended the stream (possibly in the middle of a frame)."""


class PeerBroken(PeerGone):
    """The stream broke (reset, refused, or closed under us); the OS error is the cause."""


class OutboxFull(PeerGone):
    """The peer let ``OUTBOX_LIMIT`` messages pile up: treated as gone."""


# The one place where the OS's and trio's transport errors become ours.
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def set_nodelay(sock: trio.socket.SocketType | socket.socket) -> None:
    """Nagle plus delayed ACKs cost ~40 ms per request/response hop: turn Nagle off."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FramedStream:
    def __init__(self, stream: trio.abc.Stream, conn: wire.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self._send_lock = trio.Lock()

    async def send(self, msg: wire.Message) -> None:
        await self.send_bytes(self.conn.send(msg))

    async def send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except _TRANSPORT_ERRORS as exc:
                raise PeerBroken(f"could not send to peer: {exc}") from exc

    async def farewell(self, error: wire.Error) -> None:
        """Best effort: tell the peer why we are closing (see Connection.farewell)."""
        with contextlib.suppress(PeerGone, wire.ProtocolError), trio.move_on_after(1):
            await self.send_bytes(self.conn.farewell(error))

    async def receive(
        self, within: float | None = None, frame_timeout: float | None = None
    ) -> wire.Message:
        """The next message; PeerGone at end of stream, RemoteProtocolError on garbage.

        ``within`` bounds the wait for a whole message (``trio.TooSlowError`` past it);
        ``None`` waits for its start for ever, for channels kept alive by pings.
        ``frame_timeout`` bounds a frame once its first byte is in, however long the channel
        may stay silent between frames: a peer that trickles a frame in is cut off.
        """
        frame_deadline = math.inf
        with trio.fail_after(within) if within is not None else contextlib.nullcontext():
            while True:
                event = self.conn.next_event()
                if isinstance(event, wire.Message):
                    return event
                if event is wire.CLOSED:
                    raise PeerClosed("peer closed the connection")
                if frame_timeout is not None and self.conn.trailing_data:
                    if frame_deadline == math.inf:
                        frame_deadline = trio.current_time() + frame_timeout
                else:
                    frame_deadline = math.inf
                try:
                    with trio.fail_at(frame_deadline):
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                except _TRANSPORT_ERRORS as exc:
                    raise PeerBroken(f"connection broken: {exc}") from exc
                self.conn.receive_data(bytes(data))

    async def aclose(self) -> None:
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            await self.stream.aclose()


class Outbox:
    """An ordered, bounded queue of messages to one peer, drained by one writer task.

    ``post`` never blocks (callers are often in the middle of a state change): if the peer has
    stopped reading and ``limit`` messages are waiting, the outbox closes itself and the writer
    ends with ``OutboxFull``, which ends that peer's connection and nothing else.
    """

    def __init__(self, stream: FramedStream, limit: int = OUTBOX_LIMIT) -> None:
        self.stream = stream
        self._send, self._recv = trio.open_memory_channel[wire.Message](limit)
        self.overflowed = False

    def post(self, msg: wire.Message) -> bool:
        """Queue ``msg``; False if the outbox is closed (the peer is gone or overloaded)."""
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """Send everything posted, in order, until closed; OutboxFull if it overflowed."""
        async with self._recv:
            async for msg in self._recv:
                await self.stream.send(msg)
        if self.overflowed:
            raise OutboxFull(f"peer stopped reading ({OUTBOX_LIMIT} messages waiting)")


async def receive_one_frame_exact(
    sock: trio.socket.SocketType, max_frame: int, within: float
) -> bytes:
    """Read exactly one frame (header + payload) and not one byte more.

    Used on connections that are handed on afterwards (session sockets): anything read past
    the frame would be lost to the next owner of the socket.
    """
    with trio.fail_after(within):
        header = await _recv_exact(sock, wire.FRAME_HEADER.size)
        (length,) = wire.FRAME_HEADER.unpack(header)
        if length > max_frame:
            raise wire.RemoteProtocolError(
                f"peer announced a {length}-byte frame; the limit is {max_frame}"
            )
        return header + await _recv_exact(sock, length)


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await sock.recv(n - len(buf))
        except OSError as exc:
            raise PeerBroken(f"connection broken: {exc}") from exc
        if not chunk:
            raise PeerClosed(
                "peer closed the connection in the middle of a frame"
                if buf
                else "peer closed the connection"
            )
        buf += chunk
    return bytes(buf)
