"""Capabilities and the other signed statements, in one canonical encoding.

Everything signed is ``DOMAIN || field || field ...`` where each field is a 4-byte big-endian
length and its bytes, and DOMAIN names what the statement is (so a signature over one kind of
statement can never be replayed as another). Signatures are Ed25519 (pynacl).

A capability says: the broker lets the holder of ``client_key`` open session ``session_id``
into job ``job`` on starter ``starter_id`` until ``expires_at``. Its verification takes the time
from the caller, so expiry is testable without sleeping; single use is ``ReplayCache``'s job.
"""

from __future__ import annotations

import attrs
import nacl.exceptions
import nacl.signing

from ._canonical import (
    _LEN,
    CAP_DOMAIN,
    KEY_LEN,
    REMOTE_DOMAIN,
    SIG_LEN,
    canonical,
)
from ._errors import CapabilityError

#: Longest lifetime the broker may give a capability.
MAX_CAP_LIFETIME = 60
#: Clock difference between broker and starter we tolerate.
CLOCK_SKEW = 5


def _split(data: bytes, domain: bytes) -> list[bytes]:
    if not data.startswith(domain):
        raise CapabilityError("not a capability (wrong domain or version)")
    pos, fields = len(domain), []
    while pos < len(data):
        if pos + 4 > len(data):
            raise CapabilityError("capability is truncated")
        (n,) = _LEN.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise CapabilityError("capability is truncated")
        fields.append(data[pos : pos + n])
        pos += n
    return fields


def sign(signing_key: bytes, message: bytes) -> bytes:
    return nacl.signing.SigningKey(signing_key).sign(message).signature


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != KEY_LEN or len(signature) != SIG_LEN:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


def public_key_of(signing_key: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(signing_key).verify_key)


def new_signing_key() -> bytes:
    return bytes(nacl.signing.SigningKey.generate())


@attrs.frozen
class Capability:
    session_id: str
    job: str
    owner_uid: int
    requester_uid: int
    client_key: str
    starter_id: str
    starter_key: bytes
    issued_at: int
    expires_at: int

    def encode(self) -> bytes:
        return canonical(
            CAP_DOMAIN,
            self.session_id,
            self.job,
            self.owner_uid,
            self.requester_uid,
            self.client_key,
            self.starter_id,
            self.starter_key,
            self.issued_at,
            self.expires_at,
        )

    @classmethod
    def decode(cls, data: bytes) -> Capability:
        fields = _split(data, CAP_DOMAIN)
        if len(fields) != 9:
            raise CapabilityError(f"capability has {len(fields)} fields, expected 9")
        try:
            s = [f.decode("utf-8") for f in fields[:6]]
            cap = cls(
                session_id=s[0],
                job=s[1],
                owner_uid=int(s[2]),
                requester_uid=int(s[3]),
                client_key=s[4],
                starter_id=s[5],
                starter_key=fields[6],
                issued_at=int(fields[7]),
                expires_at=int(fields[8]),
            )
        except (UnicodeDecodeError, ValueError):
            raise CapabilityError("capability has a malformed field") from None
        # int() also reads " 7", "+7", "0_7" and other scripts' digits: only the one
        # canonical spelling is a capability, so decode is the exact inverse of encode.
        if cap.encode() != data:
            raise CapabilityError("capability is not in canonical form")
        return cap


def sign_capability(cap: Capability, broker_signing_key: bytes) -> bytes:
    """The wire form: the canonical encoding followed by the 64-byte signature."""
    if cap.expires_at - cap.issued_at > MAX_CAP_LIFETIME:
        raise ValueError(f"capability lifetime exceeds {MAX_CAP_LIFETIME} s")
    body = cap.encode()
    return body + sign(broker_signing_key, body)


def verify_capability(blob: bytes, broker_key: bytes, now: float) -> Capability:
    """Check signature and time window; raise CapabilityError saying what is wrong."""
    if len(blob) <= SIG_LEN:
        raise CapabilityError("capability is truncated")
    body, sig = blob[:-SIG_LEN], blob[-SIG_LEN:]
    if not verify(broker_key, body, sig):
        raise CapabilityError("capability signature does not verify (tampered, or another broker)")
    cap = Capability.decode(body)
    if cap.expires_at - cap.issued_at > MAX_CAP_LIFETIME:
        raise CapabilityError("capability lifetime is longer than allowed")
    if now > cap.expires_at + CLOCK_SKEW:
        raise CapabilityError(f"capability expired {int(now - cap.expires_at)} s ago")
    if now < cap.issued_at - CLOCK_SKEW:
        raise CapabilityError("capability is not valid yet (clock skew?)")
    return cap


class ReplayCache:
    """Remembers used session ids until their capabilities expire: each opens one session."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def use(self, session_id: str, expires_at: int, now: float) -> None:
        for sid in [s for s, exp in self._seen.items() if exp + CLOCK_SKEW < now]:
            del self._seen[sid]
        if session_id in self._seen:
            raise CapabilityError("capability was already used (replay)")
        self._seen[session_id] = expires_at

    def __len__(self) -> int:
        return len(self._seen)


def remote_request_statement(
    pool_id: str, nonce: bytes, job: str, client_key: str, key: str
) -> bytes:
    """What a remote client signs with its registered key: the pool (from the broker's
    verified certificate), the broker's fresh nonce for this connection, and the request."""
    return canonical(REMOTE_DOMAIN, pool_id, nonce, job, client_key, key)


def same_secret(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)
