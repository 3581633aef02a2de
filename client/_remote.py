"""The remote client: ``ssh-to-job -pool BROKER:PORT`` from a host that is not the broker's.

What a laptop keeps, in ``~/.config/ssh-to-job/`` (0700):

* ``client_ed25519`` (0600) and ``.pub``: the client key its user registered once on a host
  of the pool (``stj keys add``); made here on first use (``stj keys show``). Its private half
  never leaves the laptop.
* ``pools/HOST_PORT.crt``: the pool CA certificate, brought over by the user from a host of
  the pool (``stj pool-ca`` there, ``stj pool-ca --trust HOST:PORT`` here). The broker's TLS
  certificate must chain to it, name the broker role, and the pool id in it is what every
  request is signed for. Nothing is ever trusted on first use: without this file we refuse.

One session: TLS 1.3 to the broker (no client certificate), ``remote_hello``, the broker's
fresh nonce, ``remote_ssh`` signed by the client key over (pool id, nonce, job, session key,
client key); the ``ssh_grant`` comes back inside TLS, both ends leave TLS, and the same socket
now reaches the starter through the broker's kernel relay. From there it is the local path:
``session_open``, the starter's signed host key, ssh with the socket passed by fd.

This module imports only the standard library and ``wire`` (start-up stays lean) and never
writes a key anywhere but a 0600 file in a 0700 directory.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import ssl
import sys

from ssh_to_job import common, wire

from ._broker import BrokerUnavailable

KEY_NAME = "client_ed25519"
#: The line of ``stj pool-ca``'s output that carries the pool's OpenSSH host CA.
SSH_CA_TAG = "ssh-host-ca:"
#: Seconds for the TCP connect, the TLS handshake and each answer of the broker.
TIMEOUT = 30.0


class RemoteError(BrokerUnavailable):
    """A remote pool cannot be used; the message is one line for a person."""


def config_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    d = pathlib.Path(base) / "ssh-to-job"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if d.stat().st_mode & 0o077:
        d.chmod(0o700)
    return d


def parse_pool(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (the default port) or ``[V6]:PORT``; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, str(common.DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"-pool wants BROKER:PORT, not {text!r}")
    return host, int(port)


def pool_label(host: str, port: int) -> str:
    return f"{host}_{port}".replace("/", "_")


def ca_path(host: str, port: int, d: pathlib.Path | None = None) -> pathlib.Path:
    return (d or config_dir()) / "pools" / f"{pool_label(host, port)}.crt"


def known_hosts_path(host: str, port: int, d: pathlib.Path | None = None) -> pathlib.Path:
    """The pool's ``@cert-authority`` known_hosts (plain ssh checks host certificates)."""
    return (d or config_dir()) / "pools" / f"{pool_label(host, port)}.known_hosts"


def client_key(d: pathlib.Path | None = None) -> tuple[bytes, str]:
    """(seed, public line) of this user's client key, made on first use."""
    d = d or config_dir()
    private, pub = d / KEY_NAME, d / f"{KEY_NAME}.pub"
    if not private.exists():
        priv_bytes, public = wire.ed25519_keypair()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, priv_bytes)
        finally:
            os.close(fd)
        pub.write_text(f"{public} ssh-to-job@{socket.gethostname()}\n")
    seed = wire.ed25519_seed(private.read_bytes())
    return seed, wire.ed25519_line(wire.public_key_of(seed))


def ca_fingerprint(pem: str) -> str:
    """SHA-256 of the first certificate's DER, as ``openssl x509 -fingerprint -sha256``."""
    first = pem.strip().split(ssl.PEM_FOOTER)[0] + ssl.PEM_FOOTER
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def trust(host: str, port: int, pem: str) -> pathlib.Path:
    """Keep ``pem`` as the CA of the pool at ``host:port``; ValueError if it is no certificate."""
    try:
        ssl.create_default_context(cadata=pem)
        ca_fingerprint(pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"not a PEM CA certificate: {exc}") from None
    ssh_ca = [
        line[len(SSH_CA_TAG) :].strip() for line in pem.splitlines() if line.startswith(SSH_CA_TAG)
    ]
    if len(ssh_ca) > 1 or (ssh_ca and not ssh_ca[0].startswith("ssh-ed25519 ")):
        raise ValueError(f"the file's {SSH_CA_TAG} line is not one ssh-ed25519 key")
    path = ca_path(host, port)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    for target, text in (
        (path, pem),
        # Only host names job-*: the pool's CA vouches for sessions, for nothing else.
        (known_hosts_path(host, port), f"@cert-authority job-* {ssh_ca[0]}\n" if ssh_ca else ""),
    ):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return path


def _context(ca: pathlib.Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # The CA is the pool's own: the broker is found by its role and pool id in a certificate
    # of that CA, whatever address reached it (as for starters).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


def _broker_pool_id(tls: ssl.SSLSocket, where: str) -> str:
    cert = tls.getpeercert() or {}
    alt: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    uris = [v for k, v in alt if k == "URI" and v.startswith("stj:")]
    try:
        if len(uris) != 1:
            raise ValueError("no single stj:// identity")
        peer = wire.parse_peer_uri(uris[0])
    except ValueError as exc:
        raise RemoteError(
            f"{where} presented a certificate that is not a broker's ({exc})"
        ) from None
    if peer.role != wire.ROLE_BROKER:
        raise RemoteError(f"{where} presented a {peer.role} certificate, not the broker's")
    return peer.pool_id


def _receive(tls: ssl.SSLSocket, conn: wire.Connection, where: str) -> wire.Message:
    while True:
        event = conn.next_event()
        if isinstance(event, wire.Message):
            return event
        if event is wire.CLOSED:
            raise RemoteError(f"the broker at {where} closed the connection")
        try:
            data = tls.recv(65536)
        except (OSError, ssl.SSLError) as exc:
            raise RemoteError(f"lost the broker at {where}: {exc}") from None
        conn.receive_data(data)


def request_session(
    pool: str, job: str, session_key: str, timeout: float = TIMEOUT
) -> tuple[wire.Message, int | None]:
    """Ask the pool at ``pool`` for a session into ``job`` for ``session_key``.

    Returns the broker's answer and, with a grant, the file descriptor of the session socket
    (out of TLS, relayed by the broker to the starter). ``RemoteError`` (one line) when the
    pool cannot be used at all.
    """
    try:
        host, port = parse_pool(pool)
    except ValueError as exc:
        raise RemoteError(str(exc)) from None
    where = f"{host}:{port}"
    d = config_dir()
    ca = ca_path(host, port, d)
    if not ca.exists():
        raise RemoteError(
            f"no pool CA for {where}: on a host of the pool run 'stj pool-ca > pool-ca.pem', "
            f"bring the file here and run 'stj pool-ca --trust {where} pool-ca.pem'"
        )
    try:
        seed, public = client_key(d)
    except (OSError, ValueError) as exc:
        raise RemoteError(f"cannot use the client key in {d}: {exc}") from None
    try:
        ctx = _context(ca)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteError(f"cannot use the pool CA {ca}: {exc}") from None
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise RemoteError(f"cannot reach the broker at {where}: {exc.strerror or exc}") from None
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        raise RemoteError(
            f"the broker at {where} is not the pool whose CA you trusted "
            f"({exc.verify_message}); refusing to talk to it"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        raise RemoteError(f"TLS with the broker at {where} failed: {exc}") from None
    keep = False
    try:
        pool_id = _broker_pool_id(tls, where)
        conn = wire.Connection(wire.Channel.REMOTE, wire.Role.CLIENT, wire.Role.BROKER)
        tls.sendall(conn.send(wire.RemoteHello()))
        challenge = _receive(tls, conn, where)
        if isinstance(challenge, wire.Error):
            return challenge, None
        assert isinstance(challenge, wire.RemoteChallenge)
        if challenge.pool_id != pool_id:
            raise RemoteError(f"the broker at {where} answers for another pool; refusing")
        statement = wire.remote_request_statement(
            pool_id, challenge.nonce, job, session_key, public
        )
        tls.sendall(
            conn.send(
                wire.RemoteSsh(
                    job=job,
                    client_key=session_key,
                    key=public,
                    signature=wire.sign(seed, statement),
                )
            )
        )
        reply = _receive(tls, conn, where)
        if not isinstance(reply, wire.SshGrant):
            return reply, None
        if conn.trailing_data:
            raise RemoteError(f"the broker at {where} sent bytes after the grant")
        try:
            plain = tls.unwrap()
        except (OSError, ssl.SSLError) as exc:
            raise RemoteError(f"leaving TLS with the broker at {where} failed: {exc}") from None
        plain.settimeout(None)
        keep = True
        return reply, plain.detach()
    except wire.ProtocolError as exc:
        raise RemoteError(f"the broker at {where} sent something unreadable: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise RemoteError(f"lost the broker at {where}: {exc}") from None
    finally:
        if not keep:
            tls.close()


# ---------------------------------------------------------------------------- stj commands


def cmd_keys_show() -> int:
    """``stj keys show``: this user's client public key (made now if there is none)."""
    d = config_dir()
    _seed, public = client_key(d)
    print(public)
    print(
        f"stj: your client key ({wire.ssh_fingerprint(public)}, {d / KEY_NAME}); register it "
        "on a host of the pool with: stj keys add < client_ed25519.pub",
        file=sys.stderr,
    )
    return 0


def cmd_trust(pool: str, source: str) -> int:
    """``stj pool-ca --trust HOST:PORT FILE``: keep the CA the user brought from the pool."""
    try:
        host, port = parse_pool(pool)
        if source == "-":
            pem = sys.stdin.read()
        else:
            pem = pathlib.Path(source).read_text()
        path = trust(host, port, pem)
    except (ValueError, OSError) as exc:
        print(f"stj: {exc}", file=sys.stderr)
        return 1
    print(f"trusted the pool CA {ca_fingerprint(pem)} for {host}:{port} ({path})")
    return 0
