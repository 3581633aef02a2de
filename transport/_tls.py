"""TLS 1.3 for the control channels: contexts, accept and connect with deadlines, peer identity.

Everything is the standard library's ``ssl`` driven by ``trio.SSLStream``, so the broker's port
speaks plain TLS 1.3 that ``openssl s_client`` and the usual tools can inspect. Both sides
authenticate with certificates of the pool's own CA (``common.BrokerPki``): the server context
requires a client certificate (optionally: only enrolment may go without one), the client
context verifies the server against the pool CA file and nothing else (no system roots).

Beyond the chain, every connection checks the peer's ``stj://<pool-id>/<role>/<name>`` URI SAN
(``wire.PeerName``): the pool id must be ours (a certificate of another pool never works here,
even under a shared CA), the role must be one the caller accepts (a starter certificate cannot
pose as the broker: the extended key usages make OpenSSL refuse that too) and the serial must
not be revoked. The host name is not checked by default: the CA is private to the pool and the
broker's certificate is found by its role and pool id, so a broker reached through an address
missing from its SANs (NAT, a new interface) still works; ``connect_tls(check_hostname=True)``
adds the usual check for admins who want it.

Bad input on the port costs only its own connection: the handshake has a deadline
(``HANDSHAKE_TIMEOUT``), every failure is a ``TlsRefused`` for that connection, and
``serve_tls`` runs each handshake in its own task, so a peer that sends garbage or never
finishes its handshake never delays another. Session tickets are off: every connection is a
full handshake, so every connection's certificate is checked against the current revocation
list and validity dates.

This module imports only ``wire``, trio and the standard library, like the rest of transport.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import trio

from ssh_to_job import wire

from ._stream import PeerGone, set_nodelay

#: Seconds a peer has from TCP accept (or connect) to a finished TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between two looks at the revocation list for one live connection.
REVOCATION_INTERVAL = 1.0

log = logging.getLogger("ssh_to_job.tls")

PathLike = str | os.PathLike[str]


class TlsRefused(PeerGone):
    """This connection's TLS handshake failed or its peer is not acceptable; ``reason`` says why.

    A ``PeerGone``: code above handles it as the end of that one connection.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerRevoked(PeerGone):
    """The peer's certificate was revoked while its connection was open (it has been cut)."""


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """Who is at the other end, from its verified certificate."""

    peer: wire.PeerName
    serial: int

    @property
    def pool_id(self) -> str:
        return self.peer.pool_id

    @property
    def role(self) -> str:
        return self.peer.role

    @property
    def name(self) -> str:
        return self.peer.name

    def __str__(self) -> str:
        return f"{self.peer.uri} (serial {self.serial:x})"


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(
    cert_file: PathLike, key_file: PathLike, ca_file: PathLike, *, allow_enrollment: bool = False
) -> ssl.SSLContext:
    """The broker's context: TLS 1.3 only, its certificate, client certificates from the pool CA.

    ``allow_enrollment`` lets a client connect without a certificate (a certificate that *is*
    presented must still verify); ``accept_tls`` then returns no identity, and such a
    connection may carry nothing but the enrolment exchange (``common.BrokerEnrollment``).
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL if allow_enrollment else ssl.CERT_REQUIRED
    # No resumption: each connection presents (and we check) its certificate afresh. And no
    # NewSessionTicket after the handshake, so a session connection that leaves TLS
    # (``SSLStream.unwrap`` after its attach frame, then raw SSH) has no TLS bytes left over.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(
    ca_file: PathLike,
    cert_file: PathLike | None = None,
    key_file: PathLike | None = None,
    *,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    """A starter's or client's context: TLS 1.3 only, the server verified against the pool CA.

    Only ``ca_file`` is trusted (never the system's roots). With ``cert_file``/``key_file`` it
    presents its own certificate (every connection but enrolment).
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def enrollment_context() -> ssl.SSLContext:
    """The joining starter's context: TLS 1.3, the server's certificate *not* verified here.

    There is no CA file yet: ``common.StarterEnrollment.on_ca`` verifies the broker's
    certificate (``peer_certificate_der``) against the CA the join token pins, and nothing
    secret is sent before it did. TLS still proves the broker holds that certificate's key.
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_certificate_der(stream: trio.SSLStream[Any]) -> bytes | None:
    """The peer's certificate as DER (verified or not), None if it sent none."""
    der: bytes | None = stream.getpeercert(binary_form=True)
    return der


def peer_identity(stream: trio.SSLStream[Any], pool_id: str) -> PeerIdentity | None:
    """The identity in the peer's *verified* certificate; None if it presented none.

    ``TlsRefused`` if the certificate names no single ``stj://`` identity or another pool.
    """
    cert = stream.getpeercert()
    if not cert:
        return None
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI" and v.startswith("stj:")]
    if len(uris) != 1:
        raise TlsRefused(f"peer certificate names {len(uris)} stj:// identities, not one")
    try:
        name = wire.parse_peer_uri(uris[0])
        serial = int(str(cert["serialNumber"]), 16)
    except (ValueError, KeyError) as exc:
        raise TlsRefused(f"peer certificate identity is malformed: {exc}") from None
    if name.pool_id != pool_id:
        raise TlsRefused(f"peer {name.uri} belongs to pool {name.pool_id!r}, not {pool_id!r}")
    return PeerIdentity(name, serial)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: certificate not accepted: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {cause.reason or cause}"
    if cause is not None:
        return f"TLS handshake failed: {cause}"
    return f"TLS handshake failed: {exc or type(exc).__name__}"


_HANDSHAKE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


def _check_peer(
    ident: PeerIdentity | None,
    roles: Collection[str],
    is_revoked: Callable[[int], bool],
    allow_anonymous: bool,
) -> None:
    if ident is None:
        if not allow_anonymous:
            raise TlsRefused("peer presented no certificate")
        return
    if ident.role not in roles:
        raise TlsRefused(f"peer {ident} is a {ident.role}; expected {' or '.join(sorted(roles))}")
    try:
        revoked = is_revoked(ident.serial)
    except Exception as exc:
        # Fail closed: an unreadable revocation list refuses everyone, and says so, rather
        # than letting a revoked starter in (or ending the whole server).
        raise TlsRefused(f"peer {ident}: revocation list unusable: {exc}") from exc
    if revoked:
        raise TlsRefused(f"peer {ident}: certificate revoked")


async def _handshake(stream: trio.SSLStream[Any], within: float, who: str) -> None:
    try:
        with trio.fail_after(within):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise TlsRefused(f"no TLS handshake from {who} within {within:g} s") from None
    except _HANDSHAKE_ERRORS as exc:
        raise TlsRefused(_reason(exc)) from exc


async def accept_tls(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    pool_id: str,
    roles: Collection[str],
    is_revoked: Callable[[int], bool] = lambda _serial: False,
    allow_anonymous: bool = False,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    farewell: Callable[[TlsRefused], bytes] | None = None,
) -> tuple[trio.SSLStream[Any], PeerIdentity | None]:
    """Server side of one accepted connection: a handshake within the deadline, the peer checked.

    Returns the stream and the peer's identity (None only with ``allow_anonymous``, for
    enrolment). On any refusal the stream is closed and ``TlsRefused`` raised; if the handshake
    had completed, ``farewell(exc)`` (e.g. a framed ``wire.Error``) is sent first, best effort,
    so a refused starter can say why ("certificate revoked").
    """
    ssl_stream = trio.SSLStream(stream, context, server_side=True)
    shaken = False
    try:
        await _handshake(ssl_stream, handshake_timeout, "client")
        shaken = True
        ident = peer_identity(ssl_stream, pool_id)
        _check_peer(ident, roles, is_revoked, allow_anonymous)
    except TlsRefused as exc:
        if shaken and farewell is not None:
            with contextlib.suppress(*_HANDSHAKE_ERRORS), trio.move_on_after(1):
                await ssl_stream.send_all(farewell(exc))
        await trio.aclose_forcefully(ssl_stream)
        raise
    return ssl_stream, ident


async def connect_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    pool_id: str | None,
    role: str = wire.ROLE_BROKER,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[trio.SSLStream[Any], PeerIdentity | None]:
    """Dial ``host:port`` and finish a TLS handshake within ``handshake_timeout``; check the server.

    With ``pool_id`` the server must present a verified ``role`` certificate of that pool
    (its identity is returned). ``pool_id=None`` is for enrolment only (``enrollment_context``):
    nothing is checked here and the identity is None; the caller verifies
    ``peer_certificate_der`` itself before it says anything secret.

    ``OSError`` if the TCP connection fails or takes longer than the deadline (``TimeoutError``;
    the caller's reconnect loop backs off), ``TlsRefused`` if the handshake or the check fails.
    With TLS 1.3 the server judges *our* certificate after this returns: a refusal shows up on
    the first read (``PeerBroken`` through ``FramedStream``).
    """
    tcp: trio.SocketStream | None = None
    with trio.move_on_after(handshake_timeout):
        tcp = await trio.open_tcp_stream(host, port)
    if tcp is None:
        # An OSError like every other failure to connect, so reconnect loops treat it alike.
        raise TimeoutError(f"no TCP connection to {host}:{port} within {handshake_timeout:g} s")
    set_nodelay(tcp.socket)
    # The host name goes out as SNI (for DNS names) and, with check_hostname, is verified.
    ssl_stream = trio.SSLStream(tcp, context, server_hostname=host)
    try:
        await _handshake(ssl_stream, handshake_timeout, "server")
        if pool_id is None:
            return ssl_stream, None
        ident = peer_identity(ssl_stream, pool_id)
        if ident is None:
            raise TlsRefused("server presented no certificate")
        _check_peer(ident, (role,), lambda _serial: False, False)
    except BaseException:
        # Refused, or cancelled mid-handshake (a spare attach connection dialled as its
        # starter's control channel goes down): the socket is closed either way.
        await trio.aclose_forcefully(ssl_stream)
        raise
    return ssl_stream, ident


ConnectionHandler = Callable[[trio.SSLStream[Any], PeerIdentity | None], Awaitable[None]]


async def serve_tls(
    handler: ConnectionHandler,
    port: int,
    context: ssl.SSLContext,
    *,
    pool_id: str,
    roles: Collection[str],
    host: str | None = None,
    is_revoked: Callable[[int], bool] = lambda _serial: False,
    allow_anonymous: bool = False,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    farewell: Callable[[TlsRefused], bytes] | None = None,
    max_handshakes: int = 0,
    max_handshakes_per_peer: int = 0,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port``; run ``handler(stream, identity)`` for each accepted peer.

    Each connection's handshake runs in its own task under its own deadline, so garbage, a
    foreign certificate or a stalled handshake costs that connection alone (logged at INFO with
    the peer's address). ``task_status.started`` gets the listeners (their port, when 0 was
    asked). ``handler`` owns the stream and must handle its own errors: like
    ``trio.serve_listeners``, an exception escaping it ends the server.

    ``max_handshakes`` (in all) and ``max_handshakes_per_peer`` (per peer address) cap the
    connections still in their handshake (0: no cap): past either, a new connection is closed
    at once, so a flood of stalled handshakes holds a bounded number of sockets.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    pending: dict[str, int] = {}

    async def one(stream: trio.SocketStream) -> None:
        set_nodelay(stream.socket)
        try:
            where = stream.socket.getpeername()
        except OSError:
            where = "?"
        peer = str(where[0]) if isinstance(where, tuple) else str(where)
        total = sum(pending.values())
        if (max_handshakes and total >= max_handshakes) or (
            max_handshakes_per_peer and pending.get(peer, 0) >= max_handshakes_per_peer
        ):
            log.info("refused connection from %s: too many handshakes in progress", where)
            await trio.aclose_forcefully(stream)
            return
        pending[peer] = pending.get(peer, 0) + 1
        try:
            accepted = await _accept_one(stream, where)
        finally:
            pending[peer] -= 1
            if not pending[peer]:
                del pending[peer]
        if accepted is not None:
            await handler(*accepted)

    async def _accept_one(
        stream: trio.SocketStream, where: object
    ) -> tuple[trio.SSLStream[Any], PeerIdentity | None] | None:
        try:
            ssl_stream, ident = await accept_tls(
                stream,
                context,
                pool_id=pool_id,
                roles=roles,
                is_revoked=is_revoked,
                allow_anonymous=allow_anonymous,
                handshake_timeout=handshake_timeout,
                farewell=farewell,
            )
        except TlsRefused as exc:
            log.info("refused connection from %s: %s", where, exc.reason)
            return None
        return ssl_stream, ident

    await trio.serve_listeners(one, listeners)


async def watch_revocation(
    stream: trio.abc.AsyncResource,
    serial: int,
    is_revoked: Callable[[int], bool],
    interval: float = REVOCATION_INTERVAL,
) -> None:
    """Cut ``stream`` once ``serial`` is revoked; then raise ``PeerRevoked``.

    Run it next to a live connection's reader (same nursery): the reader sees the stream
    closed and the nursery ends with ``PeerRevoked``. The broker also calls ``aclose`` itself
    when it revokes a starter, so this poll is the backstop for a list edited by hand.
    """
    while True:
        if is_revoked(serial):
            break
        await trio.sleep(interval)
    await trio.aclose_forcefully(stream)
    raise PeerRevoked(f"certificate {serial:x} revoked")
