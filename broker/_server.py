"""The broker daemon: its state directory, its lock, and the parts wired together.

The parts: ``_lifecycle`` (the job lifecycle as a table, no I/O), ``_jobs`` (that table applied
to the SQLite queue and told to starters), ``_rendezvous`` (capabilities and session sockets),
``_connections`` (listeners, limits, local clients, starters' control channels). This module
only owns what lives as long as the daemon: the state dir (one broker per state dir, by an
exclusive lock), the signing key, the queue and the listening sockets.

The broker never trusts a starter's word about a job it does not run, and never tells a client
about a job it may not see.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import pathlib
import pwd
import resource
import socket
import time
from collections.abc import Callable

import trio

from ssh_to_job import common, transport, wire

from ._connections import Connections
from ._jobs import Jobs
from ._queue import JobQueue
from ._rendezvous import Rendezvous

log = logging.getLogger("stj.broker")


class StateDirBusy(RuntimeError):
    """Another broker holds this state directory."""


def lock_state_dir(state_dir: pathlib.Path) -> int:
    """Take ``<state>/broker.lock`` for the life of the process; its fd, with our pid in it.

    Two brokers on one state dir would take over each other's socket and run jobs twice; the
    second one must stop before it touches anything.
    """
    path = state_dir / "broker.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with contextlib.suppress(OSError, ValueError):
            holder = os.pread(fd, 32, 0).decode().strip()
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise StateDirBusy(
            f"a broker ({who}) is already running on {state_dir}; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: connections are capped by config, not by 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Broker:
    def __init__(
        self,
        state_dir: pathlib.Path,
        config: common.PoolConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.config = config
        self.bc = config.broker
        #: Wall-clock time, only for what is stored (timestamps, capability expiry); every
        #: timeout runs on trio's clock.
        self.clock = clock
        self._lock_fd = lock_state_dir(state_dir)
        try:
            common.private_dir(state_dir / "keys")
            # Job users traverse it to the broker's socket; secrets live in keys/ (0700).
            os.chmod(state_dir, 0o755)  # noqa: S103
            self.signing_key = common.load_or_create_key(state_dir / "keys" / "broker.key")
            self.public_key = wire.public_key_of(self.signing_key)
            self.host, self.port = listen_address(self.bc)
            # The pool CA and the broker's TLS certificate: made on first start, kept after.
            self.pki = common.BrokerPki.open(
                pathlib.Path(self.bc.pki_dir) if self.bc.pki_dir else state_dir / "pki",
                hosts=self.bc.cert_hosts or cert_hosts_for(self.host),
                leaf_days=self.bc.cert_days,
            )
            self.queue = JobQueue(state_dir / "queue.db")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._superusers = self._resolve_superusers()
        self.jobs = Jobs(self.queue, self.bc, self.is_superuser, clock)
        self.rendezvous = Rendezvous(
            self.signing_key,
            self.bc.capability_lifetime,
            self.bc.session_timeout,
            self._starter_key,
            clock,
        )
        self.connections = Connections(
            self.bc, self.jobs, self.rendezvous, self.queue, self.signing_key, self.is_revoked
        )
        c = self.connections
        c.pki = self.pki
        c.book = common.TokenBook.load(self.pki.tokens_file)
        c.save_book = lambda: c.book.save(self.pki.tokens_file)
        c.clock = clock
        seen_file = state_dir / "starters.json"
        c.last_seen = _load_seen(seen_file)
        c.save_seen = lambda: common.write_public(
            seen_file, json.dumps(c.last_seen, sort_keys=True).encode() + b"\n"
        )
        self.socket_path = state_dir / "broker.sock"
        self.tcp_port = 0

    def _resolve_superusers(self) -> set[int]:
        out = {0}
        for name in self.bc.superusers:
            if name.isascii() and name.isdigit():
                out.add(int(name))
                continue
            try:
                out.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                log.warning("superuser %r has no passwd entry; ignored", name)
        return out

    def is_superuser(self, uid: int) -> bool:
        return uid in self._superusers

    def _starter_key(self, name: str) -> bytes | None:
        conn = self.jobs.starters.get(name)
        return conn.key if conn is not None else None

    def is_revoked(self, serial: int) -> bool:
        return self.pki.revocations.is_revoked(serial)

    def close(self) -> None:
        self.queue.close()
        os.close(self._lock_fd)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._serve(task_status)
        finally:
            self.close()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            await unix.bind(str(self.socket_path))
            # Anyone may connect: who they are comes from SO_PEERCRED on every connection.
            os.chmod(self.socket_path, 0o666)  # noqa: S103
            unix.listen(512)
            c = self.connections
            # Certificates are optional in the handshake: remote clients have none (they sign
            # with a registered key, see _relay) and enrolling starters have none yet; every
            # other first frame requires a starter certificate (handle_tls).
            ctx = transport.server_context(
                self.pki.cert_file, self.pki.key_file, self.pki.ca_file, allow_enrollment=True
            )
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    functools.partial(
                        transport.serve_tls,
                        c.handle_tls,
                        self.port,
                        ctx,
                        host=self.host,
                        pool_id=self.pki.pool_id,
                        roles={wire.ROLE_STARTER},
                        is_revoked=self.is_revoked,
                        allow_anonymous=True,
                        handshake_timeout=self.bc.handshake_timeout,
                        farewell=_farewell,
                        max_handshakes=self.bc.max_connections,
                        max_handshakes_per_peer=self.bc.max_connections_per_uid,
                    )
                )
                self.tcp_port = listeners[0].socket.getsockname()[1]
                # Atomically: a starter may be reading it to redial.
                common.write_public(
                    self.state_dir / "broker.addr", f"{self.host}:{self.tcp_port}\n".encode()
                )
                log.info(
                    "broker listening on %s and %s:%d (TLS 1.3, pool %s)",
                    self.socket_path,
                    self.host,
                    self.tcp_port,
                    self.pki.pool_id,
                )
                nursery.start_soon(c.accept_loop, unix, c.handle_client)
                task_status.started()


def _farewell(exc: transport.TlsRefused) -> bytes:
    """What a peer refused after its handshake reads (a revoked starter sees why)."""
    conn = wire.Connection(wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER)
    code = "revoked" if "revoked" in exc.reason else "refused"
    return conn.farewell(wire.Error(code, exc.reason))


def _load_seen(path: pathlib.Path) -> dict[str, float]:
    """Last-seen times saved by an earlier run (a damaged file is only a loss of history)."""
    try:
        raw = json.loads(path.read_text())
        return {str(k): float(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def listen_address(bc: common.BrokerConfig) -> tuple[str, int]:
    """(host, port) the TLS port listens on: ``listen`` (HOST:PORT) if set, else host/port."""
    if not bc.listen:
        return bc.host, bc.port
    host, sep, port = bc.listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, not {bc.listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def cert_hosts_for(host: str) -> list[str]:
    """The broker certificate's names when the config gives none: the listen address and
    this host's name (a wildcard address names no one)."""
    names = [socket.gethostname()]
    if host not in ("", "0.0.0.0", "::"):
        names.insert(0, host)
    return names
