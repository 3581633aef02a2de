"""The starter <-> broker handshake, both roles, with no I/O.

Each side is a small object fed the peer's messages; it answers with the next message to send
or raises ``HandshakeError`` with the reason, and at the end hands out the channel keys. The
daemons only move these messages over their streams, so the rules (who signs what, which
nonces, which keys come out) are written once, here, and tested without a socket.

The exchange (see docs/protocol.md): the starter says who it is with a fresh X25519 public key
as its nonce; the broker answers with its own and a signature over both; the starter checks it
against the pinned broker key and signs the same pair back; the broker checks that against the
starter's trusted key and says welcome. A Diffie-Hellman of the two ephemerals, bound to the
signed transcript, keys the channel (``wire._secure``).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ._crypto import broker_auth_statement, public_key_of, sign, starter_auth_statement, verify
from ._messages import BrokerHello, Error, Message, StarterAuth, StarterHello, Welcome
from ._secure import Ephemeral, channel_keys

MAX_STARTER_NAME = 128


class HandshakeError(Exception):
    """The handshake cannot complete; ``message`` says why, ``code`` is the wire error code.

    ``refused`` is true when the peer refused us (its ``error`` frame), false when we refuse
    the peer; either way the connection ends.
    """

    def __init__(self, code: str, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.refused = refused

    def error(self) -> Error:
        """The frame that tells the peer why we refuse it."""
        return Error(self.code, self.message)


@attrs.frozen
class ChannelKeys:
    """One key per direction, as this side uses them."""

    send: bytes = attrs.field(repr=False)
    receive: bytes = attrs.field(repr=False)


def _refused(msg: Message) -> HandshakeError:
    if isinstance(msg, Error):
        return HandshakeError(msg.code, msg.message, refused=True)
    return HandshakeError("protocol", f"unexpected {msg.TYPE} during the handshake")


class StarterHandshake:
    """The starter's side: ``hello()``, then ``on_broker_hello``, then ``on_welcome``."""

    def __init__(
        self,
        name: str,
        identity: bytes,
        broker_key: bytes,
        slots: int,
        ephemeral: Ephemeral | None = None,
    ) -> None:
        self.name = name
        self._identity = identity
        self._broker_key = broker_key
        self._slots = slots
        self._eph = ephemeral or Ephemeral()
        self._broker_nonce = b""

    def hello(self) -> StarterHello:
        return StarterHello(
            starter_id=self.name,
            starter_key=public_key_of(self._identity),
            nonce=self._eph.public,
            slots=self._slots,
        )

    def on_broker_hello(self, msg: Message) -> StarterAuth:
        if not isinstance(msg, BrokerHello):
            raise _refused(msg)
        statement = broker_auth_statement(self.name, self._eph.public, msg.nonce)
        if not verify(self._broker_key, statement, msg.signature):
            raise HandshakeError(
                "untrusted", "the broker's signature does not verify: wrong broker key?"
            )
        self._broker_nonce = msg.nonce
        mine = starter_auth_statement(self.name, self._eph.public, msg.nonce)
        return StarterAuth(signature=sign(self._identity, mine))

    def on_welcome(self, msg: Message) -> ChannelKeys:
        if not isinstance(msg, Welcome) or not self._broker_nonce:
            raise _refused(msg)
        up, down = _keys(self._eph, self.name, self._eph.public, self._broker_nonce)
        return ChannelKeys(send=up, receive=down)


class BrokerHandshake:
    """The broker's side: ``on_hello`` (-> BrokerHello), then ``on_auth`` (-> Welcome, keys).

    ``trusted`` says whether a starter key may join this pool; the broker's own identity signs
    its half, so a starter with the pinned broker key knows it reached this broker.
    """

    def __init__(
        self,
        signing_key: bytes,
        trusted: Callable[[bytes], bool],
        ephemeral: Ephemeral | None = None,
    ) -> None:
        self._signing_key = signing_key
        self._trusted = trusted
        self._eph = ephemeral or Ephemeral()
        self.hello: StarterHello | None = None

    def on_hello(self, msg: Message) -> BrokerHello:
        if not isinstance(msg, StarterHello):
            raise _refused(msg)
        name = msg.starter_id
        if len(msg.nonce) != 32 or not name or len(name) > MAX_STARTER_NAME:
            raise HandshakeError("protocol", "malformed hello")
        if not self._trusted(msg.starter_key):
            raise HandshakeError(
                "untrusted", "this starter's key is not in the broker's trusted_starters directory"
            )
        self.hello = msg
        statement = broker_auth_statement(name, msg.nonce, self._eph.public)
        return BrokerHello(nonce=self._eph.public, signature=sign(self._signing_key, statement))

    def on_auth(self, msg: Message) -> tuple[Welcome, ChannelKeys]:
        hello = self.hello
        if hello is None or not isinstance(msg, StarterAuth):
            raise _refused(msg)
        statement = starter_auth_statement(hello.starter_id, hello.nonce, self._eph.public)
        if not verify(hello.starter_key, statement, msg.signature):
            raise HandshakeError("untrusted", "starter signature does not verify")
        up, down = _keys(self._eph, hello.starter_id, hello.nonce, self._eph.public)
        return Welcome(), ChannelKeys(send=down, receive=up)


def _keys(
    eph: Ephemeral, name: str, starter_nonce: bytes, broker_nonce: bytes
) -> tuple[bytes, bytes]:
    """(starter->broker, broker->starter) keys from the DH and the signed transcript."""
    peer = broker_nonce if eph.public == starter_nonce else starter_nonce
    transcript = starter_auth_statement(name, starter_nonce, broker_nonce)
    return channel_keys(eph.shared(peer), starter_nonce, broker_nonce, transcript)
