"""One ssh request, authorised and opened: the step every session of the broker goes through.

Whoever asks (a local client on the unix socket, identified by SO_PEERCRED, or a remote one on
the TLS port, identified by its registered key: ``_relay``) and whatever it names (a job of
our queue, ``32.0``, or of the pool's Slurm cluster, ``slurm:1234``: ``_slurm``), the request
takes the same path here:

1. the backend authorises it and says where it goes (``Route``) or why not (``Refused``):
   the job's owner, its starter, the host names the session's host certificate carries;
2. the job's starter must be connected (a reconnecting one is waited for briefly);
3. a capability is minted for that job, that requester and that client key (single use,
   bound to the starter: ``Rendezvous.capability``);
4. the starter is asked for a session connection (``Rendezvous.open``).

Each refusal and failure is audited and recorded here, once; the caller hands the session
socket over (SCM_RIGHTS locally, the kernel relay remotely) and then calls ``granted``.

Must never: open a session the backend did not authorise, or mint a capability for another
job, key or starter than the one authorised.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import attrs
import trio

from ssh_to_job import wire

from ._jobs import StarterConn, user_name

if TYPE_CHECKING:
    from ._connections import Connections


@attrs.frozen
class Caller:
    """Who asks: a uid, and for a remote client its key's fingerprint and its address."""

    uid: int
    fingerprint: str = ""
    addr: str = ""

    @property
    def remote(self) -> bool:
        return bool(self.addr)


@attrs.frozen
class Route:
    """An authorised request: the job as its starter knows it, and where it runs."""

    #: The job id the starter gets and the records carry (``32.0``, ``slurm:1234``).
    job: str
    owner_uid: int
    starter: str
    #: The host names the session's OpenSSH host certificate is issued for (``job-*``).
    host_names: tuple[str, ...]
    #: The sentence for a person when that starter is not connected.
    missing: str
    #: Said in the audit log after "granted session ID" (the node, for Slurm).
    where: str = ""


@attrs.frozen
class Refused:
    """A refused request: the error for the client, and what the records say."""

    error: wire.Error
    job: str
    owner_uid: int = -1
    starter: str = ""


@attrs.define(eq=False)
class Opened:
    """A session the starter opened; the caller owns ``session`` and must close it."""

    session_id: str
    route: Route
    starter: StarterConn
    capability: bytes
    session: trio.socket.SocketType

    def grant(self) -> wire.SshGrant:
        return wire.SshGrant(
            session_id=self.session_id,
            job=self.route.job,
            capability=self.capability,
            starter_id=self.starter.name,
            starter_key=self.starter.key,
        )


def queue_host_names(job: str) -> tuple[str, ...]:
    """``job-32.0``, and ``job-32`` as well for proc 0 (``ssh job-32``)."""
    cluster, _, proc = job.partition(".")
    return (f"job-{job}", *([f"job-{cluster}"] if proc == "0" else []))


def _queue_route(conns: Connections, msg: wire.SshRequest, caller: Caller) -> Route | Refused:
    """A job of our own queue: its owner or a queue superuser, running (or debug-held)."""
    from ._relay import source_refusal

    refusal, row = conns._ssh_refusal(msg, caller.uid)
    if refusal is None and row is not None and caller.remote:
        refusal = source_refusal(row, caller.addr)
    if refusal is not None or row is None:
        assert refusal is not None
        if row is None:
            return Refused(refusal, msg.job[:64])
        return Refused(refusal, row.id, row.owner_uid)
    # The starter's name is internal to the pool: a remote client is not told it.
    named = "" if caller.remote else f" ({row.starter})"
    return Route(
        job=row.id,
        owner_uid=row.owner_uid,
        starter=row.starter,
        host_names=queue_host_names(row.id),
        missing=f"the starter running job {row.id}{named} is not connected; try again shortly",
    )


async def authorise_and_open(
    conns: Connections, msg: wire.SshRequest, caller: Caller
) -> Opened | wire.Error:
    """Authorise ``msg`` for ``caller`` and open its session, or say why not (recorded)."""
    if msg.job.startswith(("slurm:", "slurm-")):
        from . import _slurm

        # The id goes to the Slurm backend as the client wrote it: it parses its own names.
        route = await _slurm.route(conns, msg, caller.uid)
    else:
        route = _queue_route(conns, msg, caller)
    starter = None
    if isinstance(route, Route):
        starter = await conns.jobs.wait_for_starter(route.starter, conns.bc.starter_wait)
        if starter is None:
            route = Refused(
                wire.Error("unavailable", route.missing), route.job, route.owner_uid, route.starter
            )
    if isinstance(route, Refused) or starter is None:
        assert isinstance(route, Refused)
        conns.queue.audit(caller.uid, "ssh", route.job, f"refused: {route.error.code}")
        _record(conns, caller, secrets.token_hex(16), route, "refused", route.error.message)
        return route.error
    session_id, blob = conns.rendezvous.capability(
        starter, route.job, route.owner_uid, caller.uid, msg.client_key
    )
    # Read by the attach (Connections._session_cert) to certify the session's host key.
    conns.cert_names[session_id] = route.host_names
    try:
        session, why = await conns.rendezvous.open(starter, route.job, session_id)
    finally:
        conns.cert_names.pop(session_id, None)
    if session is None:
        conns.queue.audit(caller.uid, "ssh", route.job, f"failed: {why}")
        _record(conns, caller, session_id, route, "failed", why, starter.name)
        return wire.Error("session_failed", f"job {route.job}: {why}")
    return Opened(session_id, route, starter, blob, session)


def granted(conns: Connections, opened: Opened, caller: Caller) -> None:
    """The grant went out: audit and record it."""
    what = f"session {opened.session_id}{opened.route.where}"
    if caller.remote:
        what = f"remote {what} to {caller.addr}"
    conns.queue.audit(caller.uid, "ssh", opened.route.job, f"granted {what}")
    _record(conns, caller, opened.session_id, opened.route, "granted", "", opened.starter.name)


def _record(
    conns: Connections,
    caller: Caller,
    session_id: str,
    route: Route | Refused,
    outcome: str,
    reason: str,
    starter: str = "",
) -> None:
    """One durable session record (stj history --sessions), whatever the outcome."""
    conns.queue.record_session(
        session_id,
        route.job,
        caller.uid,
        user_name(caller.uid),
        route.owner_uid,
        outcome,
        reason,
        starter or (route.starter if isinstance(route, Refused) else ""),
        conns.bc.session_record_days,
        client_key=caller.fingerprint,
        client_addr=caller.addr,
    )
