"""The trio adapter the daemons share: framed streams over ``wire.Connection``, bounded outboxes.

OS errors are translated here and nowhere else, into ``PeerGone`` (``PeerClosed`` when the peer
ended the stream, ``PeerBroken`` when the stream broke); neither is an ``OSError``, so code above
this package handles protocol outcomes and never guesses what an ``OSError`` meant. Every read
has a deadline and every outbox a bound. No client imports this package (clients do not run
trio); it may import only ``wire`` and trio.
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

__all__ = [
    "OUTBOX_LIMIT",
    "FramedStream",
    "Outbox",
    "OutboxFull",
    "PeerBroken",
    "PeerClosed",
    "PeerGone",
    "receive_one_frame_exact",
    "set_nodelay",
]
