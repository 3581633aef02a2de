"""The protocol's error types.

A peer that sends something malformed or out of turn commits a *remote* error; our own code
asking the codec to send something out of turn commits a *local* error (a bug). Either one puts
that connection into its final error state and nothing else: daemons catch these per
connection and keep serving everyone else.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of every error the wire layer raises."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol: malformed, oversize, out of turn."""


class CapabilityError(ValueError):
    """A capability or signed statement failed verification; the message says why."""
