"""Spare attach connections: dialled and authenticated ahead of the sessions that use them.

A session's attach connection (``_session.run_session``) is a new TCP connection and a full
TLS 1.3 handshake with certificates both ways; dialled when the session is granted, it sits on
the client's path. The starter keeps ``[starter] spare_attach`` of them ready instead. Each is
dialled exactly as a session connection is, says ``attach_standby`` (the broker then holds it,
see ``broker/_connections.py``) and waits; the next session takes one and sends its
``session_attach`` on it; a replacement is dialled in the background ``REPLACE_AFTER`` later,
once that session is (most likely) past the starter's and the broker's part of its set-up.

The broker sends nothing on a waiting spare (its TLS sends no session tickets): a byte or the
end of the stream on one means the broker closed it (restart, ``standby_lifetime``, refusal),
and it is dropped. Spares are replaced after ``spare_refresh`` seconds, which must stay under
the broker's ``standby_lifetime``, and all are closed when the control channel goes down.

Must never: hand one spare to two sessions; hand out a spare known to be closed; dial in a
tight loop when the broker refuses spares; outlive the control channel it was made under.
"""

from __future__ import annotations

import logging
import select
import ssl
from typing import TYPE_CHECKING

import attrs
import trio

from ssh_to_job import wire
from ssh_to_job.transport import PeerGone

if TYPE_CHECKING:
    from ._daemon import Starter

log = logging.getLogger("stj.starter")

TlsStream = trio.SSLStream[trio.SocketStream]

#: Seconds between a spare's use and its replacement's dial. A TLS handshake costs the starter
#: and the broker a few ms of CPU each, on their one thread: dialled at once it would compete
#: with the very session that took the spare (the broker passing its socket on, the starter
#: setting up sshd); measured on 2 cores, it gave back most of what the spare saved.
REPLACE_AFTER = 0.1
#: Seconds before the first redial of a spare the broker closed; doubles up to ``_RETRY_MAX``.
_RETRY_MIN = 0.5
_RETRY_MAX = 30.0

DIAL_ERRORS = (
    OSError,
    PeerGone,
    ssl.SSLError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


@attrs.define(eq=False)
class Spare:
    """One dialled, authenticated connection that has said ``attach_standby``."""

    tls: TlsStream
    #: Its codec, in the ``standby`` state: the session's ``session_attach`` goes through it.
    conn: wire.Connection
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    taken: bool = False

    @property
    def sock(self) -> trio.socket.SocketType:
        return self.tls.transport_stream.socket

    def closed_by_peer(self) -> bool:
        """Whether the broker has sent anything (an error) or hung up: either ends a spare."""
        poll = select.poll()
        poll.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return bool(poll.poll(0))

    def close(self) -> None:
        self.sock.close()


async def dial_spare(starter: Starter) -> Spare:
    """A new attach connection to the broker that says ``attach_standby`` and nothing more."""
    tls = await starter.connect_broker()
    try:
        conn = wire.Connection(wire.Channel.ATTACH, wire.Role.STARTER, wire.Role.BROKER)
        with trio.fail_after(starter.config.starter.handshake_timeout):
            await tls.send_all(conn.send(wire.AttachStandby(starter_id=starter.name)))
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return Spare(tls, conn)


class Spares:
    """The starter's spare attach connections, kept while its control channel is up."""

    def __init__(self, starter: Starter) -> None:
        cfg = starter.config.starter
        self.starter = starter
        self.size = cfg.spare_attach
        self.refresh = cfg.spare_refresh
        self._ready: list[Spare] = []

    @property
    def ready(self) -> int:
        return len(self._ready)

    def take(self) -> Spare | None:
        """A live spare for a session (it is the session's from now on), or None."""
        while self._ready:
            # The newest: the furthest from the broker's standby_lifetime.
            spare = self._ready.pop()
            spare.taken = True
            # Cancelling releases the keeper's wait on the socket at once (trio aborts the
            # wait synchronously), so the session can read it; the keeper dials a successor.
            spare.scope.cancel()
            if spare.closed_by_peer():
                log.debug("a spare attach connection was closed by the broker; not used")
                spare.close()
                continue
            return spare
        return None

    async def run(self) -> None:
        """Keep ``size`` spares until cancelled (with the control channel); then close them."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.size):
                    nursery.start_soon(self._keep_one)
        finally:
            for spare in self._ready:
                spare.close()
            self._ready.clear()

    async def _keep_one(self) -> None:
        """One slot of the pool: dial a spare, hold it until taken, aged or closed; again."""
        retry = _RETRY_MIN
        while True:
            try:
                spare = await dial_spare(self.starter)
            except DIAL_ERRORS as exc:
                log.info("could not dial a spare attach connection: %s", exc)
                await trio.sleep(retry)
                retry = min(retry * 2, _RETRY_MAX)
                continue
            self._ready.append(spare)
            born = trio.current_time()
            with spare.scope:
                spare.scope.deadline = trio.current_time() + self.refresh
                try:
                    await trio.lowlevel.wait_readable(spare.sock)
                except trio.ClosedResourceError:
                    pass
            if spare.taken:
                retry = _RETRY_MIN
                await trio.sleep(REPLACE_AFTER)
                continue
            self._ready.remove(spare)
            spare.close()
            if spare.scope.cancelled_caught:
                log.debug("replacing a spare attach connection after %g s", self.refresh)
                retry = _RETRY_MIN
                continue
            # Nothing is ever due on a waiting spare: the broker closed or refused it.
            lived = trio.current_time() - born
            if lived >= _RETRY_MAX:
                # Not a refusal: it was held, then closed (a broker restart, or a broker
                # standby_lifetime shorter than our spare_refresh).
                log.warning(
                    "the broker closed a spare attach connection after %.0f s; is [starter] "
                    "spare_refresh (%g s) under the broker's standby_lifetime?",
                    lived,
                    self.refresh,
                )
                retry = _RETRY_MIN
            else:
                log.info("the broker closed a spare attach connection; redialling in %g s", retry)
            await trio.sleep(retry)
            retry = min(retry * 2, _RETRY_MAX)
