"""The broker's connections: listeners, limits, local clients, starters' control channels.

Two endpoints: a unix socket for local clients, who are identified by SO_PEERCRED (no
passwords, no tokens), and a TCP port that starters dial *out* to. A starter's first frame says
what the connection is: ``starter_hello`` opens its authenticated control channel,
``session_attach`` brings a socket for a pending session (see ``_rendezvous``).

Every connection is handled in its own task and is bounded: a cap on connections per uid (unix)
or per address (TCP, until the starter has authenticated) and in total, a deadline for an idle
connection and a shorter one for every frame once its first byte is in, and at most one frame
(``max_frame``) plus one read buffered. A malformed, slow or hostile peer loses its own
connection and nothing else. Nothing here decides a job's fate: that is ``_jobs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from ssh_to_job import common, wire
from ssh_to_job.transport import (
    FramedStream,
    Outbox,
    PeerBroken,
    PeerGone,
    receive_one_frame_exact,
    set_nodelay,
)

from . import _queue
from ._jobs import Jobs, StarterConn
from ._queue import HELD, IDLE, RELEASING, RUNNING, SUSPENDED, UnknownJob
from ._rendezvous import Rendezvous, pass_socket

log = logging.getLogger("stj.broker")

PAGE = 2000
#: Seconds a local client may stay connected without sending a request.
CLIENT_IDLE = 120.0
#: Seconds of silence after which a starter counts as gone. Starters ping every 20 s.
STARTER_SILENCE = 60.0
#: The broker pings each starter this often (seconds), so an idle pool keeps its control
#: channels: a starter gives up after 60 s without hearing from the broker.
PING_INTERVAL = 20.0
MAX_CLIENT_KEY = 4096
_KEY_PREFIXES = (
    "ssh-ed25519 ",
    "ssh-rsa ",
    "ecdsa-sha2-nistp256 ",
    "ecdsa-sha2-nistp384 ",
    "ecdsa-sha2-nistp521 ",
)
#: Largest oversized request the broker reads and discards to answer it with a clear error.
_DRAIN_LIMIT = 64 << 20


class Gate:
    """Counts open connections per key (uid, or address) and in total; refuses past the caps."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.open: dict[object, int] = {}
        self.count = 0

    def enter(self, key: object) -> str | None:
        """Admit a connection from ``key``; None, or why it is refused."""
        if self.count >= self.total:
            return f"the broker has {self.count} connections open (its limit)"
        if self.open.get(key, 0) >= self.per_key:
            return f"you have {self.per_key} connections open to the broker (the limit)"
        self.open[key] = self.open.get(key, 0) + 1
        self.count += 1
        return None

    def leave(self, key: object) -> None:
        n = self.open.get(key, 0) - 1
        if n <= 0:
            self.open.pop(key, None)
        else:
            self.open[key] = n
        self.count -= 1


async def receive(
    stream: FramedStream, sock: trio.socket.SocketType, idle: float, frame_timeout: float
) -> wire.Message:
    """The next message: its first byte within ``idle`` s, all of it ``frame_timeout`` s later.

    ``trio.TooSlowError`` past either deadline. A slow sender cannot hold a connection (and its
    buffered partial frame) for longer than ``frame_timeout`` per frame.
    """
    if not stream.conn.trailing_data:
        with trio.fail_after(idle):
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError as exc:  # closed under us (a reconnect replaced it)
                raise PeerBroken("connection closed by the broker") from exc
    return await stream.receive(within=frame_timeout)


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


async def _refuse(sock: trio.socket.SocketType, conn: wire.Connection, error: wire.Error) -> None:
    """Best effort: one error frame to a connection we will not serve, then close it."""
    with trio.move_on_after(1), contextlib.suppress(OSError):
        await sock.send(conn.farewell(error))
    sock.close()


class Connections:
    def __init__(
        self,
        config: common.BrokerConfig,
        jobs: Jobs,
        rendezvous: Rendezvous,
        queue: _queue.JobQueue,
        signing_key: bytes,
        trusted: Callable[[bytes], bool],
    ) -> None:
        self.bc = config
        self.jobs = jobs
        self.rendezvous = rendezvous
        self.queue = queue
        self.signing_key = signing_key
        self.trusted = trusted
        self.unix_gate = Gate(config.max_connections, config.max_connections_per_uid)
        # TCP peers count until they have authenticated as a starter (or attached a session).
        self.tcp_gate = Gate(config.max_connections, config.max_connections_per_uid)
        self._output_req = 0

    async def accept_loop(
        self,
        sock: trio.socket.SocketType,
        handler: Callable[[trio.socket.SocketType], Awaitable[None]],
    ) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _addr = await sock.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning; clients are capped so
                    # that this is an operator's problem (ulimit), not a user's weapon.
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.05)
                    continue
                set_nodelay(conn)
                nursery.start_soon(handler, conn)

    # ------------------------------------------------------------------ local clients

    async def handle_client(self, sock: trio.socket.SocketType) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        conn = wire.Connection(
            wire.Channel.CONTROL, wire.Role.BROKER, wire.Role.CLIENT, self.bc.max_frame
        )
        # root is not capped: the administrator must get in during a flood.
        refused = None if uid == 0 else self.unix_gate.enter(uid)
        if refused is not None:
            log.warning("refusing a connection from uid %d: %s", uid, refused)
            await _refuse(sock, conn, wire.Error("busy", f"{refused}; try again later"))
            return
        stream = FramedStream(trio.SocketStream(sock), conn)
        try:
            while True:
                try:
                    msg = await receive(stream, sock, CLIENT_IDLE, self.bc.frame_timeout)
                except (PeerGone, trio.TooSlowError):
                    return
                if await self._dispatch_client(stream, sock, msg, uid, gid):
                    return
        except wire.RemoteProtocolError as exc:
            log.info("client uid %d sent garbage: %s", uid, exc)
            await stream.farewell(await self._protocol_error(stream, sock, exc))
        except PeerGone:
            pass
        except Exception:
            # A bug must cost this one connection, never the broker.
            log.exception("internal error serving uid %d", uid)
            await stream.farewell(
                wire.Error("internal", "internal broker error; see the broker log")
            )
        finally:
            if uid != 0:
                self.unix_gate.leave(uid)
            await stream.aclose()

    async def _protocol_error(
        self, stream: FramedStream, sock: trio.socket.SocketType, exc: wire.RemoteProtocolError
    ) -> wire.Error:
        """The error to send for ``exc``; an oversized request is read off (and dropped) first,
        so the client is not cut off mid-send and gets to read why."""
        buffered = stream.conn.trailing_data
        if len(buffered) >= wire.FRAME_HEADER.size:
            (length,) = wire.FRAME_HEADER.unpack(buffered[: wire.FRAME_HEADER.size])
            # Past _DRAIN_LIMIT it is garbage (say, HTTP) rather than a big request.
            if self.bc.max_frame < length <= _DRAIN_LIMIT:
                left = length - (len(buffered) - wire.FRAME_HEADER.size)
                with trio.move_on_after(self.bc.frame_timeout), contextlib.suppress(OSError):
                    while left > 0:
                        chunk = await sock.recv(min(left, 1 << 16))
                        if not chunk:
                            break
                        left -= len(chunk)
                return wire.Error(
                    "too_big",
                    f"the request is {length} bytes; the broker accepts at most "
                    f"{self.bc.max_frame} (broker.max_frame): pass big inputs as files, or submit "
                    "fewer arguments or a smaller environment",
                )
        return wire.Error("protocol", f"protocol error: {exc}")

    async def _dispatch_client(
        self,
        stream: FramedStream,
        sock: trio.socket.SocketType,
        msg: wire.Message,
        uid: int,
        gid: int,
    ) -> bool:
        if isinstance(msg, wire.Submit):
            await stream.send(self.jobs.submit(msg, uid, gid))
        elif isinstance(msg, wire.Query):
            await self._query(stream, msg)
        elif isinstance(msg, wire.Act):
            await stream.send(await self.jobs.act(msg, uid))
        elif isinstance(msg, wire.Status):
            await stream.send(self._status())
        elif isinstance(msg, wire.Output):
            await stream.send(await self._output(msg, uid))
        elif isinstance(msg, wire.SshRequest):
            await self._ssh(stream, sock, msg, uid)
            return True
        return False

    async def _query(self, stream: FramedStream, msg: wire.Query) -> None:
        states = _queue.FINISHED_STATES if msg.history else _queue.LIVE_STATES
        ids: wire.JobId | None = None
        if msg.ids:
            try:
                ids = wire.parse_job_id(msg.ids[0])
            except ValueError as exc:
                await stream.send(wire.Error("bad_request", str(exc)))
                return
        owner_uid = None
        if msg.owner:
            # isascii: '²'.isdigit() is true, and int() refuses it.
            if msg.owner.isascii() and msg.owner.isdigit():
                owner_uid = int(msg.owner) if len(msg.owner) <= 10 else -1
            else:
                owner_uid = _uid_of(msg.owner)
            if owner_uid is None or not 0 <= owner_uid < 1 << 32:
                await stream.send(wire.JobList(jobs=(), last=True))
                return
        page: list[wire.JobInfo] = []
        for info in self.queue.infos(ids, states, owner_uid):
            page.append(info)
            if len(page) == PAGE:
                await stream.send(wire.JobList(jobs=tuple(page), last=False))
                page = []
        await stream.send(wire.JobList(jobs=tuple(page), last=True))

    def _status(self) -> wire.Message:
        counts = self.queue.counts()
        starters = [
            wire.StarterInfo(
                starter_id=conn.name,
                slots=conn.slots,
                busy=len(conn.jobs),
                connected=True,
                jobs=tuple(sorted(conn.jobs)),
                address=conn.address,
            )
            for conn in self.jobs.starters.values()
        ]
        return wire.StatusReply(
            starters=tuple(starters),
            broker_pid=os.getpid(),
            jobs_idle=counts.get(IDLE, 0),
            jobs_running=counts.get(RUNNING, 0),
            jobs_held=counts.get(HELD, 0) + counts.get(RELEASING, 0),
        )

    async def _output(self, msg: wire.Output, uid: int) -> wire.Message:
        try:
            row = self.queue.get(msg.id)
        except UnknownJob:
            return wire.Error("unknown_job", f"job {msg.id} is not in the queue")
        if not (row.owner_uid == uid or self.jobs.is_superuser(uid)):
            return wire.Error("denied", f"job {row.id} belongs to {row.owner}")
        if msg.stream not in ("stdout", "stderr"):
            return wire.Error("bad_request", "stream must be stdout or stderr")
        conn = self.jobs.starters.get(row.starter) if row.placed else None
        # A job on its starter (running, or kept for debugging): its output is there.
        if row.placed and row.state in (RUNNING, SUSPENDED, HELD, RELEASING) and conn is None:
            conn = await self.jobs.wait_for_starter(row.starter, self.bc.starter_wait)
        if row.placed and conn is not None:
            self._output_req += 1
            req = self._output_req
            send, recv = trio.open_memory_channel[wire.OutputData](1)
            conn.pending_output[req] = send
            try:
                conn.post(
                    wire.FetchOutput(
                        request=req,
                        id=row.id,
                        stream=msg.stream,
                        max_bytes=min(msg.max_bytes, 1 << 19),
                    )
                )
                with trio.fail_after(10):
                    data = await recv.receive()
            except (PeerGone, trio.TooSlowError, trio.EndOfChannel):
                return wire.Error("unavailable", f"the starter of job {row.id} did not answer")
            finally:
                conn.pending_output.pop(req, None)
            return wire.OutputReply(id=row.id, data=data.data, running=True)
        tail = self.queue.tail(row.id, msg.stream)[-msg.max_bytes :]
        return wire.OutputReply(id=row.id, data=tail, running=False)

    # ------------------------------------------------------------------ ssh sessions

    def _ssh_refusal(
        self, msg: wire.SshRequest, uid: int
    ) -> tuple[wire.Error | None, _queue.Row | None]:
        try:
            jid = wire.parse_job_id(msg.job)
        except ValueError as exc:
            return wire.Error("bad_request", str(exc)), None
        job = jid.one
        try:
            row = self.queue.get(job)
        except UnknownJob:
            return wire.Error("unknown_job", f"job {job} is not in the queue"), None
        if not (row.owner_uid == uid or self.jobs.is_superuser(uid)):
            return wire.Error(
                "denied",
                f"job {job} belongs to {row.owner}; only its owner or a queue superuser may "
                "ssh to it",
            ), row
        debug = row.state in (HELD, RELEASING) and row.debug_hold
        if row.state == IDLE:
            return wire.Error(
                "idle",
                f"job {job} is idle (not running yet); use -auto-retry to wait for it to start",
            ), row
        if row.state in (HELD, RELEASING) and not debug:
            return wire.Error(
                "held",
                f"job {job} is {row.state} ({row.hold_reason}); release it with 'stj release' "
                "first",
            ), row
        if row.state == SUSPENDED:
            return wire.Error("suspended", f"job {job} is suspended; continue it first"), row
        if row.state != RUNNING and not debug:
            return wire.Error(
                "finished", f"job {job} is {row.state}; there is nothing to connect to"
            ), row
        key = msg.client_key
        if (
            len(key) > MAX_CLIENT_KEY
            or "\n" in key
            or "\r" in key
            or not key.startswith(_KEY_PREFIXES)
        ):
            return wire.Error("bad_request", "client_key is not an OpenSSH public key line"), row
        return None, row

    async def _ssh(
        self, stream: FramedStream, sock: trio.socket.SocketType, msg: wire.SshRequest, uid: int
    ) -> None:
        refusal, row = self._ssh_refusal(msg, uid)
        conn = None
        if refusal is None and row is not None:
            # A starter that is reconnecting (a dropped channel) is waited for briefly.
            conn = await self.jobs.wait_for_starter(row.starter, self.bc.starter_wait)
            if conn is None:
                refusal = wire.Error(
                    "unavailable",
                    f"the starter running job {row.id} ({row.starter}) "
                    "is not connected; try again shortly",
                )
        job = row.id if row is not None else msg.job
        if refusal is not None or row is None or conn is None:
            assert refusal is not None
            self.queue.audit(uid, "ssh", job, f"refused: {refusal.code}")
            await stream.send(refusal)
            return
        session_id, blob = self.rendezvous.capability(
            conn, row.id, row.owner_uid, uid, msg.client_key
        )
        session, why = await self.rendezvous.open(conn, row.id, session_id)
        if session is None:
            self.queue.audit(uid, "ssh", row.id, f"failed: {why}")
            await stream.send(wire.Error("session_failed", f"job {row.id}: {why}"))
            return
        try:
            grant = wire.SshGrant(
                session_id=session_id,
                job=row.id,
                capability=blob,
                starter_id=conn.name,
                starter_key=conn.key,
            )
            await pass_socket(stream, sock, grant, session.fileno())
            self.queue.audit(uid, "ssh", row.id, f"granted session {session_id}")
        except PeerGone as exc:
            log.info("ssh %s for uid %d: %s", row.id, uid, exc)
        finally:
            session.close()

    # ------------------------------------------------------------------ starters

    async def handle_tcp(self, sock: trio.socket.SocketType) -> None:
        try:
            host = sock.getpeername()[0]
        except OSError:
            sock.close()
            return
        bye = wire.Connection(wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER)
        refused = self.tcp_gate.enter(host)
        if refused is not None:
            log.warning("refusing a TCP connection from %s: %s", host, refused)
            await _refuse(sock, bye, wire.Error("busy", f"{refused}; try again later"))
            return
        admitted = True

        def authenticated() -> None:
            nonlocal admitted
            if admitted:
                admitted = False
                self.tcp_gate.leave(host)

        try:
            await self._serve_tcp(sock, bye, authenticated)
        finally:
            authenticated()

    async def _serve_tcp(
        self, sock: trio.socket.SocketType, bye: wire.Connection, authenticated: Callable[[], None]
    ) -> None:
        try:
            frame = await receive_one_frame_exact(sock, self.bc.max_frame, self.bc.frame_timeout)
            first = wire.decode_message(frame[wire.FRAME_HEADER.size :])
        except (PeerGone, wire.RemoteProtocolError, trio.TooSlowError) as exc:
            why = str(exc) or f"no complete frame within {self.bc.frame_timeout} s"
            log.info("dropping TCP peer: %s", why)
            # Say why (best effort), as on the unix socket: it may be a misconfigured starter.
            await _refuse(sock, bye, wire.Error("protocol", f"protocol error: {why}"))
            return
        if isinstance(first, wire.SessionAttach):
            self.rendezvous.attach(sock, first)
            return
        conn = wire.Connection(
            wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER, self.bc.max_frame
        )
        stream = FramedStream(trio.SocketStream(sock), conn)
        conn.receive_data(frame)
        # except*: the session's reader runs in a nursery body, which wraps what it raises.
        try:
            hello = await stream.receive(within=self.bc.frame_timeout)
            if not isinstance(hello, wire.StarterHello):
                raise wire.RemoteProtocolError(f"expected starter_hello, got {hello.TYPE}")
            await self._starter_session(stream, sock, hello, authenticated)
        except* wire.RemoteProtocolError as group:
            bad = group.exceptions[0]
            log.info("starter sent garbage: %s", bad)
            await stream.farewell(wire.Error("protocol", f"protocol error: {bad}"))
        except* (PeerGone, trio.TooSlowError) as group:
            log.info("starter connection ended: %s", group.exceptions[0])
        except* Exception:
            log.exception("internal error on a starter connection")
        finally:
            await stream.aclose()

    async def _starter_session(
        self,
        stream: FramedStream,
        sock: trio.socket.SocketType,
        hello: wire.StarterHello,
        authenticated: Callable[[], None],
    ) -> None:
        name = hello.starter_id
        handshake = wire.BrokerHandshake(self.signing_key, self.trusted)
        try:
            await stream.send(handshake.on_hello(hello))
            auth = await stream.receive(within=self.bc.frame_timeout)
            welcome, keys = handshake.on_auth(auth)
        except wire.HandshakeError as exc:
            log.warning("starter %r (key %s) refused: %s", name, hello.starter_key.hex(), exc)
            await stream.send(exc.error())
            return
        authenticated()
        old = self.jobs.starters.get(name)
        if old is not None:
            log.info("starter %s reconnected; dropping its old connection", name)
            await old.stream.aclose()
        await stream.send(welcome)
        stream.conn.start_encryption(send_key=keys.send, receive_key=keys.receive)
        peer = sock.getpeername()
        conn = StarterConn(
            name=name,
            key=hello.starter_key,
            slots=max(1, hello.slots),
            stream=stream,
            address=f"{peer[0]}:{peer[1]}",
            outbox=Outbox(stream),
        )
        self.jobs.starter_joined(conn)
        log.info("starter %s connected with %d slots", name, conn.slots)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.outbox.run)
                nursery.start_soon(self._pinger, conn)
                while True:
                    msg = await receive(stream, sock, STARTER_SILENCE, self.bc.frame_timeout)
                    self._from_starter(conn, msg)
        finally:
            self.jobs.starter_left(conn)

    async def _pinger(self, conn: StarterConn) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            conn.post(wire.Ping())

    def _from_starter(self, conn: StarterConn, msg: wire.Message) -> None:
        if isinstance(msg, wire.StarterSync):
            self.jobs.sync(conn, msg.jobs)
        elif isinstance(msg, wire.JobUpdate):
            self.jobs.report(conn, msg.report, msg.sessions)
            conn.post(wire.Ack(ids=(msg.report.id,)))
            self.jobs.schedule()
        elif isinstance(msg, wire.SessionFailed):
            self.rendezvous.failed(conn.name, msg)
        elif isinstance(msg, wire.OutputData):
            ch = conn.pending_output.get(msg.request)
            if ch is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    ch.send_nowait(msg)
