"""One-time join tokens and the enrolment exchange they buy, both sides, with no I/O.

A join token (``stj token create``) is one printable line::

    stj1.<token id>.<secret>.<CA hash>

(token id: 16 hex digits; secret: 32 random bytes; CA hash: SHA-256 of the CA certificate's
DER; both in unpadded base64url).

It carries everything a new execute host needs and nothing it must find out on its own: the
**CA hash** pins the pool CA without trust on first use (kubeadm's discovery hash), the **secret**
proves to the broker that an admin handed this host the token. The broker's ``TokenBook`` keeps
only SHA-256 of each secret with the token's expiry; a token is good once, and a used, expired
or unknown one is refused with a message that says which.

The enrolment exchange, on one TLS 1.3 connection to the broker's usual port (the broker accepts
connections without a client certificate only for these messages)::

    starter                                          broker
    EnrollHello                      ->
                                     <-              EnrollCa (the CA certificate bundle)
    (checks a CA in the bundle has the token's hash, and that the certificate the broker
     presented in the TLS handshake is that CA's broker certificate for that pool)
    EnrollRequest(token id, secret, name, public key) ->
                                     <-              EnrollReply (certificate, CA bundle)
                                                     or Error(code, message)

The secret is sent only inside TLS to a broker already verified against the pinned CA, so
neither an eavesdropper nor a host impersonating the broker ever sees it; the starter's private
key is made on the starter and never sent. The broker answers ``EnrollCa`` to anyone: the CA
certificate is public. Nothing here trusts a byte before it was checked.

The messages have their own strict JSON codec (``encode_enroll``/``decode_enroll``) in the
same encoding as ``wire``'s (compact JSON, ``type`` field, bytes as standard base64, unknown or
missing fields refused) so they can move into ``wire/_messages.py`` unchanged.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import pathlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from ssh_to_job.wire import (
    PEER_NAME_RE,
    ROLE_BROKER,
    ROLE_STARTER,
    Error,
    LocalProtocolError,
    RemoteProtocolError,
)

from ._files import write_private
from ._pki import (
    PkiError,
    cert_pem,
    fingerprint,
    new_private_key,
    parse_cert,
    parse_public_key,
    pool_id_of_ca,
    public_key_pem,
    verify_leaf,
)

TOKEN_PREFIX = "stj1"  # noqa: S105 (a format tag, not a secret)
DEFAULT_TTL = 600.0
MAX_TTL = 7 * 86400.0
#: Used and expired records are kept this long after expiry, so a late second use is told
#: "already used"/"expired" rather than "unknown".
RETAIN = 86400.0
_ID_RE = re.compile(r"[0-9a-f]{16}")
_B64_32 = re.compile(r"[A-Za-z0-9_-]{43}")


class TokenError(ValueError):
    """A join token is malformed, unknown, used, expired, or does not match; ``code`` is for the
    wire (``Error.code``), the message is for the admin."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=")


@attrs.frozen
class JoinToken:
    """What the admin copies to the new execute host; ``str()`` is its printable form."""

    token_id: str
    secret: bytes = attrs.field(repr=False)
    ca_hash: bytes

    def __attrs_post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.token_id):
            raise ValueError("token id must be 16 lowercase hex digits")
        if len(self.secret) != 32 or len(self.ca_hash) != 32:
            raise ValueError("token secret and CA hash must be 32 bytes each")

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{_b64url(self.secret)}.{_b64url(self.ca_hash)}"


def parse_token(text: str) -> JoinToken:
    """The token printed by ``stj token create``; ``TokenError`` saying what is wrong."""
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
        raise TokenError(
            "token_malformed", f"not a join token (expected {TOKEN_PREFIX}.<id>.<secret>.<hash>)"
        )
    _, token_id, secret, ca_hash = parts
    if not _ID_RE.fullmatch(token_id):
        raise TokenError("token_malformed", "join token id must be 16 lowercase hex digits")
    if not (_B64_32.fullmatch(secret) and _B64_32.fullmatch(ca_hash)):
        raise TokenError("token_malformed", "join token is truncated or damaged")
    try:
        return JoinToken(token_id, _unb64url(secret), _unb64url(ca_hash))
    except (ValueError, binascii.Error):
        raise TokenError("token_malformed", "join token is truncated or damaged") from None


def _secret_hash(secret: bytes) -> bytes:
    # The secret is 256 random bits: a plain hash is enough to make a leaked book useless.
    return hashlib.sha256(b"stj-join-secret-v1\0" + secret).digest()


@attrs.frozen
class TokenRecord:
    """What the broker keeps of one token: never the secret."""

    token_id: str
    secret_hash: bytes = attrs.field(repr=False)
    created: float
    expires: float
    used_at: float | None = None
    used_by: str = ""


class TokenBook:
    """The broker's join tokens, in memory; ``dumps``/``loads`` for its 0600 file.

    ``now`` is always passed in (the broker's one clock), so expiry is tested without waiting.
    """

    def __init__(self, records: dict[str, TokenRecord] | None = None) -> None:
        self.records: dict[str, TokenRecord] = dict(records or {})

    def create(self, ca_hash: bytes, ttl: float, now: float) -> JoinToken:
        if not 1 <= ttl <= MAX_TTL:
            raise ValueError(f"token ttl must be between 1 s and {MAX_TTL:g} s, not {ttl:g}")
        self.purge(now)
        token = JoinToken(secrets.token_hex(8), secrets.token_bytes(32), ca_hash)
        self.records[token.token_id] = TokenRecord(
            token.token_id, _secret_hash(token.secret), now, now + ttl
        )
        return token

    def redeem(self, token_id: str, secret: bytes, by: str, now: float) -> None:
        """Spend a token for starter ``by``; ``TokenError`` if it may not be spent.

        The secret is checked first (in constant time), so without it nobody learns whether a
        token id exists, was used or expired.
        """
        rec = self.records.get(token_id)
        if rec is None or not hmac.compare_digest(rec.secret_hash, _secret_hash(secret)):
            raise TokenError(
                "token_unknown",
                "join token not recognised by this broker (mistyped, or made for another pool)",
            )
        if rec.used_at is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.used_at))
            raise TokenError(
                "token_used",
                f"join token already used (by {rec.used_by} at {when}); "
                "make a new one with `stj token create`",
            )
        if now >= rec.expires:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.expires))
            raise TokenError(
                "token_expired",
                f"join token expired at {when}; make a new one with `stj token create`",
            )
        self.records[token_id] = attrs.evolve(rec, used_at=now, used_by=by)

    def purge(self, now: float) -> None:
        """Forget tokens that expired more than ``RETAIN`` seconds ago."""
        self.records = {k: r for k, r in self.records.items() if r.expires + RETAIN > now}

    def dumps(self) -> bytes:
        rows = [
            {
                "id": r.token_id,
                "hash": r.secret_hash.hex(),
                "created": r.created,
                "expires": r.expires,
                "used_at": r.used_at,
                "used_by": r.used_by,
            }
            for r in self.records.values()
        ]
        return json.dumps({"version": 1, "tokens": rows}, indent=1).encode() + b"\n"

    @classmethod
    def loads(cls, data: bytes) -> TokenBook:
        try:
            raw = json.loads(data)
            if raw["version"] != 1:
                raise ValueError(f"unknown version {raw['version']!r}")
            records = {}
            for row in raw["tokens"]:
                used_at = row["used_at"]
                rec = TokenRecord(
                    str(row["id"]),
                    bytes.fromhex(row["hash"]),
                    float(row["created"]),
                    float(row["expires"]),
                    None if used_at is None else float(used_at),
                    str(row["used_by"]),
                )
                records[rec.token_id] = rec
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError("token_book", f"token file is damaged: {exc!r}") from None
        return cls(records)

    @classmethod
    def load(cls, path: pathlib.Path) -> TokenBook:
        """The book in ``path`` (an empty one if there is none yet)."""
        try:
            return cls.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()

    def save(self, path: pathlib.Path) -> None:
        write_private(path, self.dumps())


# --------------------------------------------------------------------------- messages


class EnrollMessage:
    """Marker base of the enrolment messages; each sets ``TYPE``."""

    TYPE: ClassVar[str]


@attrs.frozen
class EnrollHello(EnrollMessage):
    """Starter -> broker, first: "send me your CA"; nothing secret yet."""

    TYPE: ClassVar[str] = "enroll_hello"
    version: int = 1


@attrs.frozen
class EnrollCa(EnrollMessage):
    """Broker -> starter: the CA certificate bundle (PEM), public."""

    TYPE: ClassVar[str] = "enroll_ca"
    ca_certs: str


@attrs.frozen
class EnrollRequest(EnrollMessage):
    """Starter -> broker, only after it verified the broker: the token and its public key."""

    TYPE: ClassVar[str] = "enroll_request"
    token_id: str
    secret: bytes = attrs.field(repr=False)
    name: str
    public_key: str  # PEM SubjectPublicKeyInfo, Ed25519


@attrs.frozen
class EnrollReply(EnrollMessage):
    """Broker -> starter: its certificate and the CA bundle to trust from now on."""

    TYPE: ClassVar[str] = "enroll_reply"
    certificate: str
    ca_certs: str


ENROLL_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls for cls in (EnrollHello, EnrollCa, EnrollRequest, EnrollReply, Error)
}


def encode_enroll(msg: EnrollMessage | Error) -> bytes:
    """One enrolment message as compact UTF-8 JSON (a frame's payload)."""
    if type(msg) not in ENROLL_TYPES.values():
        raise LocalProtocolError(f"not an enrolment message: {msg!r}")
    body: dict[str, Any] = {"type": msg.TYPE}
    for f in attrs.fields(type(msg)):  # type: ignore[arg-type]  # checked just above
        v = getattr(msg, f.name)
        body[f.name] = base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_enroll(payload: bytes) -> EnrollMessage | Error:
    """The message in ``payload``; ``RemoteProtocolError`` for anything not exactly one."""
    try:
        body = json.loads(
            payload.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"enrolment frame is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise RemoteProtocolError("enrolment frame is not a JSON object")
    kind = body.pop("type", None)
    cls = ENROLL_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError("unknown or missing enrolment message type")
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise RemoteProtocolError(f"{cls.TYPE}: unknown field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is attrs.NOTHING:
                raise RemoteProtocolError(f"{cls.TYPE}: field {name} missing")
            continue
        v = body[name]
        want = (
            f.type
            if isinstance(f.type, type)
            else {"str": str, "int": int, "bytes": bytes}[str(f.type)]
        )
        if want is bytes:
            if type(v) is not str:
                raise RemoteProtocolError(f"{cls.TYPE}: field {name} must be base64 text")
            try:
                v = base64.b64decode(v.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                raise RemoteProtocolError(f"{cls.TYPE}: field {name} is not base64") from None
        elif type(v) is not want:
            raise RemoteProtocolError(f"{cls.TYPE}: field {name} must be {want.__name__}")
        elif isinstance(v, str) and not _is_unicode(v):
            raise RemoteProtocolError(f"{cls.TYPE}: field {name} is not valid Unicode")
        kwargs[name] = v
    return cls(**kwargs)  # type: ignore[no-any-return]


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- the two sides


class EnrollError(Exception):
    """Enrolment cannot complete; ``code``/``message`` as in ``wire.Error``.

    ``refused`` is true when the broker refused us (its ``Error``), false when we refuse the
    peer; either way the connection ends. ``error()`` is the frame telling the peer why.
    """

    def __init__(self, code: str, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.refused = refused

    def error(self) -> Error:
        return Error(self.code, self.message)


def _unexpected(msg: object, wanted: str) -> EnrollError:
    if isinstance(msg, Error):
        return EnrollError(msg.code, msg.message, refused=True)
    kind = getattr(msg, "TYPE", type(msg).__name__)
    return EnrollError("protocol", f"expected {wanted}, got {kind}")


def _bundle(text: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise EnrollError("bad_ca", f"broker sent no usable CA certificate: {exc}") from None
    return certs


@attrs.frozen
class Enrolled:
    """The result a starter stores (``StarterPki.save``): its key, certificate and the CA(s)."""

    key: ed25519.Ed25519PrivateKey = attrs.field(repr=False)
    certificate: x509.Certificate
    ca_certs: tuple[x509.Certificate, ...]
    pool_id: str


class StarterEnrollment:
    """The joining starter's side: ``hello()``, ``on_ca(msg, broker_cert_der)``, ``on_reply``.

    ``broker_cert_der`` is the certificate the broker presented in the TLS handshake
    (``ssl_object.getpeercert(binary_form=True)``, on a context that does not verify: nothing
    to verify against exists before ``on_ca``). TLS already proved the broker holds its key;
    ``on_ca`` proves the certificate is the pinned CA's broker certificate, and only then is the
    secret released.
    """

    def __init__(
        self,
        token: JoinToken,
        name: str,
        key: ed25519.Ed25519PrivateKey | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not PEER_NAME_RE.fullmatch(name):
            raise ValueError(
                f"starter name {name!r} is not valid (allowed: {PEER_NAME_RE.pattern})"
            )
        self.token = token
        self.name = name
        self._key = key or new_private_key()
        self._now = now
        self._cas: list[x509.Certificate] = []
        self._pool_id = ""

    def hello(self) -> EnrollHello:
        return EnrollHello()

    def on_ca(self, msg: object, broker_cert_der: bytes | None) -> EnrollRequest:
        if not isinstance(msg, EnrollCa):
            raise _unexpected(msg, "the broker's CA certificate")
        certs = _bundle(msg.ca_certs)
        pinned = [c for c in certs if hmac.compare_digest(fingerprint(c), self.token.ca_hash)]
        if not pinned:
            raise EnrollError(
                "ca_mismatch",
                "the broker's CA does not match the join token's CA hash "
                "(wrong broker address, a token from another pool, or someone in between)",
            )
        if not broker_cert_der:
            raise EnrollError("ca_mismatch", "the broker presented no certificate")
        try:
            self._pool_id = pool_id_of_ca(pinned[0])
            broker = x509.load_der_x509_certificate(broker_cert_der)
            verify_leaf(broker, pinned, pool_id=self._pool_id, role=ROLE_BROKER, now=self._dt())
        except (PkiError, ValueError) as exc:
            raise EnrollError(
                "ca_mismatch", f"the broker's certificate is not trusted: {exc}"
            ) from None
        # Every CA of the same pool in the bundle is trusted from now on (rotation), but only
        # because the pinned one vouches for the broker that sent the bundle.
        self._cas = [c for c in certs if _pool_of(c) == self._pool_id]
        return EnrollRequest(
            token_id=self.token.token_id,
            secret=self.token.secret,
            name=self.name,
            public_key=public_key_pem(self._key.public_key()),
        )

    def on_reply(self, msg: object) -> Enrolled:
        if not isinstance(msg, EnrollReply):
            raise _unexpected(msg, "the enrolment reply")
        if not self._cas:
            raise EnrollError("protocol", "enrolment reply before the CA was checked")
        try:
            cert = parse_cert(msg.certificate)
            verify_leaf(
                cert,
                self._cas,
                pool_id=self._pool_id,
                role=ROLE_STARTER,
                name=self.name,
                now=self._dt(),
            )
        except PkiError as exc:
            raise EnrollError(
                "bad_certificate", f"issued certificate is not valid: {exc}"
            ) from None
        pub = cert.public_key()
        mine = public_key_pem(self._key.public_key())
        if not isinstance(pub, ed25519.Ed25519PublicKey) or public_key_pem(pub) != mine:
            raise EnrollError("bad_certificate", "issued certificate is not for our key")
        return Enrolled(self._key, cert, tuple(self._cas), self._pool_id)

    def _dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._now(), datetime.UTC)


def _pool_of(cert: x509.Certificate) -> str | None:
    try:
        return pool_id_of_ca(cert)
    except PkiError:
        return None


class BrokerEnrollment:
    """The broker's side of one enrolment connection: ``on_hello``, then ``on_request``.

    ``issue(name, public_key)`` signs and records a starter certificate (``BrokerPki.issue``
    with ``ROLE_STARTER``); ``book`` is spent in memory, and the caller saves it (before it
    sends the reply, so a crash never leaves a spent token reusable).
    """

    def __init__(
        self,
        ca_bundle_pem: bytes,
        book: TokenBook,
        issue: Callable[[str, ed25519.Ed25519PublicKey], x509.Certificate],
        now: Callable[[], float] = time.time,
    ) -> None:
        self._ca = ca_bundle_pem.decode("ascii")
        self._book = book
        self._issue = issue
        self._now = now
        self._said_ca = False

    def on_hello(self, msg: object) -> EnrollCa:
        if not isinstance(msg, EnrollHello):
            raise _unexpected(msg, "enroll_hello")
        if msg.version != 1:
            raise EnrollError("version", f"enrolment version {msg.version} is not supported")
        self._said_ca = True
        return EnrollCa(self._ca)

    def on_request(self, msg: object) -> EnrollReply:
        if not isinstance(msg, EnrollRequest) or not self._said_ca:
            raise _unexpected(msg, "enroll_request after enroll_hello")
        if not PEER_NAME_RE.fullmatch(msg.name):
            raise EnrollError("bad_name", f"starter name {msg.name!r} is not valid")
        try:
            public_key = parse_public_key(msg.public_key)
        except PkiError as exc:
            raise EnrollError("bad_key", str(exc)) from None
        try:
            self._book.redeem(msg.token_id, msg.secret, msg.name, self._now())
        except TokenError as exc:
            raise EnrollError(exc.code, exc.message) from None
        cert = self._issue(msg.name, public_key)
        return EnrollReply(cert_pem(cert).decode("ascii"), self._ca)
