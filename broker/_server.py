"""The broker daemon: queue, authorization, capabilities, and the session rendezvous.

Two endpoints: a unix socket for local clients, who are identified by SO_PEERCRED (no
passwords, no tokens), and a TCP port that starters dial *out* to. A starter's first frame says
what the connection is: ``starter_hello`` opens its authenticated control channel,
``session_attach`` brings a socket for a pending session, which the broker hands to the waiting
client as a file descriptor (SCM_RIGHTS) without reading a byte past the attach frame.

Every connection is handled in its own task; a malformed or hostile peer loses its own
connection and nothing else. The broker never trusts a starter's word about a job it does not
run, and never tells a client about a job it may not see.
"""

from __future__ import annotations

import array
import contextlib
import logging
import math
import os
import pathlib
import pwd
import secrets
import socket
import struct
import time
from collections.abc import Callable

import attrs
import trio

from ssh_to_job import common, wire
from ssh_to_job.transport import FramedStream, PeerGone, receive_one_frame_exact, set_nodelay

from . import _queue
from ._queue import HELD, IDLE, REMOVED, RUNNING, SUSPENDED, JobQueue, UnknownJob

log = logging.getLogger("stj.broker")

PAGE = 2000
CLIENT_IDLE = 120.0
RELEASING = "released; ending its debug hold"
STARTER_SILENCE = 60.0
MAX_CLIENT_KEY = 4096
_KEY_PREFIXES = (
    "ssh-ed25519 ",
    "ssh-rsa ",
    "ecdsa-sha2-nistp256 ",
    "ecdsa-sha2-nistp384 ",
    "ecdsa-sha2-nistp521 ",
)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


@attrs.define(eq=False)
class StarterConn:
    name: str
    key: bytes
    slots: int
    stream: FramedStream
    address: str
    jobs: set[str] = attrs.field(factory=set)
    pending_output: dict[int, trio.MemorySendChannel[wire.OutputData]] = attrs.field(factory=dict)
    #: Everything the broker says to this starter goes through here, in order, sent by one task.
    outbox: trio.MemorySendChannel[wire.Message] | None = None

    def post(self, msg: wire.Message) -> None:
        if self.outbox is not None:
            try:
                self.outbox.send_nowait(msg)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass


@attrs.define(eq=False)
class PendingSession:
    session_id: str
    job: str
    starter: str
    nonce: bytes
    done: trio.Event = attrs.field(factory=trio.Event)
    sock: trio.socket.SocketType | None = None
    failure: str = ""


class Broker:
    def __init__(
        self,
        state_dir: pathlib.Path,
        config: common.PoolConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.config = config
        self.bc = config.broker
        self.clock = clock
        common.private_dir(state_dir / "keys")
        # Job users traverse it to the broker's socket; secrets live in keys/ (0700).
        os.chmod(state_dir, 0o755)  # noqa: S103
        self.signing_key = common.load_or_create_key(state_dir / "keys" / "broker.key")
        self.public_key = wire.public_key_of(self.signing_key)
        common.write_public(state_dir / "broker.pub", self.public_key.hex().encode() + b"\n")
        (state_dir / "trusted_starters").mkdir(mode=0o755, exist_ok=True)
        self.queue = JobQueue(state_dir / "queue.db")
        self.starters: dict[str, StarterConn] = {}
        self.sessions: dict[str, PendingSession] = {}
        self.socket_path = state_dir / "broker.sock"
        self.tcp_port = 0
        self._output_req = 0
        self._superusers = self._resolve_superusers()

    def _resolve_superusers(self) -> set[int]:
        out = {0}
        for name in self.bc.superusers:
            if name.isdigit():
                out.add(int(name))
                continue
            try:
                out.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                log.warning("superuser %r has no passwd entry; ignored", name)
        return out

    def is_superuser(self, uid: int) -> bool:
        return uid in self._superusers

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        await unix.bind(str(self.socket_path))
        # Anyone may connect: who they are comes from SO_PEERCRED on every connection.
        os.chmod(self.socket_path, 0o666)  # noqa: S103
        unix.listen(128)
        tcp_listeners = await trio.open_tcp_listeners(self.bc.port, host=self.bc.host)
        self.tcp_port = tcp_listeners[0].socket.getsockname()[1]
        # Atomically: a starter may be reading it to redial.
        common.write_public(
            self.state_dir / "broker.addr", f"{self.bc.host}:{self.tcp_port}\n".encode()
        )
        log.info("broker listening on %s and %s:%d", self.socket_path, self.bc.host, self.tcp_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, unix, self._handle_client)
            for lst in tcp_listeners:
                nursery.start_soon(self._accept_loop, lst.socket, self._handle_tcp)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.queue.close()

    async def _accept_loop(
        self,
        sock: trio.socket.SocketType,
        handler: Callable[[trio.socket.SocketType], object],
    ) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _addr = await sock.accept()
                except OSError as exc:
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.05)
                    continue
                set_nodelay(conn)
                nursery.start_soon(handler, conn)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ local clients

    async def _handle_client(self, sock: trio.socket.SocketType) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        stream = FramedStream(
            trio.SocketStream(sock),
            wire.Connection(
                wire.Channel.CONTROL, wire.Role.BROKER, wire.Role.CLIENT, self.bc.max_frame
            ),
        )
        try:
            while True:
                try:
                    msg = await stream.receive(within=CLIENT_IDLE)
                except (PeerGone, trio.TooSlowError):
                    return
                if await self._dispatch_client(stream, sock, msg, uid, gid):
                    return
        except wire.RemoteProtocolError as exc:
            log.info("client uid %d sent garbage: %s", uid, exc)
            await self._try_send(stream, wire.Error("protocol", f"protocol error: {exc}"))
        except PeerGone:
            pass
        except Exception:
            # A bug must cost this one connection, never the broker.
            log.exception("internal error serving uid %d", uid)
            await self._try_send(
                stream, wire.Error("internal", "internal broker error; see the broker log")
            )
        finally:
            await stream.aclose()

    async def _try_send(self, stream: FramedStream, msg: wire.Error) -> None:
        await stream.farewell(msg)

    async def _dispatch_client(
        self,
        stream: FramedStream,
        sock: trio.socket.SocketType,
        msg: wire.Message,
        uid: int,
        gid: int,
    ) -> bool:
        if isinstance(msg, wire.Submit):
            await stream.send(self._submit(msg, uid, gid))
        elif isinstance(msg, wire.Query):
            await self._query(stream, msg)
        elif isinstance(msg, wire.Act):
            await stream.send(self._act(msg, uid))
        elif isinstance(msg, wire.Status):
            await stream.send(self._status())
        elif isinstance(msg, wire.Output):
            await stream.send(await self._output(msg, uid))
        elif isinstance(msg, wire.SshRequest):
            await self._ssh(stream, sock, msg, uid)
            return True
        return False

    def _submit(self, msg: wire.Submit, uid: int, gid: int) -> wire.Message:
        spec = msg.spec
        if not 1 <= msg.count <= 100_000:
            return wire.Error("bad_request", "count must be between 1 and 100000")
        if not spec.executable.startswith("/"):
            return wire.Error("bad_request", "the executable must be an absolute path")
        if not spec.initialdir.startswith("/"):
            return wire.Error("bad_request", "the initial directory must be an absolute path")
        if uid == 0:
            return wire.Error("denied", "jobs may not run as root; submit as the job's user")
        cluster = self.queue.submit(spec, msg.count, user_name(uid), uid, gid)
        self.queue.audit(uid, "submit", f"{cluster}", f"{msg.count} job(s)")
        self._schedule()
        return wire.SubmitReply(cluster=cluster, count=msg.count)

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
            owner_uid = int(msg.owner) if msg.owner.isdigit() else _uid_of(msg.owner)
            if owner_uid is None:
                await stream.send(wire.JobList(jobs=(), last=True))
                return
        page: list[wire.JobInfo] = []
        for info in self.queue.infos(ids, states, owner_uid):
            page.append(info)
            if len(page) == PAGE:
                await stream.send(wire.JobList(jobs=tuple(page), last=False))
                page = []
        await stream.send(wire.JobList(jobs=tuple(page), last=True))

    def _authorized(self, row: _queue.Row, uid: int) -> bool:
        return row.owner_uid == uid or self.is_superuser(uid)

    def _act(self, msg: wire.Act, uid: int) -> wire.Message:
        results: list[wire.ActResult] = []
        for text in msg.ids:
            try:
                jid = wire.parse_job_id(text)
            except ValueError as exc:
                results.append(wire.ActResult(text, False, str(exc)))
                continue
            rows = list(self.queue.select(jid, _queue.LIVE_STATES))
            if not rows:
                results.append(wire.ActResult(str(jid), False, f"job {jid} is not in the queue"))
                continue
            for row in rows:
                results.append(self._act_one(row, msg.action, msg.reason, uid))
        self._schedule()
        return wire.ActReply(results=tuple(results))

    def _act_one(self, row: _queue.Row, action: str, reason: str, uid: int) -> wire.ActResult:
        jid = row.id
        if not self._authorized(row, uid):
            self.queue.audit(uid, action, jid, "denied")
            return wire.ActResult(
                jid,
                False,
                f"job {jid} belongs to {row.owner}; only its owner or a queue superuser may "
                f"{action} it",
            )
        who = user_name(uid)
        if action == "rm":
            self.queue.set_state(
                jid, REMOVED, finished=self.clock(), hold_reason=reason or f"removed by {who}"
            )
            self._signal_starter(row, "kill", reason or f"removed by {who}")
        elif action == "hold":
            if row.state == HELD:
                return wire.ActResult(jid, False, f"job {jid} is already held")
            self.queue.set_state(jid, HELD, hold_reason=reason or f"held by {who}")
            self._signal_starter(row, "evict", reason or f"held by {who}")
        elif action == "release":
            if row.state != HELD:
                return wire.ActResult(jid, False, f"job {jid} is not held (it is {row.state})")
            evicting = bool(row.starter and row.starter in self.starters and row.pid)
            if row.debug_hold or evicting:
                # Still on its starter (kept for debugging, or being evicted): it goes back to
                # idle when the starter reports it gone (see _job_report).
                self.queue.update(jid, hold_reason=RELEASING)
                if row.debug_hold:
                    self._signal_starter(row, "evict", f"released by {who}")
                self.queue.audit(uid, action, jid, "ok")
                done = (
                    "debug hold ended; it will run again"
                    if row.debug_hold
                    else "release done (once evicted)"
                )
                return wire.ActResult(jid, True, f"job {jid}: {done}")
            self.queue.set_state(jid, IDLE, hold_reason="", starter="", pid=0)
        elif action in ("suspend", "continue"):
            want_from, want_to = (
                (RUNNING, SUSPENDED) if action == "suspend" else (SUSPENDED, RUNNING)
            )
            if row.state != want_from:
                return wire.ActResult(jid, False, f"job {jid} is {row.state}, not {want_from}")
            if row.starter not in self.starters:
                return wire.ActResult(jid, False, f"the starter of job {jid} is not connected")
            self.queue.set_state(jid, want_to)
            self._signal_starter(row, action, "")
        self.queue.audit(uid, action, jid, "ok")
        return wire.ActResult(jid, True, f"job {jid}: {action} done")

    def _signal_starter(self, row: _queue.Row, action: str, reason: str) -> None:
        conn = self.starters.get(row.starter)
        if conn is None or (row.state not in (RUNNING, SUSPENDED) and not row.debug_hold):
            return
        conn.post(wire.SignalJob(id=row.id, action=action, reason=reason))

    def _status(self) -> wire.Message:
        counts = self.queue.counts()
        starters = []
        for conn in self.starters.values():
            starters.append(
                wire.StarterInfo(
                    starter_id=conn.name,
                    slots=conn.slots,
                    busy=len(conn.jobs),
                    connected=True,
                    jobs=tuple(sorted(conn.jobs)),
                    address=conn.address,
                )
            )
        return wire.StatusReply(
            starters=tuple(starters),
            broker_pid=os.getpid(),
            jobs_idle=counts.get(IDLE, 0),
            jobs_running=counts.get(RUNNING, 0),
            jobs_held=counts.get(HELD, 0),
        )

    async def _output(self, msg: wire.Output, uid: int) -> wire.Message:
        try:
            row = self.queue.get(msg.id)
        except UnknownJob:
            return wire.Error("unknown_job", f"job {msg.id} is not in the queue")
        if not self._authorized(row, uid):
            return wire.Error("denied", f"job {row.id} belongs to {row.owner}")
        if msg.stream not in ("stdout", "stderr"):
            return wire.Error("bad_request", "stream must be stdout or stderr")
        conn = self.starters.get(row.starter)
        # A job in debug hold is still on its starter: its output is there, not in the queue yet.
        if (row.state in (RUNNING, SUSPENDED) or row.debug_hold) and conn is not None:
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
        if not self._authorized(row, uid):
            return wire.Error(
                "denied",
                f"job {job} belongs to {row.owner}; only its owner or a queue superuser may "
                "ssh to it",
            ), row
        if row.state == IDLE:
            return wire.Error(
                "idle",
                f"job {job} is idle (not running yet); use -auto-retry to wait for it to start",
            ), row
        if row.state == HELD and not row.debug_hold:
            return wire.Error(
                "held",
                f"job {job} is held ({row.hold_reason}); release it with 'stj release' first",
            ), row
        if row.state == SUSPENDED:
            return wire.Error("suspended", f"job {job} is suspended; continue it first"), row
        if row.state != RUNNING and not (row.state == HELD and row.debug_hold):
            return wire.Error(
                "finished", f"job {job} is {row.state}; there is nothing to connect to"
            ), row
        if row.starter not in self.starters:
            return wire.Error(
                "unavailable",
                f"the starter running job {job} ({row.starter}) "
                "is not connected; try again shortly",
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
        job = row.id if row is not None else msg.job
        if refusal is not None:
            self.queue.audit(uid, "ssh", job, f"refused: {refusal.code}")
            await stream.send(refusal)
            return
        assert row is not None
        conn = self.starters[row.starter]
        now = int(self.clock())
        session_id = secrets.token_hex(16)
        cap = wire.Capability(
            session_id=session_id,
            job=row.id,
            owner_uid=row.owner_uid,
            requester_uid=uid,
            client_key=msg.client_key.strip(),
            starter_id=conn.name,
            starter_key=conn.key,
            issued_at=now,
            expires_at=now + self.bc.capability_lifetime,
        )
        blob = wire.sign_capability(cap, self.signing_key)
        pending = PendingSession(session_id, row.id, conn.name, secrets.token_bytes(32))
        self.sessions[session_id] = pending
        try:
            conn.post(wire.OpenSession(session_id=session_id, job=row.id, nonce=pending.nonce))
            with trio.move_on_after(self.bc.session_timeout):
                await pending.done.wait()
            if pending.sock is None:
                why = pending.failure or "the starter did not open the session in time"
                self.queue.audit(uid, "ssh", row.id, f"failed: {why}")
                await stream.send(wire.Error("session_failed", f"job {row.id}: {why}"))
                return
            grant = wire.SshGrant(
                session_id=session_id,
                job=row.id,
                capability=blob,
                starter_id=conn.name,
                starter_key=conn.key,
            )
            data = stream.conn.send(grant)
            fds = array.array("i", [pending.sock.fileno()])
            try:
                await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as exc:
                raise PeerGone(f"client went away: {exc}") from exc
            self.queue.audit(uid, "ssh", row.id, f"granted session {session_id}")
        except PeerGone as exc:
            log.info("ssh %s for uid %d: %s", row.id, uid, exc)
        finally:
            self.sessions.pop(session_id, None)
            if pending.sock is not None:
                pending.sock.close()

    # ------------------------------------------------------------------ starters

    async def _handle_tcp(self, sock: trio.socket.SocketType) -> None:
        try:
            frame = await receive_one_frame_exact(sock, self.bc.max_frame, self.bc.frame_timeout)
            first = wire.decode_message(frame[wire.FRAME_HEADER.size :])
        except (PeerGone, wire.RemoteProtocolError, trio.TooSlowError) as exc:
            why = str(exc) or f"no complete frame within {self.bc.frame_timeout} s"
            log.info("dropping TCP peer: %s", why)
            # Say why (best effort), as on the unix socket: it may be a misconfigured starter.
            bye = wire.Connection(wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER)
            with trio.move_on_after(1), contextlib.suppress(OSError):
                await sock.send(bye.farewell(wire.Error("protocol", f"protocol error: {why}")))
            sock.close()
            return
        if isinstance(first, wire.SessionAttach):
            self._attach(sock, first)
            return
        conn = wire.Connection(
            wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER, self.bc.max_frame
        )
        stream = FramedStream(trio.SocketStream(sock), conn)
        conn.receive_data(frame)
        # except*: the session's reader runs in a nursery body, which wraps what it raises.
        try:
            hello = await stream.receive(within=self.bc.frame_timeout)
            assert isinstance(hello, wire.StarterHello)
            await self._starter_session(stream, hello)
        except* wire.RemoteProtocolError as group:
            bad = group.exceptions[0]
            log.info("starter sent garbage: %s", bad)
            await self._try_send(stream, wire.Error("protocol", f"protocol error: {bad}"))
        except* (PeerGone, trio.TooSlowError) as group:
            log.info("starter connection ended: %s", group.exceptions[0])
        except* Exception:
            log.exception("internal error on a starter connection")
        finally:
            await stream.aclose()

    def _attach(self, sock: trio.socket.SocketType, msg: wire.SessionAttach) -> None:
        pending = self.sessions.get(msg.session_id)
        conn = self.starters.get(msg.starter_id)
        ok = (
            pending is not None
            and conn is not None
            and pending.starter == msg.starter_id
            and pending.sock is None
            and wire.verify(
                conn.key,
                wire.attach_statement(msg.session_id, msg.starter_id, pending.nonce),
                msg.signature,
            )
        )
        if not ok or pending is None:
            log.warning("rejected session attach for %r from %r", msg.session_id, msg.starter_id)
            sock.close()
            return
        pending.sock = sock
        pending.done.set()

    def _trusted(self, key: bytes) -> bool:
        trust = self.state_dir / "trusted_starters"
        for path in trust.glob("*.pub"):
            try:
                if wire.same_secret(common.read_public_key(path), key):
                    return True
            except (OSError, ValueError):
                continue
        return False

    async def _starter_session(self, stream: FramedStream, hello: wire.StarterHello) -> None:
        name = hello.starter_id
        handshake = wire.BrokerHandshake(self.signing_key, self._trusted)
        try:
            await stream.send(handshake.on_hello(hello))
            auth = await stream.receive(within=self.bc.frame_timeout)
            welcome, keys = handshake.on_auth(auth)
        except wire.HandshakeError as exc:
            log.warning("starter %r (key %s) refused: %s", name, hello.starter_key.hex(), exc)
            await stream.send(exc.error())
            return
        old = self.starters.get(name)
        if old is not None:
            log.info("starter %s reconnected; dropping its old connection", name)
            await old.stream.aclose()
        await stream.send(welcome)
        stream.conn.start_encryption(send_key=keys.send, receive_key=keys.receive)
        assert isinstance(stream.stream, trio.SocketStream)
        peer = stream.stream.socket.getpeername()
        conn = StarterConn(
            name=name,
            key=hello.starter_key,
            slots=max(1, hello.slots),
            stream=stream,
            address=f"{peer[0]}:{peer[1]}",
        )
        send, recv = trio.open_memory_channel[wire.Message](math.inf)
        conn.outbox = send
        self.starters[name] = conn
        log.info("starter %s connected with %d slots", name, conn.slots)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._starter_writer, conn, recv)
                while True:
                    # Starters ping every PING_INTERVAL: silence this long means it is gone.
                    msg = await stream.receive(within=STARTER_SILENCE)
                    await self._from_starter(conn, msg)
        finally:
            send.close()
            if self.starters.get(name) is conn:
                del self.starters[name]
                log.info("starter %s disconnected", name)

    async def _starter_writer(
        self, conn: StarterConn, recv: trio.MemoryReceiveChannel[wire.Message]
    ) -> None:
        async for msg in recv:
            await conn.stream.send(msg)

    async def _from_starter(self, conn: StarterConn, msg: wire.Message) -> None:
        if isinstance(msg, wire.StarterSync):
            self._sync(conn, msg.jobs)
        elif isinstance(msg, wire.JobUpdate):
            self._job_report(conn, msg.report, msg.sessions)
            conn.post(wire.Ack(ids=(msg.report.id,)))
            self._schedule()
        elif isinstance(msg, wire.SessionFailed):
            pending = self.sessions.get(msg.session_id)
            if pending is not None and pending.starter == conn.name:
                pending.failure = msg.message
                pending.done.set()
        elif isinstance(msg, wire.OutputData):
            ch = conn.pending_output.get(msg.request)
            if ch is not None:
                ch.send_nowait(msg)

    def _sync(self, conn: StarterConn, reports: tuple[wire.JobReport, ...]) -> None:
        """Reconcile the queue with what a (re)connecting starter says it has."""
        known = {r.id for r in reports}
        for row in self.queue.on_starter(conn.name):
            if row.id not in known and row.debug_hold:
                self.queue.set_state(
                    row.id,
                    HELD,
                    starter="",
                    pid=0,
                    debug_hold=0,
                    hold_reason=row.hold_reason + " (its starter lost it)",
                )
            elif row.id not in known:
                # The starter does not have it: it never got it, or lost it with a restart.
                log.warning("job %s is not on starter %s any more; back to idle", row.id, conn.name)
                self.queue.set_state(row.id, IDLE, starter="", pid=0)
        for report in reports:
            self._job_report(conn, report, 0)
        conn.post(wire.Ack(ids=tuple(sorted(known))))
        self._schedule()

    def _job_report(self, conn: StarterConn, r: wire.JobReport, sessions: int) -> None:
        try:
            row = self.queue.get(r.id)
        except UnknownJob:
            log.warning("starter %s reports unknown job %s; killing it", conn.name, r.id)
            if r.running:
                conn.post(wire.SignalJob(id=r.id, action="kill", reason="unknown to the broker"))
            return
        if row.starter and row.starter != conn.name:
            log.warning("starter %s reports job %s which runs on %s", conn.name, r.id, row.starter)
            return
        if r.running and r.debug_hold and row.state in (RUNNING, SUSPENDED, HELD):
            conn.jobs.add(r.id)  # the slot stays taken while the job is kept for debugging
            self.queue.set_state(
                r.id,
                HELD,
                hold_reason=row.hold_reason if row.debug_hold else r.reason,
                debug_hold=1,
                pid=r.pid,
                scratch=r.scratch,
                starter=conn.name,
                exit_code=r.exit_code,
                exit_signal=r.exit_signal,
                sessions=sessions,
            )
            return
        if r.running:
            conn.jobs.add(r.id)
            if row.state in (RUNNING, SUSPENDED):
                self.queue.update(
                    r.id,
                    pid=r.pid,
                    scratch=r.scratch,
                    starter=conn.name,
                    started=r.started or row.started,
                    sessions=sessions,
                )
            else:
                # Removed or held while the starter was away: finish the job off now.
                action = "kill" if row.state == REMOVED else "evict"
                conn.post(wire.SignalJob(id=r.id, action=action, reason=row.hold_reason))
            return
        conn.jobs.discard(r.id)
        fields: dict[str, object] = {
            "finished": r.finished or self.clock(),
            "exit_code": r.exit_code,
            "exit_signal": r.exit_signal,
            "stdout_tail": r.stdout_tail,
            "stderr_tail": r.stderr_tail,
            "pid": 0,
            "sessions": 0,
            "debug_hold": 0,
        }
        if row.state in (RUNNING, SUSPENDED):
            spec = row.job_spec()
            failed = r.reason.startswith("could not start")
            if failed or (spec.hold_on_failure and (r.exit_code or r.exit_signal)):
                status = r.exit_code if r.exit_code is not None else f"signal {r.exit_signal}"
                why = r.reason or f"exited with {status}"
                self.queue.set_state(r.id, HELD, hold_reason=why, **fields)
            else:
                self.queue.set_state(r.id, _queue.COMPLETED, **fields)
        elif row.state == HELD and row.hold_reason == RELEASING:
            self.queue.set_state(
                r.id,
                IDLE,
                hold_reason="",
                starter="",
                pid=0,
                sessions=0,
                debug_hold=0,
                exit_code=None,
                exit_signal=None,
            )
        elif row.state == HELD:
            self.queue.set_state(
                r.id,
                HELD,
                starter="",
                pid=0,
                sessions=0,
                debug_hold=0,
                exit_code=r.exit_code,
                exit_signal=r.exit_signal,
                stdout_tail=r.stdout_tail,
                stderr_tail=r.stderr_tail,
            )
        else:
            self.queue.set_state(r.id, row.state, **fields)

    def _schedule(self) -> None:
        """Match idle jobs to free slots, oldest job first."""
        for conn in list(self.starters.values()):
            free = conn.slots - len(conn.jobs)
            if free <= 0:
                continue
            for row in self.queue.next_idle(free):
                self.queue.set_state(row.id, RUNNING, starter=conn.name, started=self.clock())
                conn.jobs.add(row.id)
                run = wire.JobRun(
                    id=row.id,
                    uid=row.owner_uid,
                    gid=row.owner_gid,
                    owner=row.owner,
                    spec=row.job_spec(),
                )
                conn.post(wire.RunJob(job=run))


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None
