"""Remote clients: a signed request over TLS, then a relay that copies nothing through Python.

A remote client (a laptop) connects to the broker's TLS port without a certificate and says
``remote_hello``; the broker answers with a fresh nonce (``remote_challenge``); the client
signs that nonce, the pool id and its request with the key its user registered
(``_keys.KeyBook.verify``). The request is then authorised exactly as a local one (the
registered key's uid stands for the caller), the starter dials its session connection as
usual, and the grant goes back inside TLS. Both ends then leave TLS (close_notify both ways):
from here the client's connection carries SSH, end to end encrypted and host-key pinned, and
the broker joins it to the starter's session connection **in the kernel**: ``os.splice``
moves bytes from one socket into a pipe and from the pipe into the other socket. No session
byte is ever copied into this process's memory (``relay`` never calls recv or send; only the
byte counts splice reports come back up). The one exception is not SSH: the start of the
client's ``session_open`` frame, when it arrives in the same read as the client's
close_notify, is passed on once before the relay starts.

This module must never read a session byte, and never relay before the request verified.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ssh_to_job import wire
from ssh_to_job.transport import FramedStream, PeerGone

from ._grant import Caller, authorise_and_open, granted

if TYPE_CHECKING:
    from ._connections import Connections

log = logging.getLogger("stj.broker")

#: Seconds a remote client has between its hello and its signed request.
REQUEST_TIMEOUT = 30.0
#: Pipe size for the relay (the kernel's default is 64 KiB; bigger means fewer wake-ups).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: Errors that end one direction of the relay: the peer reset or went away.
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EBADF)


@attrs.define
class RelayStats:
    """Bytes moved each way (client to starter, starter to client), as splice reported."""

    to_starter: int = 0
    to_client: int = 0


def _one_way(src: int, dst: int, pipe: tuple[int, int], count: Callable[[int], None]) -> bool:
    """Splice ``src`` into ``dst`` (blocking file descriptors) until ``src`` ends; then end
    ``dst``'s sending side. Runs in a thread of its own: a blocking splice costs one system
    call per chunk and no event-loop round trip (measured on the development machine: about
    1.3 broker CPU seconds per GiB, against 1.6 for the same loop driven by trio's
    wait_readable; most of what is left is the kernel's own work).

    True if it ended because a side reset or went away (the whole relay must end), False at
    a clean end of stream (the other direction may still have bytes to move).
    """
    r, w = pipe
    while True:
        try:
            n = os.splice(src, w, PIPE_SIZE, flags=os.SPLICE_F_MOVE)
        except OSError as exc:
            if exc.errno in _GONE or exc.errno == errno.EINVAL:
                return True
            raise
        if n == 0:
            break
        count(n)
        while n:
            try:
                n -= os.splice(r, dst, n, flags=os.SPLICE_F_MOVE)
            except OSError as exc:
                if exc.errno in _GONE or exc.errno == errno.EINVAL:
                    return True
                raise
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(dst)) as end:
        end.shutdown(socket.SHUT_WR)
    return False


#: Relay threads are long-lived (two per remote session): they get their own, wide limiter
#: rather than trio's default one (40 threads, shared with everything else).
_THREADS = trio.CapacityLimiter(100_000)


async def relay(
    client: trio.socket.SocketType, starter: trio.socket.SocketType, stats: RelayStats
) -> None:
    """Join two connected sockets in the kernel until both directions have ended.

    A direction ends at end of stream, passed on as a half-close (so ssh's own shutdown
    works) while the other direction goes on; a reset on either side ends both. Cancelled
    (the broker stops), it shuts both sockets down, which ends the threads' splices; the
    threads are never abandoned, so no splice can run on a descriptor after it is closed.
    """

    def up(n: int) -> None:
        stats.to_starter += n

    def down(n: int) -> None:
        stats.to_client += n

    def cut() -> None:
        for sock in (client, starter):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    pipes = [os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)]
    try:
        for _r, w in pipes:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        c_fd, s_fd = client.fileno(), starter.fileno()
        # The threads block in splice; trio no longer touches these sockets.
        os.set_blocking(c_fd, True)
        os.set_blocking(s_fd, True)
        async with trio.open_nursery() as nursery:
            left = 2

            async def way(src: int, dst: int, pipe: tuple[int, int], count: Any) -> None:
                nonlocal left
                try:
                    gone = await trio.to_thread.run_sync(
                        _one_way, src, dst, pipe, count, limiter=_THREADS
                    )
                except OSError as exc:
                    log.info("relay: %s", exc)
                    gone = True
                left -= 1
                if gone:
                    cut()
                if not left:
                    nursery.cancel_scope.cancel()

            async def watch() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    if left:
                        cut()

            nursery.start_soon(way, c_fd, s_fd, pipes[0], up)
            nursery.start_soon(way, s_fd, c_fd, pipes[1], down)
            nursery.start_soon(watch)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def _frame_limit(conns: Connections) -> int:
    return int(conns.bc.max_frame) + wire.FRAME_HEADER.size


def _address(stream: Any) -> str:
    try:
        peer = stream.transport_stream.socket.getpeername()
        return str(peer[0])
    except (OSError, AttributeError, IndexError):
        return "?"


def source_refusal(row: Any, addr: str) -> wire.Error | None:
    """The job's ``--allow-ssh-from`` rule, for a remote client at ``addr`` (local clients
    are not subject to it)."""
    allowed = row.job_spec().ssh_from
    if not allowed:
        return None
    try:
        ip = ipaddress.ip_address(addr)
        if any(ip in ipaddress.ip_network(net, strict=False) for net in allowed):
            return None
    except ValueError:
        pass
    return wire.Error(
        "source_denied",
        f"job {row.id} accepts remote sessions only from {','.join(allowed)} "
        f"(stj submit --allow-ssh-from); you connect from {addr}",
    )


async def serve_remote(
    conns: Connections,
    stream: Any,
    frame: bytes,
    extra: bytes,
    authenticated: Callable[[], None] = lambda: None,
) -> None:
    """One remote client's connection, from its ``remote_hello`` (already read) to the end of
    its relayed session. Refusals are one ``error`` frame with a sentence for a person.
    ``authenticated`` is called once the request's signature verified."""
    bc = conns.bc
    conn = wire.Connection(wire.Channel.REMOTE, wire.Role.BROKER, wire.Role.CLIENT, bc.max_frame)
    fs = FramedStream(stream, conn)
    conn.receive_data(wire.encode_frame(frame, bc.max_frame) + extra)
    addr = _address(stream)
    pool_id = conns.pki.pool_id if conns.pki is not None else ""
    try:
        hello = await fs.receive(within=bc.frame_timeout)
        if not isinstance(hello, wire.RemoteHello):
            raise wire.RemoteProtocolError(f"expected remote_hello, got {hello.TYPE}")
        if hello.version != 1:
            await fs.send(
                wire.Error("version", f"remote protocol version {hello.version} is not spoken here")
            )
            return
        nonce = secrets.token_bytes(32)
        await fs.send(wire.RemoteChallenge(nonce=nonce, pool_id=pool_id))
        msg = await fs.receive(within=REQUEST_TIMEOUT, frame_timeout=bc.frame_timeout)
        assert isinstance(msg, wire.RemoteSsh)  # the REMOTE table allows nothing else
        if conn.trailing_data:
            raise wire.RemoteProtocolError("bytes after the request")
        who = conns.keys.verify(pool_id, nonce, msg)
        if isinstance(who, wire.Error):
            log.warning("remote request from %s refused: %s", addr, who.message)
            conns.queue.audit(-1, "ssh", msg.job[:64], f"refused remote {addr}: {who.code}")
            await fs.send(who)
            return
        authenticated()
        await _session(conns, fs, stream, msg, who.uid, who.fingerprint, addr)
    except wire.RemoteProtocolError as exc:
        log.info("remote client %s sent garbage: %s", addr, exc)
        await fs.farewell(wire.Error("protocol", f"protocol error: {exc}"))
    except (PeerGone, trio.TooSlowError) as exc:
        log.info("remote client %s: %s", addr, exc or "timed out")


async def _session(
    conns: Connections,
    fs: FramedStream,
    stream: Any,
    msg: wire.RemoteSsh,
    uid: int,
    fingerprint: str,
    addr: str,
) -> None:
    """Authorise and open as for a local client (``_grant``: our queue's jobs and Slurm's
    alike), grant inside TLS, leave TLS, relay."""
    caller = Caller(uid, fingerprint, addr)
    request = wire.SshRequest(job=msg.job, client_key=msg.client_key)
    opened = await authorise_and_open(conns, request, caller)
    if isinstance(opened, wire.Error):
        await fs.send(opened)
        return
    session, session_id = opened.session, opened.session_id
    try:
        await fs.send(opened.grant())
        granted(conns, opened, caller)
        try:
            with trio.fail_after(conns.bc.frame_timeout):
                raw, left = await stream.unwrap()
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            log.info("remote session %s: leaving TLS failed: %s", session_id[:8], exc)
            return
        if not isinstance(raw, trio.SocketStream):
            return
        stats = RelayStats()
        if left:
            # The client may send session_open right behind its close_notify, so its start
            # can come in with our last TLS read: the control exchange's tail (at most that
            # one frame: the client sends nothing more before the starter's session_ready),
            # not SSH, which the starter has not even started yet. Pass it on as it is.
            if len(left) > _frame_limit(conns):
                log.warning("remote session %s: bytes after the grant; dropped", session_id[:8])
                return
            view = memoryview(left)
            try:
                while view:
                    view = view[await session.send(view) :]
            except OSError as exc:
                log.info("remote session %s: starter gone: %s", session_id[:8], exc)
                return
            stats.to_starter += len(left)
        log.info("remote session %s: relaying %s <-> %s", session_id[:8], addr, opened.starter.name)
        await relay(raw.socket, session, stats)
        log.info(
            "remote session %s ended: relayed %d bytes to the starter, %d to the client "
            "(spliced, not copied)",
            session_id[:8],
            stats.to_starter,
            stats.to_client,
        )
    finally:
        session.close()
