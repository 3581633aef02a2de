"""The pool's own certificate authority: made, stored, issuing, revoking; no networking.

What is issued (all Ed25519; measured: Python 3.11's ``ssl`` on OpenSSL 3.0 completes TLS 1.3
handshakes with Ed25519 certificates on both sides, and ``openssl s_client`` reads them):

* **the pool CA**: a self-signed CA certificate (``ca.crt``, 0644) and its key (``ca.key``,
  0600), made once on the broker host in ``<state>/pki`` (0700). Its subject carries the
  **pool id** (``OU=<pool-id>``), a random token made with it; the CA certificate is the one
  source of truth for it.
* **the broker's server certificate** (``broker.crt`` / ``broker.key``), with the DNS names and
  IP addresses starters dial as subject alternative names, ``serverAuth`` only.
* **starter and client certificates**, ``clientAuth`` only, issued against a public key the
  starter (client) made itself: its private key never leaves its host.

Every leaf carries exactly one URI SAN ``stj://<pool-id>/<role>/<name>`` (``wire.PeerName``),
checked on every connection together with the chain: a certificate of one pool never works in
another pool, a starter's certificate never works as the broker's, and the name a starter
announces is the one in its certificate.

Revocation: the broker keeps ``issued`` (every serial it issued, with role and name) and
``revoked`` (revoked serials, one a line); ``RevocationList`` rereads the latter whenever it
changes, so the broker consults the current list on every connection and, on its periodic
re-check of live connections, cuts those whose serial was revoked meanwhile.

Rotation:

* Leaves live ``DEFAULT_LEAF_DAYS`` (90) days. ``needs_renewal`` is true once less than a third
  of a certificate's life is left; the broker renews its own certificate at start-up then, and
  a starter should ask for a new certificate over its authenticated channel when it reconnects
  past that point (same key or a new one; the old serial stays valid until it expires). A
  starter whose certificate expired must enrol again with a new token.
* The CA lives ``DEFAULT_CA_DAYS`` (10 years). To rotate it, make a new CA with the **same pool
  id** (``PoolCA.generate(pool_id=...)``), publish both CA certificates in ``ca.crt`` (a PEM
  bundle: ``load_ca_bundle`` and ``ssl`` trust every certificate in it), reissue the broker's
  and then each starter's certificate from the new CA, and drop the old CA from the bundle once
  no leaf it signed is in use.

This module must never put a private key anywhere but a 0600 file in a 0700 directory, and
never trust a certificate it did not verify against the pool CA.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import pathlib
import secrets
from collections.abc import Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ssh_to_job.wire import (
    ROLE_BROKER,
    ROLE_STARTER,
    PeerName,
    check_pool_id,
    parse_peer_uri,
)

from ._files import private_dir, write_private, write_public

DEFAULT_LEAF_DAYS = 90
DEFAULT_CA_DAYS = 3650
#: A certificate is renewed once less than this fraction of its life is left.
RENEW_FRACTION = 1 / 3
#: Certificates start this long before "now", so a peer whose clock is a little behind
#: accepts a certificate issued a moment ago.
BACKDATE = datetime.timedelta(minutes=5)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
BROKER_KEY = "broker.key"
BROKER_CERT = "broker.crt"
STARTER_KEY = "starter.key"
STARTER_CERT = "starter.crt"
ISSUED = "issued"
REVOKED = "revoked"
TOKENS = "tokens.json"
#: The key that signs sessions' OpenSSH host certificates (``@cert-authority`` on laptops).
SSH_HOST_CA = "ssh_host_ca.key"
#: How long a session's host certificate is valid. OpenSSH checks it at every key exchange,
#: re-keying included, so it must outlive any session; the key it certifies dies with it.
HOST_CERT_SECONDS = 400 * 86400

_ORG = "ssh-to-job"


class PkiError(ValueError):
    """A certificate, key or PKI file is missing, malformed, not ours, or fails verification."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_pool_id() -> str:
    """A fresh random pool id (16 lowercase hex digits)."""
    return secrets.token_hex(8)


def new_private_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def parse_public_key(pem: str) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo); ``PkiError`` for anything else."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError) as exc:
        raise PkiError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PkiError("only Ed25519 public keys are accepted")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def parse_cert(pem: bytes | str) -> x509.Certificate:
    """One PEM certificate; ``PkiError`` if it is not exactly one."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, UnicodeEncodeError) as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from None
    if len(certs) != 1:
        raise PkiError(f"expected one certificate, found {len(certs)}")
    return certs[0]


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER: what a join token pins the CA by."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def pool_id_of_ca(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise PkiError("CA certificate carries no pool id (OU)")
    try:
        return check_pool_id(values[0].value)
    except ValueError as exc:
        raise PkiError(str(exc)) from None


def identity_of(cert: x509.Certificate) -> PeerName:
    """The ``stj://`` identity a leaf certificate names; ``PkiError`` unless exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("certificate has no subject alternative name") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    ours = [u for u in uris if u.startswith("stj:")]
    if len(ours) != 1:
        raise PkiError(f"certificate must name exactly one stj:// identity, not {len(ours)}")
    try:
        return parse_peer_uri(ours[0])
    except ValueError as exc:
        raise PkiError(str(exc)) from None


def needs_renewal(cert: x509.Certificate, now: datetime.datetime | None = None) -> bool:
    """True once less than ``RENEW_FRACTION`` of the certificate's life is left."""
    now = now or _utcnow()
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < life * RENEW_FRACTION


def verify_leaf(
    cert: x509.Certificate,
    cas: Sequence[x509.Certificate],
    *,
    pool_id: str,
    role: str | None = None,
    name: str | None = None,
    now: datetime.datetime | None = None,
) -> PeerName:
    """Check ``cert`` as TLS would, plus our identity rules; its identity, or ``PkiError``.

    For the places where no ``ssl`` handshake verifies a certificate for us: the starter
    checking the broker's certificate during enrolment (before it trusts any CA file), and
    everyone checking a certificate they were just issued.
    """
    now = now or _utcnow()
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if pool_id_of_ca(ca) != pool_id:
            raise PkiError(f"certificate is from pool {pool_id_of_ca(ca)!r}, not {pool_id!r}")
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            raise PkiError(f"the pool CA is not valid now (valid until {ca.not_valid_after_utc})")
        break
    else:
        raise PkiError("certificate is not signed by the pool CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"certificate is not valid now (valid until {cert.not_valid_after_utc})")
    ident = identity_of(cert)
    if ident.pool_id != pool_id:
        raise PkiError(f"certificate names pool {ident.pool_id!r}, not {pool_id!r}")
    if role is not None and ident.role != role:
        raise PkiError(f"certificate is a {ident.role} certificate, not a {role} one")
    if name is not None and ident.name != name:
        raise PkiError(f"certificate names {ident.name!r}, not {name!r}")
    return ident


@attrs.frozen
class PoolCA:
    """The pool CA's key and certificate, in memory; ``issue`` signs leaves."""

    key: ed25519.Ed25519PrivateKey = attrs.field(repr=False)
    cert: x509.Certificate

    @property
    def pool_id(self) -> str:
        return pool_id_of_ca(self.cert)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert)

    @classmethod
    def generate(
        cls,
        pool_id: str | None = None,
        *,
        days: int = DEFAULT_CA_DAYS,
        now: datetime.datetime | None = None,
    ) -> PoolCA:
        """A new CA for ``pool_id`` (a fresh one if None; the old one when rotating)."""
        pool_id = check_pool_id(pool_id or new_pool_id())
        now = now or _utcnow()
        key = new_private_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pool_id),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ssh-to-job pool {pool_id} CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, None)
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: pathlib.Path) -> PoolCA:
        """The CA kept in ``directory`` (``ca.key`` must be 0600 and match ``ca.crt``)."""
        key = load_private_key(directory / CA_KEY)
        certs = load_ca_bundle(directory / CA_CERT)
        # The bundle may hold an old CA during rotation: ours is the one matching the key.
        mine = public_key_pem(key.public_key())
        for cert in certs:
            pub = cert.public_key()
            if isinstance(pub, ed25519.Ed25519PublicKey) and public_key_pem(pub) == mine:
                return cls(key, cert)
        raise PkiError(f"{directory / CA_KEY} matches no certificate in {directory / CA_CERT}")

    def save(self, directory: pathlib.Path) -> None:
        """Write ``ca.key`` (0600) and ``ca.crt`` (0644) into ``directory`` (made 0700)."""
        private_dir(directory)
        write_private(directory / CA_KEY, private_key_pem(self.key))
        write_public(directory / CA_CERT, cert_pem(self.cert))

    def issue(
        self,
        role: str,
        name: str,
        public_key: ed25519.Ed25519PublicKey,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        days: int = DEFAULT_LEAF_DAYS,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """A leaf for ``role``/``name`` of this pool, over a public key its owner made."""
        ident = PeerName(self.pool_id, role, name)
        if not 1 <= days <= DEFAULT_CA_DAYS:
            raise ValueError(f"days must be between 1 and {DEFAULT_CA_DAYS}, not {days}")
        now = now or _utcnow()
        not_after = min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ident.uri)]
        if role == ROLE_BROKER:
            alt += [x509.DNSName(n) for n in dns_names]
            alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        elif tuple(dns_names) or tuple(ip_addresses):
            raise ValueError("only the broker's certificate carries DNS names and addresses")
        # The extended key usage keeps the roles apart inside TLS itself: OpenSSL refuses a
        # clientAuth-only certificate as a server's and a serverAuth-only one as a client's.
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if role == ROLE_BROKER
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.pool_id),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"{role} {name}"),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, None)
        )


def load_private_key(path: pathlib.Path) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key from a PEM file that nobody but its owner can read."""
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise PkiError(f"key file {path} is readable by others; it must be 0600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{path} is not an Ed25519 key")
    return key


def load_cert(path: pathlib.Path) -> x509.Certificate:
    try:
        return parse_cert(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from None


def load_ca_bundle(path: pathlib.Path) -> list[x509.Certificate]:
    """Every CA certificate in a PEM bundle (more than one only while the CA is rotated)."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read CA certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate bundle: {exc}") from None
    ids = {pool_id_of_ca(c) for c in certs}
    if len(ids) != 1:
        raise PkiError(f"{path} must hold the CA certificates of one pool, found {sorted(ids)}")
    return certs


def write_leaf(
    directory: pathlib.Path,
    key_name: str,
    cert_name: str,
    key: ed25519.Ed25519PrivateKey | None,
    cert: x509.Certificate,
) -> None:
    """Store a leaf: key 0600 (unless None: kept), certificate 0644, directory 0700."""
    private_dir(directory)
    if key is not None:
        write_private(directory / key_name, private_key_pem(key))
    write_public(directory / cert_name, cert_pem(cert))


# --------------------------------------------------------------------------- the broker's book


@attrs.frozen
class IssuedCert:
    """One line of the broker's ``issued`` ledger."""

    serial: int
    role: str
    name: str
    not_after: str  # ISO 8601, UTC

    def line(self) -> str:
        return f"{self.serial:x} {self.role} {self.name} {self.not_after}\n"


def _parse_ledger(text: str, path: pathlib.Path) -> list[IssuedCert]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            out.append(IssuedCert(int(parts[0], 16), parts[1], parts[2], parts[3]))
        except (IndexError, ValueError):
            raise PkiError(f"{path}:{n}: malformed line {line!r}") from None
    return out


class RevocationList:
    """The broker's ``revoked`` file: serials (hex) one a line, ``#`` comments, reread on change.

    ``is_revoked`` stats the file on each call (cheap) and rereads it only when its inode, size
    or mtime changed, so a revocation written by another process (``stj starter revoke``, or an
    admin's editor) counts from the next connection or live re-check on. A missing file means
    nothing is revoked; an unreadable or malformed one is an error, never "nothing revoked".
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()

    def serials(self) -> frozenset[int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._serials = None, frozenset()
            return self._serials
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._seen:
            serials = set()
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                word = line.split("#", 1)[0].split()
                if not word:
                    continue
                try:
                    serials.add(int(word[0], 16))
                except ValueError:
                    raise PkiError(f"{self.path}:{n}: not a hex serial: {word[0]!r}") from None
            self._seen, self._serials = key, frozenset(serials)
        return self._serials

    def is_revoked(self, serial: int) -> bool:
        return serial in self.serials()

    def revoke(self, serials: Iterable[int], note: str = "") -> None:
        """Add ``serials`` (atomically replacing the file, so readers never see half of it)."""
        old = self.path.read_text() if self.path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        stamp = _utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        comment = f"  # {note} {stamp}".rstrip() if note else f"  # {stamp}"
        new = "".join(f"{s:x}{comment}\n" for s in serials if s not in self.serials())
        write_public(self.path, (old + new).encode())


@attrs.define
class BrokerPki:
    """The broker's PKI directory: its CA, its own certificate, the issued and revoked lists.

    ``open`` makes what is missing (CA on first start, broker certificate when missing, when it
    no longer names the configured hosts, or when ``needs_renewal``), so a restarted broker
    keeps its pool id and every starter's trust.
    """

    directory: pathlib.Path
    ca: PoolCA
    revocations: RevocationList
    leaf_days: int = DEFAULT_LEAF_DAYS

    @property
    def pool_id(self) -> str:
        return self.ca.pool_id

    @property
    def ca_file(self) -> pathlib.Path:
        return self.directory / CA_CERT

    @property
    def cert_file(self) -> pathlib.Path:
        return self.directory / BROKER_CERT

    @property
    def key_file(self) -> pathlib.Path:
        return self.directory / BROKER_KEY

    @property
    def tokens_file(self) -> pathlib.Path:
        return self.directory / TOKENS

    @classmethod
    def open(
        cls,
        directory: pathlib.Path,
        *,
        hosts: Sequence[str] = ("127.0.0.1",),
        leaf_days: int = DEFAULT_LEAF_DAYS,
        broker_name: str = "broker",
        now: datetime.datetime | None = None,
    ) -> BrokerPki:
        private_dir(directory)
        if (directory / CA_KEY).exists():
            ca = PoolCA.load(directory)
        else:
            ca = PoolCA.generate(now=now)
            ca.save(directory)
        pki = cls(directory, ca, RevocationList(directory / REVOKED), leaf_days)
        pki._ensure_broker_cert(hosts, broker_name, now)
        return pki

    def _ensure_broker_cert(
        self, hosts: Sequence[str], broker_name: str, now: datetime.datetime | None
    ) -> None:
        dns, ips = split_hosts(hosts)
        try:
            cert = load_cert(self.cert_file)
            load_private_key(self.key_file)
            verify_leaf(cert, [self.ca.cert], pool_id=self.pool_id, role=ROLE_BROKER, now=now)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have_dns = set(san.get_values_for_type(x509.DNSName))
            have_ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
            if (
                have_dns == set(dns)
                and have_ips == set(ips)
                and not needs_renewal(cert, now)
                and not self.revocations.is_revoked(cert.serial_number)
            ):
                return
        except PkiError:
            pass
        key = new_private_key()
        cert = self.issue(
            ROLE_BROKER, broker_name, key.public_key(), dns_names=dns, ip_addresses=ips, now=now
        )
        write_leaf(self.directory, BROKER_KEY, BROKER_CERT, key, cert)

    def issue(
        self,
        role: str,
        name: str,
        public_key: ed25519.Ed25519PublicKey,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """Issue a leaf and record it in ``issued`` (so it can be revoked by name)."""
        cert = self.ca.issue(
            role,
            name,
            public_key,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            days=self.leaf_days,
            now=now,
        )
        entry = IssuedCert(
            cert.serial_number,
            role,
            name,
            cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        path = self.directory / ISSUED
        old = path.read_text() if path.exists() else ""
        write_public(path, (old + entry.line()).encode())
        return cert

    def ssh_host_ca(self) -> ed25519.Ed25519PrivateKey:
        """The pool's OpenSSH host CA key (``ssh_host_ca.key``, 0600), made on first use.

        A key of its own, not the X.509 CA's: one key never signs two formats."""
        path = self.directory / SSH_HOST_CA
        if path.exists():
            return load_private_key(path)
        key = new_private_key()
        write_private(path, private_key_pem(key))
        return key

    def ssh_host_ca_line(self) -> str:
        """The OpenSSH public line of ``ssh_host_ca`` (for ``@cert-authority``)."""
        return (
            self.ssh_host_ca()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode("ascii")
        )

    def host_certificate(
        self,
        host_key: str,
        principals: Sequence[str],
        key_id: str,
        now: datetime.datetime | None = None,
    ) -> str:
        """An OpenSSH host certificate for the public key line ``host_key``, valid for the
        host names ``principals`` only, signed by ``ssh_host_ca``; ``PkiError`` for a bad key."""
        try:
            public = serialization.load_ssh_public_key(host_key.encode("ascii"))
        except (ValueError, UnicodeEncodeError, TypeError) as exc:
            raise PkiError(f"not an OpenSSH public key: {exc}") from None
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise PkiError("session host keys are ed25519")
        start = int((now or _utcnow()).timestamp())
        cert = (
            serialization.SSHCertificateBuilder()
            .public_key(public)
            .serial(secrets.randbits(64))
            .type(serialization.SSHCertificateType.HOST)
            .key_id(key_id.encode("utf-8"))
            .valid_principals([p.encode("utf-8") for p in principals])
            .valid_after(start - int(BACKDATE.total_seconds()))
            .valid_before(start + HOST_CERT_SECONDS)
            .sign(self.ssh_host_ca())
        )
        return cert.public_bytes().decode("ascii")

    def issued(self) -> list[IssuedCert]:
        path = self.directory / ISSUED
        return _parse_ledger(path.read_text(), path) if path.exists() else []

    def revoke(self, role: str, name: str) -> list[int]:
        """Revoke every certificate ever issued to ``role``/``name``; the serials revoked.

        A name enrolled again later (with a new token) gets a new serial and works again.
        """
        serials = [c.serial for c in self.issued() if c.role == role and c.name == name]
        if serials:
            self.revocations.revoke(serials, note=f"{role} {name}")
        return serials


def split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a list of host names and addresses."""
    dns: list[str] = []
    ips: list[str] = []
    for h in hosts:
        try:
            ips.append(str(ipaddress.ip_address(h)))
        except ValueError:
            dns.append(h)
    return dns, ips


@attrs.frozen
class StarterPki:
    """What a starter keeps in its ``<state>/pki`` after enrolment: CA, its key and certificate."""

    directory: pathlib.Path
    pool_id: str
    name: str

    @property
    def ca_file(self) -> pathlib.Path:
        return self.directory / CA_CERT

    @property
    def cert_file(self) -> pathlib.Path:
        return self.directory / STARTER_CERT

    @property
    def key_file(self) -> pathlib.Path:
        return self.directory / STARTER_KEY

    @classmethod
    def save(
        cls,
        directory: pathlib.Path,
        key: ed25519.Ed25519PrivateKey,
        cert: x509.Certificate,
        ca_certs: Sequence[x509.Certificate],
    ) -> StarterPki:
        """Store an enrolment's result (after ``verify_leaf`` checked it)."""
        ident = identity_of(cert)
        private_dir(directory)
        write_public(directory / CA_CERT, b"".join(cert_pem(c) for c in ca_certs))
        write_leaf(directory, STARTER_KEY, STARTER_CERT, key, cert)
        return cls(directory, ident.pool_id, ident.name)

    @classmethod
    def load(cls, directory: pathlib.Path, now: datetime.datetime | None = None) -> StarterPki:
        """The enrolled identity in ``directory``, checked; ``PkiError`` if not enrolled."""
        cas = load_ca_bundle(directory / CA_CERT)
        cert = load_cert(directory / STARTER_CERT)
        key = load_private_key(directory / STARTER_KEY)
        if public_key_pem(key.public_key()) != public_key_pem(_ed25519_public(cert)):
            raise PkiError(f"{directory / STARTER_KEY} does not match {STARTER_CERT}")
        pool_id = pool_id_of_ca(cas[0])
        ident = verify_leaf(cert, cas, pool_id=pool_id, role=ROLE_STARTER, now=now)
        return cls(directory, pool_id, ident.name)


def _ed25519_public(cert: x509.Certificate) -> ed25519.Ed25519PublicKey:
    pub = cert.public_key()
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise PkiError("certificate key is not Ed25519")
    return pub
