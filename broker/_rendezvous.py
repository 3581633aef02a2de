"""The session rendezvous: a client's ssh request meets the starter's session connection.

The broker mints a capability, asks the job's starter to dial a new connection
(``open_session``), and waits for that connection's ``session_attach``: a TLS connection whose
certificate names the starter that was asked, for a session that is waiting. Both sides then
leave TLS (close_notify both ways) and the bare socket is passed to the waiting local client as
a file descriptor (SCM_RIGHTS) together with the grant; the broker never reads a byte past the
attach frame and keeps no copy of the socket.
"""

from __future__ import annotations

import array
import logging
import secrets
import socket
from collections.abc import Callable

import attrs
import trio

from ssh_to_job import wire
from ssh_to_job.transport import FramedStream, PeerGone

from ._jobs import StarterConn

log = logging.getLogger("stj.broker")


@attrs.define(eq=False)
class PendingSession:
    session_id: str
    job: str
    starter: str
    done: trio.Event = attrs.field(factory=trio.Event)
    sock: trio.socket.SocketType | None = None
    failure: str = ""


class Rendezvous:
    def __init__(
        self,
        signing_key: bytes,
        capability_lifetime: int,
        session_timeout: float,
        starter_key: Callable[[str], bytes | None],
        clock: Callable[[], float],
    ) -> None:
        self.signing_key = signing_key
        self.capability_lifetime = capability_lifetime
        self.session_timeout = session_timeout
        #: The key of the connected starter of that name, or None.
        self.starter_key = starter_key
        self.clock = clock
        self.sessions: dict[str, PendingSession] = {}

    def capability(
        self, conn: StarterConn, job: str, owner_uid: int, uid: int, key: str
    ) -> tuple[str, bytes]:
        """A fresh session id and its signed capability (valid ``capability_lifetime`` s)."""
        now = int(self.clock())
        session_id = secrets.token_hex(16)
        cap = wire.Capability(
            session_id=session_id,
            job=job,
            owner_uid=owner_uid,
            requester_uid=uid,
            client_key=key.strip(),
            starter_id=conn.name,
            starter_key=conn.key,
            issued_at=now,
            expires_at=now + self.capability_lifetime,
        )
        return session_id, wire.sign_capability(cap, self.signing_key)

    async def open(
        self, conn: StarterConn, job: str, session_id: str
    ) -> tuple[trio.socket.SocketType | None, str]:
        """Ask ``conn`` for a session connection: (its socket or None, why not).

        The caller owns the socket it gets and must close it."""
        pending = PendingSession(session_id, job, conn.name)
        self.sessions[session_id] = pending
        try:
            conn.post(wire.OpenSession(session_id=session_id, job=job))
            with trio.move_on_after(self.session_timeout):
                await pending.done.wait()
            sock, pending.sock = pending.sock, None
            why = pending.failure or "the starter did not open the session in time"
            return sock, "" if sock is not None else why
        finally:
            self.sessions.pop(session_id, None)
            if pending.sock is not None:  # attached after we stopped waiting
                pending.sock.close()

    def expects(self, msg: wire.SessionAttach, starter: str) -> bool:
        """Whether a session connection from (certified) ``starter`` for ``msg`` is awaited."""
        pending = self.sessions.get(msg.session_id)
        return (
            pending is not None
            and self.starter_key(starter) is not None
            and pending.starter == starter
            and pending.sock is None
            and not pending.done.is_set()
        )

    def attach(self, sock: trio.socket.SocketType, msg: wire.SessionAttach, starter: str) -> None:
        """A session connection arrived out of TLS: hand it to the waiting request, or close it."""
        pending = self.sessions.get(msg.session_id)
        if pending is None or not self.expects(msg, starter):
            log.warning("rejected session attach for %r from %r", msg.session_id, starter)
            sock.close()
            return
        pending.sock = sock
        pending.done.set()

    def drop_starter(self, starter: str) -> int:
        """Fail every session still waiting on ``starter`` (revoked); how many there were."""
        n = 0
        for pending in self.sessions.values():
            if pending.starter == starter and not pending.done.is_set():
                pending.failure = f"starter {starter} was revoked"
                pending.done.set()
                n += 1
        return n

    def failed(self, starter: str, msg: wire.SessionFailed) -> None:
        pending = self.sessions.get(msg.session_id)
        if pending is not None and pending.starter == starter:
            pending.failure = msg.message
            pending.done.set()


async def pass_socket(
    stream: FramedStream, client: trio.socket.SocketType, grant: wire.SshGrant, fd: int
) -> None:
    """Send ``grant`` with the session socket ``fd`` attached (SCM_RIGHTS) to a local client."""
    data = stream.conn.send(grant)
    fds = array.array("i", [fd])
    try:
        await client.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    except OSError as exc:
        raise PeerGone(f"client went away: {exc}") from exc
