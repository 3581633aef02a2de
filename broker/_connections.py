"""The broker's connections: listeners, limits, local clients, starters' control channels.

Two endpoints: a unix socket for local clients, who are identified by SO_PEERCRED (no
passwords, no tokens), and a TLS 1.3 port that starters dial *out* to, where both ends
authenticate with certificates of the pool CA (``transport.serve_tls`` checks the peer's
certificate, pool id, role and revocation before any frame is read). A starter's first frame
says what the connection is: ``starter_hello`` opens its control channel (the name it gives
must be its certificate's), ``session_attach`` brings a socket for a pending session (see
``_rendezvous``). A peer without a certificate may only enrol with a join token.

Every connection is handled in its own task and is bounded: a cap on connections per uid on
the unix socket and in total, a deadline for the TLS handshake, for an idle connection and a
shorter one for every frame once its first byte is in, and at most one frame (``max_frame``)
plus one read buffered. A malformed, slow or hostile peer loses its own connection and nothing
else. Nothing here decides a job's fate: that is ``_jobs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ssh_to_job import common, wire
from ssh_to_job.transport import (
    FramedStream,
    Outbox,
    PeerBroken,
    PeerGone,
    PeerIdentity,
    set_nodelay,
    watch_revocation,
)

from . import _queue
from ._jobs import Jobs, StarterConn, user_name
from ._keys import KeyBook
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


TlsStream = trio.SSLStream[trio.SocketStream]
_TLS_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


async def _first_frame(stream: TlsStream, max_frame: int, within: float) -> tuple[bytes, bytes]:
    """The first frame's payload on a TLS connection, and what came after it (decrypted)."""
    decoder = wire.FrameDecoder(max_frame)
    with trio.fail_after(within):
        while True:
            payload = decoder.next_frame()
            if isinstance(payload, bytes):
                return payload, decoder.buffered
            if payload is wire.CLOSED:
                raise PeerBroken("peer closed the connection before its first frame")
            try:
                data = await stream.receive_some(65536)
            except _TLS_ERRORS as exc:
                raise PeerBroken(f"connection broken: {exc}") from exc
            decoder.receive_data(bytes(data))


async def _refuse_tls(stream: TlsStream, error: wire.Error) -> None:
    """Best effort: one error frame on a TLS connection we will not serve."""
    conn = wire.Connection(wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER)
    with trio.move_on_after(1), contextlib.suppress(*_TLS_ERRORS):
        await stream.send_all(conn.farewell(error))


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
        is_revoked: Callable[[int], bool],
    ) -> None:
        self.bc = config
        self.jobs = jobs
        self.rendezvous = rendezvous
        self.queue = queue
        self.signing_key = signing_key
        self.public_key = wire.public_key_of(signing_key)
        self.is_revoked = is_revoked
        #: The pool CA and the join tokens (set by the broker; None only in bare tests).
        self.pki: Any = None
        self.book: Any = None
        self.save_book: Callable[[], None] = lambda: None
        self.clock: Callable[[], float] = lambda: 0.0
        #: Starter name -> when the broker last heard from it (wall clock).
        self.last_seen: dict[str, float] = {}
        self.save_seen: Callable[[], None] = lambda: None
        self.unix_gate = Gate(config.max_connections, config.max_connections_per_uid)
        self._output_req = 0
        #: Client keys registered for remote use (``stj keys``; see ``_keys``, ``_relay``).
        self.keys = KeyBook(queue.db)
        #: Connections without a certificate not yet authenticated, per address and in all.
        self.anon_gate = Gate(config.max_connections, config.max_connections_per_uid)
        #: Session id -> the host names its host certificate is for, while it opens (_grant).
        self.cert_names: dict[str, tuple[str, ...]] = {}
        #: Starter name -> its standby (spare attach) connections waiting for a session.
        self.standbys: dict[str, set[trio.CancelScope]] = {}

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
        elif isinstance(msg, wire.ClusterQuery):
            await self._cluster_query(stream, msg)
        elif isinstance(msg, wire.Act):
            await stream.send(await self.jobs.act(msg, uid))
        elif isinstance(msg, wire.SshAllow):
            await stream.send(self.jobs.ssh_allow(msg, uid))
        elif isinstance(msg, wire.SessionQuery):
            seen = None if self.jobs.is_superuser(uid) else uid
            await stream.send(wire.SessionList(sessions=tuple(self.queue.sessions(seen, msg.job))))
        elif isinstance(msg, wire.Status):
            await stream.send(self._status())
        elif isinstance(msg, wire.Output):
            await stream.send(await self._output(msg, uid))
        elif isinstance(msg, wire.TokenCreate):
            await stream.send(self._token_create(msg, uid))
        elif isinstance(msg, wire.StarterRevoke):
            await stream.send(await self._revoke(msg, uid))
        elif isinstance(msg, wire.SshRequest):
            await self._ssh(stream, sock, msg, uid)
            return True
        elif isinstance(msg, wire.KeyAdd | wire.KeyList | wire.KeyRemove | wire.PoolCa):
            await stream.send(self._keys_request(msg, uid))
        return False

    def _keys_request(self, msg: wire.Message, uid: int) -> wire.Message:
        """``stj keys add|list|remove`` and ``stj pool-ca``: the asker is who SO_PEERCRED says."""
        pool_id = self.pki.pool_id if self.pki is not None else ""
        if isinstance(msg, wire.KeyAdd):
            reply = self.keys.add(uid, msg.key, msg.comment, user_name(uid))
            if isinstance(reply, wire.KeyAdded):
                self.queue.audit(uid, "key", "", f"registered {reply.fingerprint}")
                return wire.KeyAdded(fingerprint=reply.fingerprint, pool_id=pool_id)
            return reply
        if isinstance(msg, wire.KeyList):
            seen = None if self.jobs.is_superuser(uid) else uid
            return wire.KeyListReply(keys=tuple(self.keys.list(seen)))
        if isinstance(msg, wire.KeyRemove):
            reply = self.keys.remove(uid, msg.fingerprint, self.jobs.is_superuser(uid))
            if isinstance(reply, wire.KeyRemoved):
                self.queue.audit(uid, "key", "", f"removed {reply.fingerprint}")
            return reply
        if self.pki is None:
            return wire.Error("unavailable", "this broker has no pool CA")
        return wire.PoolCaReply(
            pool_id=pool_id,
            ca_cert=self.pki.ca_file.read_text(),
            ssh_host_ca=self.pki.ssh_host_ca_line(),
        )

    @staticmethod
    def _query_scope(
        msg: wire.Query | wire.ClusterQuery,
    ) -> tuple[wire.JobId | None, int | None] | wire.Error | None:
        """The ids and owner a query names; an Error for a bad id, None for an owner who
        cannot exist (the answer is empty)."""
        ids: wire.JobId | None = None
        if msg.ids:
            try:
                ids = wire.parse_job_id(msg.ids[0])
            except ValueError as exc:
                return wire.Error("bad_request", str(exc))
        owner_uid = None
        if msg.owner:
            # isascii: '²'.isdigit() is true, and int() refuses it.
            if msg.owner.isascii() and msg.owner.isdigit():
                owner_uid = int(msg.owner) if len(msg.owner) <= 10 else -1
            else:
                owner_uid = _uid_of(msg.owner)
            if owner_uid is None or not 0 <= owner_uid < 1 << 32:
                return None
        return ids, owner_uid

    async def _cluster_query(self, stream: FramedStream, msg: wire.ClusterQuery) -> None:
        scope = self._query_scope(msg)
        if isinstance(scope, wire.Error):
            await stream.send(scope)
            return
        page: list[wire.ClusterInfo] = []
        if scope is not None:
            for info in self.queue.clusters(*scope):
                page.append(info)
                if len(page) == PAGE:
                    await stream.send(wire.ClusterList(clusters=tuple(page), last=False))
                    page = []
        await stream.send(wire.ClusterList(clusters=tuple(page), last=True))

    async def _query(self, stream: FramedStream, msg: wire.Query) -> None:
        states = _queue.FINISHED_STATES if msg.history else _queue.LIVE_STATES
        scope = self._query_scope(msg)
        if isinstance(scope, wire.Error):
            await stream.send(scope)
            return
        if scope is None:
            empty = wire.JobTable(wire.JOB_COLUMNS, "[]") if msg.table else wire.JobList(jobs=())
            await stream.send(empty)
            return
        ids, owner_uid = scope
        if msg.table:
            await self._query_table(stream, ids, states, owner_uid, msg.objects)
            return
        page: list[wire.JobInfo] = []
        for info in self.queue.infos(ids, states, owner_uid):
            page.append(info)
            if len(page) == PAGE:
                await stream.send(wire.JobList(jobs=tuple(page), last=False))
                page = []
        await stream.send(wire.JobList(jobs=tuple(page), last=True))

    async def _query_table(
        self,
        stream: FramedStream,
        ids: wire.JobId | None,
        states: tuple[str, ...],
        owner_uid: int | None,
        objects: bool = False,
    ) -> None:
        """A listing as ``job_table`` pages, each sent as soon as SQLite has written it."""
        pages = self.queue.table_pages(ids, states, owner_uid, PAGE, objects)
        text = next(pages)
        for after in pages:
            await stream.send(wire.JobTable(wire.JOB_COLUMNS, text, last=False))
            text = after
        await stream.send(wire.JobTable(wire.JOB_COLUMNS, text, last=True))

    def known_starters(self) -> set[str]:
        """Every starter enrolled in this pool whose certificates are not all revoked."""
        if self.pki is None:
            return set()
        out: set[str] = set()
        for cert in self.pki.issued():
            if cert.role == wire.ROLE_STARTER and not self.is_revoked(cert.serial):
                out.add(cert.name)
        return out

    def _status(self) -> wire.Message:
        counts = self.queue.counts()
        live = self.jobs.starters
        starters = [
            wire.StarterInfo(
                starter_id=conn.name,
                slots=conn.slots,
                busy=len(conn.jobs),
                connected=True,
                jobs=tuple(sorted(conn.jobs)),
                address=conn.address,
                last_seen=self.last_seen.get(conn.name, 0.0),
                tracking=conn.tracking,
            )
            for conn in live.values()
        ]
        for name in sorted(self.known_starters() - set(live)):
            starters.append(
                wire.StarterInfo(
                    starter_id=name,
                    slots=0,
                    busy=0,
                    connected=False,
                    jobs=(),
                    last_seen=self.last_seen.get(name, 0.0),
                )
            )
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
        refusal = self.jobs.ssh_refusal(row, uid)
        if refusal is not None:
            return refusal, row
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
        """A local client's session: authorised and opened by ``_grant`` (as a remote one's),
        then its socket passed over the unix socket."""
        from ._grant import Caller, authorise_and_open, granted

        caller = Caller(uid)
        opened = await authorise_and_open(self, msg, caller)
        if isinstance(opened, wire.Error):
            await stream.send(opened)
            return
        try:
            await pass_socket(stream, sock, opened.grant(), opened.session.fileno())
            granted(self, opened, caller)
        except PeerGone as exc:
            log.info("ssh %s for uid %d: %s", opened.route.job, uid, exc)
        finally:
            opened.session.close()

    # ------------------------------------------------------------------ starters

    async def handle_tls(self, stream: TlsStream, ident: PeerIdentity | None) -> None:
        """One TLS connection on the broker's port (``transport.serve_tls`` has checked the
        peer's certificate: this pool's CA, a starter, not revoked). Its first frame says what
        it is: ``starter_hello`` opens a control channel, ``session_attach`` brings a session
        socket. A peer without a certificate may only enrol (``enroll``)."""
        try:
            if ident is None:
                await self._anonymous(stream)
                return
            await self._serve_tls(stream, ident)
        except Exception:
            # A bug must cost this one connection, never the broker (serve_tls ends on it).
            log.exception("internal error on a connection from %s", ident)
        finally:
            with contextlib.suppress(*_TLS_ERRORS):
                await trio.aclose_forcefully(stream)

    async def _anonymous(self, stream: TlsStream) -> None:
        """A connection without a certificate: a remote client (``remote_hello``, see
        ``_relay``) or a starter enrolling (anything else goes to the enrolment codec).

        Until it has proved who it is, such a connection counts against ``anon_gate`` (per
        address and in all), so unauthenticated peers hold a bounded number of sockets."""
        try:
            where = str(stream.transport_stream.socket.getpeername()[0])
        except (OSError, AttributeError, IndexError):
            where = "?"
        refused = self.anon_gate.enter(where)
        if refused is not None:
            log.warning("refusing a connection from %s: %s", where, refused)
            await _refuse_tls(stream, wire.Error("busy", f"{refused}; try again later"))
            return
        held = True

        def authenticated() -> None:
            nonlocal held
            if held:
                held = False
                self.anon_gate.leave(where)

        try:
            try:
                frame, extra = await _first_frame(stream, self.bc.max_frame, self.bc.frame_timeout)
            except (PeerGone, trio.TooSlowError) as exc:
                log.info("dropping a connection without a certificate: %s", exc or "timed out")
                return
            try:
                remote = isinstance(wire.decode_message(frame), wire.RemoteHello)
            except wire.RemoteProtocolError:
                remote = False  # the enrolment codec has its own message types
            if remote:
                from ._relay import serve_remote

                await serve_remote(self, stream, frame, extra, authenticated)
                return
            await self.enroll(stream, wire.encode_frame(frame, self.bc.max_frame) + extra)
        finally:
            authenticated()

    async def enroll(self, stream: TlsStream, first: bytes = b"") -> None:
        """A connection without a certificate: one enrolment (a join token for a certificate).

        The whole exchange has the handshake's deadline; the spent token is saved before the
        certificate goes out, so a crash never leaves a used token usable again.
        """
        pki = self.pki
        if pki is None or not self.bc.allow_enrollment:
            await _refuse_tls(
                stream, wire.Error("refused", "a certificate of this pool is required")
            )
            return
        from ssh_to_job.common import BrokerEnrollment, EnrollError, decode_enroll, encode_enroll

        def issue(name: str, public_key: Any) -> Any:
            # A host that enrols again (reinstalled, new key) replaces its old certificates.
            old = pki.revoke(wire.ROLE_STARTER, name)
            if old:
                log.info("starter %s enrolled again: revoked its old serials %s", name, old)
            return pki.issue(wire.ROLE_STARTER, name, public_key)

        enrollment = BrokerEnrollment(pki.ca_file.read_bytes(), self.book, issue, self.clock)
        decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME)
        decoder.receive_data(first)

        async def next_msg() -> object:
            while not isinstance(payload := decoder.next_frame(), bytes):
                if payload is wire.CLOSED:
                    raise PeerBroken("peer closed the enrolment connection")
                try:
                    data = await stream.receive_some(65536)
                except _TLS_ERRORS as exc:
                    raise PeerBroken(f"connection broken: {exc}") from exc
                decoder.receive_data(bytes(data))
            return decode_enroll(payload)

        async def say(msg: Any) -> None:
            await stream.send_all(wire.encode_frame(encode_enroll(msg)))

        try:
            with trio.fail_after(self.bc.handshake_timeout + self.bc.frame_timeout):
                await say(enrollment.on_hello(await next_msg()))
                request = await next_msg()
                try:
                    reply = enrollment.on_request(request)
                finally:
                    self.save_book()
                log.info("starter %s enrolled", getattr(request, "name", "?"))
                await say(reply)
        except EnrollError as exc:
            log.warning("enrolment refused: %s", exc.message)
            with trio.move_on_after(1), contextlib.suppress(*_TLS_ERRORS):
                await say(exc.error())
        except (PeerGone, wire.RemoteProtocolError, trio.TooSlowError, *_TLS_ERRORS) as exc:
            log.info("enrolment connection ended: %s", exc or "timed out")

    # ------------------------------------------------------------------ pool administration

    def _token_create(self, msg: wire.TokenCreate, uid: int) -> wire.Message:
        if not self.jobs.is_superuser(uid):
            return wire.Error("denied", "only root or a queue superuser may create join tokens")
        if self.pki is None:
            return wire.Error("unavailable", "this broker has no pool CA")
        ttl = msg.ttl or self.bc.token_ttl
        now = self.clock()
        try:
            token = self.book.create(self.pki.ca.fingerprint, ttl, now)
        except ValueError as exc:
            return wire.Error("bad_request", str(exc))
        self.save_book()
        self.queue.audit(uid, "token", "", f"created join token {token.token_id} for {ttl:g} s")
        return wire.TokenCreated(token=str(token), expires_at=now + ttl)

    async def _revoke(self, msg: wire.StarterRevoke, uid: int) -> wire.Message:
        if not self.jobs.is_superuser(uid):
            return wire.Error("denied", "only root or a queue superuser may revoke starters")
        if self.pki is None:
            return wire.Error("unavailable", "this broker has no pool CA")
        serials = self.pki.revoke(wire.ROLE_STARTER, msg.name)
        if not serials:
            return wire.Error("unknown_starter", f"no certificate was ever issued to {msg.name!r}")
        self.queue.audit(uid, "revoke", "", f"starter {msg.name}: serials {serials}")
        log.warning("starter %s revoked (serials %s)", msg.name, [f"{s:x}" for s in serials])
        cut = 0
        conn = self.jobs.starters.get(msg.name)
        if conn is not None:
            cut += 1
            why = wire.Error("revoked", f"starter {msg.name} was revoked by the pool admin")
            await conn.stream.farewell(why)
            await conn.stream.aclose()
        cut += self.rendezvous.drop_starter(msg.name)
        # Not counted in ``cut``: a standby carries no session (and one starter always has some).
        self.drop_standbys(msg.name)
        return wire.StarterRevoked(serials=tuple(f"{s:x}" for s in serials), cut=cut)

    async def _serve_tls(self, stream: TlsStream, ident: PeerIdentity) -> None:
        try:
            frame, extra = await _first_frame(stream, self.bc.max_frame, self.bc.frame_timeout)
            first = wire.decode_message(frame)
        except (PeerGone, wire.RemoteProtocolError, trio.TooSlowError) as exc:
            why = str(exc) or f"no complete frame within {self.bc.frame_timeout} s"
            log.info("dropping %s: %s", ident, why)
            await _refuse_tls(stream, wire.Error("protocol", f"protocol error: {why}"))
            return
        if isinstance(first, wire.SessionAttach):
            await self._attach(stream, ident, first, extra)
            return
        if isinstance(first, wire.AttachStandby):
            await self._standby(stream, ident, first, frame, extra)
            return
        conn = wire.Connection(
            wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER, self.bc.max_frame
        )
        fs = FramedStream(stream, conn)
        conn.receive_data(wire.encode_frame(frame, self.bc.max_frame) + extra)
        # except*: the session's reader runs in a nursery body, which wraps what it raises.
        try:
            hello = await fs.receive(within=self.bc.frame_timeout)
            if not isinstance(hello, wire.StarterHello):
                raise wire.RemoteProtocolError(f"expected starter_hello, got {hello.TYPE}")
            if hello.starter_id != ident.name:
                log.warning("%s announced itself as %r; refused", ident, hello.starter_id)
                await fs.send(
                    wire.Error(
                        "bad_name",
                        f"this certificate is for starter {ident.name!r}, not {hello.starter_id!r}",
                    )
                )
                return
            await self._starter_session(fs, stream, ident, hello)
        except* wire.RemoteProtocolError as group:
            bad = group.exceptions[0]
            log.info("starter %s sent garbage: %s", ident.name, bad)
            await fs.farewell(wire.Error("protocol", f"protocol error: {bad}"))
        except* (PeerGone, trio.TooSlowError) as group:
            log.info("starter %s connection ended: %s", ident.name, group.exceptions[0])

    async def _attach(
        self, stream: TlsStream, ident: PeerIdentity, msg: wire.SessionAttach, extra: bytes
    ) -> None:
        """A session connection: checked, out of TLS, and its socket handed to the rendezvous."""
        if extra or msg.starter_id != ident.name or not self.rendezvous.expects(msg, ident.name):
            log.warning("rejected session attach for %r from %s", msg.session_id, ident)
            return
        try:
            with trio.fail_after(self.bc.frame_timeout):
                await stream.send_all(self._session_cert(msg))
                raw, left = await stream.unwrap()
        except (trio.TooSlowError, *_TLS_ERRORS) as exc:
            log.info("session %s: leaving TLS failed: %s", msg.session_id[:8], exc)
            return
        if left or not isinstance(raw, trio.SocketStream):
            log.warning("session %s: bytes after the attach frame; dropped", msg.session_id[:8])
            return
        # serve_tls closes the connection's stream when we return: the rendezvous gets its own.
        dup = socket.socket(fileno=os.dup(raw.socket.fileno()))
        self.rendezvous.attach(trio.socket.from_stdlib_socket(dup), msg, ident.name)

    async def _standby(
        self,
        stream: TlsStream,
        ident: PeerIdentity,
        msg: wire.AttachStandby,
        frame: bytes,
        extra: bytes,
    ) -> None:
        """A spare attach connection (``starter/_spare.py``): held, with no session, until the
        starter's next ``session_attach`` arrives on it, then exactly ``_attach``.

        It gives the starter nothing a fresh dial would not: the same certificate checks have
        passed, and the attach that follows is judged as any other. What it costs the broker is
        bounded: ``standby_per_starter`` per certified name, ``standby_lifetime`` each.
        """
        name = ident.name
        if msg.starter_id != name:
            log.warning("%s announced a standby as %r; refused", ident, msg.starter_id)
            await _refuse_tls(
                stream,
                wire.Error(
                    "bad_name", f"this certificate is for starter {name!r}, not {msg.starter_id!r}"
                ),
            )
            return
        held = self.standbys.setdefault(name, set())
        if len(held) >= self.bc.standby_per_starter:
            if not held:
                self.standbys.pop(name, None)
            log.warning(
                "refusing a standby connection of starter %s: it holds %d "
                "(broker.standby_per_starter)",
                name,
                len(held),
            )
            await _refuse_tls(
                stream,
                wire.Error(
                    "busy",
                    f"starter {name} holds {len(held)} standby connections "
                    "(the broker's standby_per_starter)",
                ),
            )
            return
        scope = trio.CancelScope()
        held.add(scope)
        try:
            with scope:
                got = await self._standby_attach(stream, frame, extra)
        finally:
            held.discard(scope)
            if not held:
                self.standbys.pop(name, None)
        if scope.cancelled_caught:
            log.info("dropped a standby connection of starter %s (revoked)", name)
            return
        if isinstance(got, str):
            log.debug("standby connection of starter %s closed: %s", name, got)
            return
        attach, rest = got
        # The certificate was checked when this connection was made, maybe minutes ago.
        if self.is_revoked(ident.serial):
            log.warning(
                "session attach for %r on a standby of revoked %s", attach.session_id, ident
            )
            return
        await self._attach(stream, ident, attach, rest)

    async def _standby_attach(
        self, stream: TlsStream, frame: bytes, extra: bytes
    ) -> tuple[wire.SessionAttach, bytes] | str:
        """The ``session_attach`` on a standby connection and what came after it; or why there
        is none. Its first byte may take ``standby_lifetime`` s, the rest of the frame
        ``frame_timeout`` s more."""
        conn = wire.Connection(
            wire.Channel.ATTACH, wire.Role.BROKER, wire.Role.STARTER, self.bc.max_frame
        )
        conn.receive_data(wire.encode_frame(frame, self.bc.max_frame) + extra)
        lifetime, frame_timeout = self.bc.standby_lifetime, self.bc.frame_timeout
        frame_deadline: float | None = None
        try:
            conn.next_event()  # the attach_standby itself
            while not isinstance(event := conn.next_event(), wire.Message):
                if event is wire.CLOSED:
                    return "closed by the starter"
                if frame_deadline is None and conn.trailing_data:
                    frame_deadline = trio.current_time() + frame_timeout
                if frame_deadline is None:
                    with trio.move_on_after(lifetime) as idle:
                        data = await stream.receive_some(65536)
                    if idle.cancelled_caught:
                        return f"unused for {lifetime:g} s (broker.standby_lifetime)"
                    frame_deadline = trio.current_time() + frame_timeout
                else:
                    with trio.fail_at(frame_deadline):
                        data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))
        except trio.TooSlowError:
            return f"no complete frame within {frame_timeout:g} s"
        except wire.RemoteProtocolError as exc:
            log.info("a standby connection sent garbage: %s", exc)
            return f"protocol error: {exc}"
        except _TLS_ERRORS as exc:
            return f"connection broken: {exc}"
        assert isinstance(event, wire.SessionAttach)  # the table allows nothing else
        return event, conn.trailing_data

    def drop_standbys(self, starter: str) -> int:
        """Close every standby connection of ``starter`` (revoked); how many there were."""
        held = self.standbys.get(starter, set())
        for scope in held:
            scope.cancel()
        return len(held)

    def _session_cert(self, msg: wire.SessionAttach) -> bytes:
        """The ``session_cert`` frame for an attach: the session's host key certified by the
        pool's OpenSSH host CA for the host names the request was authorised under
        (``job-32.0``, ``job-slurm-1234``...: ``_grant``), so that plain ssh with a
        ``@cert-authority job-*`` line checks it (``stj ssh-config -pool``)."""
        conn = wire.Connection(wire.Channel.ATTACH, wire.Role.BROKER, wire.Role.STARTER)
        conn.receive_data(wire.encode_frame(wire.encode_message(msg)))
        conn.next_event()
        pending = self.rendezvous.sessions.get(msg.session_id)
        names = list(self.cert_names.get(msg.session_id, ()))
        cert = ""
        if msg.host_key and self.pki is not None and pending is not None and names:
            from ssh_to_job.common import PkiError

            try:
                cert = self.pki.host_certificate(
                    msg.host_key, names, f"{self.pki.pool_id}/{pending.job}/{msg.session_id}"
                )
            except PkiError as exc:
                log.warning("session %s: no host certificate: %s", msg.session_id[:8], exc)
        return conn.send(wire.SessionCert(certificate=cert))

    async def _starter_session(
        self,
        stream: FramedStream,
        tls: TlsStream,
        ident: PeerIdentity,
        hello: wire.StarterHello,
    ) -> None:
        name = ident.name
        old = self.jobs.starters.get(name)
        if old is not None:
            log.info("starter %s reconnected; dropping its old connection", name)
            await old.stream.aclose()
        await stream.send(wire.Welcome(broker_key=self.public_key))
        try:
            peer = tls.transport_stream.socket.getpeername()
            address = f"{peer[0]}:{peer[1]}"
        except (OSError, AttributeError):
            address = "?"
        conn = StarterConn(
            name=name,
            key=hello.starter_key,
            slots=max(1, hello.slots),
            stream=stream,
            address=address,
            outbox=Outbox(stream),
            tracking=hello.tracking[:32],
        )
        self.jobs.starter_joined(conn)
        self.seen(name, connected=True)
        log.info("starter %s connected from %s with %d slots", name, address, conn.slots)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.outbox.run)
                nursery.start_soon(self._pinger, conn)
                nursery.start_soon(watch_revocation, tls, ident.serial, self.is_revoked)
                while True:
                    msg = await stream.receive(
                        within=STARTER_SILENCE, frame_timeout=self.bc.frame_timeout
                    )
                    self.seen(name)
                    self._from_starter(conn, msg)
        finally:
            self.jobs.starter_left(conn)
            self.seen(name, connected=False)

    def seen(self, name: str, connected: bool | None = None) -> None:
        """The broker heard from starter ``name``; on (dis)connection the times are saved, so
        ``stj status`` shows when a starter was last seen across broker restarts."""
        self.last_seen[name] = self.clock()
        if connected is not None:
            self.save_seen()

    def _renew(self, conn: StarterConn, msg: wire.CertRenew) -> None:
        """A new certificate for a connected (so authenticated, not revoked) starter's new key,
        in the name its current certificate carries; its old certificate stays valid."""
        if self.pki is None:
            return
        from ssh_to_job.common import PkiError, cert_pem, parse_public_key

        try:
            key = parse_public_key(msg.public_key)
        except PkiError as exc:
            log.warning("starter %s asked to renew for a bad key: %s", conn.name, exc)
            return
        cert = self.pki.issue(wire.ROLE_STARTER, conn.name, key)
        log.info("renewed the certificate of starter %s (serial %x)", conn.name, cert.serial_number)
        conn.post(wire.CertRenewed(certificate=cert_pem(cert).decode("ascii")))

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
        elif isinstance(msg, wire.SessionEnded):
            if not self.queue.session_ended(
                msg.session_id,
                conn.name,
                msg.started,
                msg.ended,
                msg.bytes_in,
                msg.bytes_out,
                msg.forwards,
                msg.exit_status,
            ):
                log.warning("starter %s reports an unknown session %r", conn.name, msg.session_id)
        elif isinstance(msg, wire.CertRenew):
            self._renew(conn, msg)
        elif isinstance(msg, wire.OutputData):
            ch = conn.pending_output.get(msg.request)
            if ch is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    ch.send_nowait(msg)
