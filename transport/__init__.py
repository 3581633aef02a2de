"""The trio adapter the daemons share: framed streams over ``wire.Connection``, bounded outboxes.

OS errors are translated here and nowhere else, into ``PeerGone`` (``PeerClosed`` when the peer
ended the stream, ``PeerBroken`` when the stream broke); neither is an ``OSError``, so code above
this package handles protocol outcomes and never guesses what an ``OSError`` meant. Every read
has a deadline and every outbox a bound. No client imports this package (clients do not run
trio); it may import only ``wire`` and trio. ``_tls`` holds the TLS 1.3 control channels
(contexts, accept/connect with a handshake deadline, the peer's certificate identity).
"""

from ._stream import (
    OUTBOX_LIMIT,
    FramedStream,
    Outbox,
    OutboxFull,
    PeerBroken,
    PeerClosed,
    PeerGone,
    receive_one_frame_exact,
    set_nodelay,
)
from ._tls import (
    HANDSHAKE_TIMEOUT,
    REVOCATION_INTERVAL,
    PeerIdentity,
    PeerRevoked,
    TlsRefused,
    accept_tls,
    client_context,
    connect_tls,
    enrollment_context,
    peer_certificate_der,
    peer_identity,
    serve_tls,
    server_context,
    watch_revocation,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "OUTBOX_LIMIT",
    "REVOCATION_INTERVAL",
    "FramedStream",
    "Outbox",
    "OutboxFull",
    "PeerBroken",
    "PeerClosed",
    "PeerGone",
    "PeerIdentity",
    "PeerRevoked",
    "TlsRefused",
    "accept_tls",
    "client_context",
    "connect_tls",
    "enrollment_context",
    "peer_certificate_der",
    "peer_identity",
    "receive_one_frame_exact",
    "serve_tls",
    "server_context",
    "set_nodelay",
    "watch_revocation",
]
