"""Encryption of the starter <-> broker control channel, after the signed handshake.

The handshake's two nonces are X25519 public keys made fresh for each connection, and each
side's Ed25519 signature covers both of them (``broker_auth_statement`` and
``starter_auth_statement``). So once the handshake has verified, both sides know that the
other end holds the private half of the ephemeral key it sent: a Diffie-Hellman between the
two ephemerals gives a key no one else on the path can compute (a signed ephemeral DH, as in
SIGMA/TLS 1.3). From it we derive one key per direction, and every later frame's payload is
sealed with XSalsa20-Poly1305 (pynacl's SecretBox) under a counter nonce, so frames cannot be
read, altered, reordered, replayed or dropped without the next ``open`` failing.

Sans-IO: this module only transforms bytes.
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret

from ._errors import LocalProtocolError, RemoteProtocolError

_PERSON = b"stj-chan-v1"
MAC_LEN = nacl.secret.SecretBox.MACBYTES


class Ephemeral:
    """A one-connection X25519 key pair; its public half is sent as the handshake nonce."""

    def __init__(self) -> None:
        self._private = nacl.public.PrivateKey.generate()
        self.public = bytes(self._private.public_key)

    def shared(self, their_public: bytes) -> bytes:
        if len(their_public) != 32:
            raise RemoteProtocolError("peer's handshake nonce is not a 32-byte X25519 key")
        try:
            return nacl.bindings.crypto_scalarmult(bytes(self._private), their_public)
        except nacl.exceptions.RuntimeError:
            raise RemoteProtocolError("peer's X25519 key is degenerate") from None


def channel_keys(
    shared: bytes, starter_public: bytes, broker_public: bytes, transcript: bytes
) -> tuple[bytes, bytes]:
    """(starter->broker key, broker->starter key) from the DH secret and the handshake."""
    h = hashlib.blake2b(digest_size=64, person=_PERSON)
    for part in (shared, starter_public, broker_public, transcript):
        h.update(len(part).to_bytes(4, "big") + part)
    okm = h.digest()
    return okm[:32], okm[32:]


class FrameCipher:
    """Seals (or opens) one direction's frames, in order."""

    def __init__(self, key: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        if self._counter >= 1 << 64:
            raise LocalProtocolError("channel used up its nonces; reconnect")
        nonce = self._counter.to_bytes(nacl.secret.SecretBox.NONCE_SIZE, "big")
        self._counter += 1
        return nonce

    def seal(self, plaintext: bytes) -> bytes:
        return self._box.encrypt(plaintext, self._nonce()).ciphertext

    def open(self, ciphertext: bytes) -> bytes:
        try:
            return self._box.decrypt(ciphertext, self._nonce())
        except nacl.exceptions.CryptoError:
            raise RemoteProtocolError(
                "frame failed authentication (altered, replayed, reordered or wrong key)"
            ) from None
