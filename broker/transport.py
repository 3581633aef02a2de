"""The trio adapter over ``wire.Connection``, shared by the broker and the starter.

One ``FramedStream`` per connection: reads feed the sans-IO codec, writes are serialised by a
lock, and OS errors are translated here, once, into ``PeerGone`` (the peer went away or broke
the stream) so the code above deals with protocol outcomes only. Every read has a deadline.
"""

from __future__ import annotations

import contextlib
import socket

import trio

import wire

RECEIVE_SIZE = 65536


class PeerGone(ConnectionError):
    """The peer closed or broke the connection (possibly in the middle of a frame)."""


def set_nodelay(sock: trio.socket.SocketType | socket.socket) -> None:
    """Nagle plus delayed ACKs cost ~40 ms per request/response hop: turn Nagle off."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FramedStream:
    def __init__(self, stream: trio.SocketStream, conn: wire.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self._send_lock = trio.Lock()

    async def send(self, msg: wire.Message) -> None:
        data = self.conn.send(msg)
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerGone(f"could not send to peer: {exc}") from exc

    async def farewell(self, error: wire.Error) -> None:
        """Best effort: tell the peer why we are closing (see Connection.farewell)."""
        try:
            with trio.move_on_after(1):
                async with self._send_lock:
                    await self.stream.send_all(self.conn.farewell(error))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def receive(self, within: float | None = None) -> wire.Message:
        """The next message; PeerGone at end of stream, RemoteProtocolError on garbage.

        ``within`` bounds the wait for a whole message; ``None`` waits for its start forever
        but still gives a started frame only ``frame_timeout`` to complete (set by caller).
        """
        with trio.fail_after(within) if within is not None else contextlib.nullcontext():
            while True:
                event = self.conn.next_event()
                if isinstance(event, wire.Message):
                    return event
                if event is wire.CLOSED:
                    raise PeerGone("peer closed the connection")
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise PeerGone(f"connection broken: {exc}") from exc
                self.conn.receive_data(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


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
            raise PeerGone(f"connection broken: {exc}") from exc
        if not chunk:
            raise PeerGone(
                "peer closed the connection in the middle of a frame"
                if buf
                else "peer closed the connection"
            )
        buf += chunk
    return bytes(buf)
