"""Security promises of a session: who gets in, which capabilities open one, which host key
the client trusts, that nothing listens, and that no key travels in argv or the environment.

Real processes throughout: a pool (broker + starter), real sshd/ssh, real uids. The
capability tests drive the session protocol from this (root) process with ``BrokerClient``:
root is a queue superuser, so the broker grants it sessions into the test users' jobs.
"""

from __future__ import annotations

import base64
import os
import pathlib
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, cast

import attrs
import pytest
import trio
from conftest import ROOT, SSH_TO_JOB, Pool, User, new_state_dir, session_entries
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import ssh_to_job.starter._session as _session
from ssh_to_job import common, wire
from ssh_to_job.client._broker import BrokerClient
from ssh_to_job.client.ssh_to_job import (
    SessionError,
    generate_key,
    hand_over,
    open_session,
    ssh_config,
)
from ssh_to_job.starter import Starter
from ssh_to_job.starter._jobs import Job, JobPlan
from ssh_to_job.starter._session import _check_capability
from ssh_to_job.wire import lean

#: Hard limit for any one test (SIGALRM): pytest-timeout is not installed.
TEST_DEADLINE = 60
IO_TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    def expire(_sig: int, _frame: object) -> None:
        raise TimeoutError(f"test exceeded its {TEST_DEADLINE} s deadline")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_DEADLINE)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_open_sockets: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Session sockets a failed test left open are closed (no ResourceWarning noise)."""
    yield
    while _open_sockets:
        _open_sockets.pop().close()


@pytest.fixture
def run_job(pool: Pool) -> Iterator[Callable[..., str]]:
    """Submit a job, wait until it runs; every job is removed after the test."""
    made: list[str] = []

    def start(user: User, *argv: str) -> str:
        (job,) = pool.submit(user, *argv)
        made.append(job)
        pool.wait_state(job, "running")
        return job

    yield start
    if made:
        pool.stj(ROOT, "rm", *made, check=False)


@pytest.fixture
def user_tmp() -> Iterator[Callable[[User], pathlib.Path]]:
    """A private $TMPDIR per user, so ssh-to-job's session dirs are this test's alone."""
    made: list[pathlib.Path] = []

    def make(user: User) -> pathlib.Path:
        d = pathlib.Path(tempfile.mkdtemp(prefix="stjt-tmp-", dir="/tmp"))
        os.chown(d, user.uid, user.gid)
        made.append(d)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- protocol helpers


def get_grant(
    pool: Pool, job: str, public: str | None = None
) -> tuple[wire.SshGrant, socket.socket]:
    """Ask the broker (as root, a superuser) for a session; the grant and the session socket."""
    if public is None:
        _private, public = generate_key("")
    with BrokerClient(pool.state / "broker.sock", timeout=IO_TIMEOUT) as bc:
        reply, fd = bc.ssh(wire.SshRequest(job=job, client_key=public))
    assert isinstance(reply, wire.SshGrant), reply
    assert fd is not None
    sock = socket.socket(fileno=fd)
    sock.settimeout(IO_TIMEOUT)
    _open_sockets.append(sock)
    return reply, sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def present(sock: socket.socket, capability: bytes) -> tuple[wire.Message, wire.Connection]:
    """Send SessionOpen with ``capability``; the starter's one answer (Error or SessionReady)."""
    conn = wire.Connection(wire.Channel.SESSION, wire.Role.CLIENT, wire.Role.STARTER)
    sock.sendall(conn.send(wire.SessionOpen(capability=capability)))
    header = _recv_exact(sock, wire.FRAME_HEADER.size)
    (length,) = wire.FRAME_HEADER.unpack(header)
    conn.receive_data(header + _recv_exact(sock, length))
    msg = conn.next_event()
    assert isinstance(msg, wire.Message), msg
    return msg, conn


def refused(sock: socket.socket, capability: bytes) -> str:
    """Present ``capability``, expect a refusal and a closed socket; the refusal's text."""
    msg, _conn = present(sock, capability)
    assert isinstance(msg, wire.Error), f"the starter accepted the capability: {msg}"
    assert sock.recv(1) == b"", "the starter kept a refused session socket open"
    sock.close()
    return msg.message


def broker_seed(pool: Pool) -> bytes:
    return bytes.fromhex((pool.state / "keys" / "broker.key").read_text().strip())


def decode_cap(blob: bytes) -> wire.Capability:
    return wire.Capability.decode(blob[:-64])  # the wire form ends in a 64-byte signature


def sessions_dir(pool: Pool) -> pathlib.Path:
    return pool.state / "execute" / ".sessions"


def wait_no_session_dirs(pool: Pool, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(sessions_dir(pool).iterdir()):
        assert time.monotonic() < deadline, f"left behind: {list(sessions_dir(pool).iterdir())}"
        time.sleep(0.05)


def run_ssh(
    sock: socket.socket,
    ready: wire.SessionReady | lean.SessionReady,
    private: bytes,
    d: pathlib.Path,
    command: str,
    known_key: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Real ssh over an opened session socket, with ssh-to-job's own ssh_config and fd handover.

    ``private`` is the identity ssh offers; ``known_key`` the host key pinned for the alias
    (default: the one the starter signed).
    """
    alias = "ssh-to-job-test"
    d.mkdir(mode=0o700)
    (d / "known_hosts").write_text(f"{alias} {known_key or ready.host_key}\n")
    fd = os.open(d / "id", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, private)
    os.close(fd)
    proxy_name = f"stjt-{secrets.token_hex(8)}"
    (d / "config").write_text(ssh_config(d, ready.login, alias, proxy_name, None, False))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + proxy_name)
    listener.listen(1)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
    }
    child = subprocess.Popen(
        ["ssh", "-F", str(d / "config"), alias, command],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with listener:
        handed = hand_over(listener, sock, child)
    sock.close()
    out, err = child.communicate(timeout=IO_TIMEOUT)
    assert handed, f"ssh never fetched the session socket: {err!r}"
    return subprocess.CompletedProcess(child.args, child.returncode, out.decode(), err.decode())


# ---------------------------------------------------------------------------- live sessions


class Live:
    """A real ``ssh-to-job JOB 'echo ready; sleep 30'`` in the background, once it is in."""

    def __init__(
        self,
        pool: Pool,
        user: User,
        job: str,
        tmp: pathlib.Path,
        command: str = "echo ready; exec sleep 30",
    ) -> None:
        self.proc = subprocess.Popen(
            [*user.prefix(), SSH_TO_JOB, job, command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/tmp",
            env=pool.env(user, {"TMPDIR": str(tmp)}),
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, "the session's command did not start"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 64)
                if not chunk:
                    _out, err = self.proc.communicate(timeout=IO_TIMEOUT)
                    raise AssertionError(f"ssh-to-job ended ({self.proc.returncode}): {err!r}")
                line += chunk
        assert line == b"ready\n", line
        (self.client_dir,) = session_entries(tmp / f"ssh-to-job-{user.uid}")
        self.alias, *pinned = (self.client_dir / "known_hosts").read_text().split()
        # The starter's directory of this session: the one whose host key the client pinned.
        (self.starter_dir,) = [
            p for p in sessions_dir(pool).iterdir() if _public_key(p / "host_key") == pinned
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=IO_TIMEOUT)


def _public_key(private: pathlib.Path) -> list[str]:
    """A private key file's public key as ``ssh-keygen -y`` says it (type and base64)."""
    r = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=False
    )
    return r.stdout.split()[:2]


def descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_bytes()
            except OSError:
                continue
            # comm may hold spaces and parentheses: the fields after the last ")" are plain.
            ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def comm(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------- who gets in


def test_other_user_is_refused_naming_the_owner(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str]
) -> None:
    """Another ordinary user gets exit 1 and a message naming the job's owner, and no session."""
    a, b = users["a"], users["b"]
    job = run_job(a, "/bin/sleep", "300")
    r = pool.ssh(b, job, "id -u", timeout=IO_TIMEOUT)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"job {job} belongs to {a.name}" in r.stderr
    assert "only its owner, a queue superuser or a user it names" in r.stderr
    assert r.stdout == ""
    assert not any(sessions_dir(pool).iterdir())


@pytest.mark.parametrize("who", ["su", "root"])
def test_queue_superuser_gets_in_as_the_job_uid(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str], who: str
) -> None:
    """A queue superuser (configured, and root) gets a session, and it runs as the job's uid."""
    a = users["a"]
    job = run_job(a, "/bin/sleep", "300")
    r = pool.ssh(users[who], job, "id -u; echo $SSH_TO_JOB_ID", timeout=IO_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(a.uid), job]


# ---------------------------------------------------------------------------- capabilities


@pytest.mark.parametrize("where", ["job field", "client key", "signature"])
def test_tampered_capability_is_refused(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str], where: str
) -> None:
    """A capability with one flipped byte (in its body or its signature) opens no session."""
    job = run_job(users["a"], "/bin/sleep", "300")
    grant, sock = get_grant(pool, job)
    blob = bytearray(grant.capability)
    if where == "signature":
        pos = len(blob) - 10
    else:
        cap = decode_cap(grant.capability)
        text = (cap.job if where == "job field" else cap.client_key).encode()
        pos = bytes(blob).index(text) + len(text) // 2
    blob[pos] ^= 0x01
    assert "signature does not verify" in refused(sock, bytes(blob))
    wait_no_session_dirs(pool)


def test_capability_is_single_use(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str]
) -> None:
    """A used capability opens nothing more: not on another session's socket, not on its own."""
    job = run_job(users["a"], "/bin/sleep", "300")
    first, sock1 = get_grant(pool, job)
    _second, sock2 = get_grant(pool, job)
    assert "for another session" in refused(sock2, first.capability)
    # The first capability is good on its own socket: the refusal above was about the replay.
    ready, conn = present(sock1, first.capability)
    assert isinstance(ready, wire.SessionReady), ready
    # After session_ready the socket is raw SSH: our codec will not send a second
    # session_open, and the bytes of one go to sshd, which drops the connection.
    with pytest.raises(wire.LocalProtocolError):
        conn.send(wire.SessionOpen(capability=first.capability))
    banner = b""
    while not banner.endswith(b"\n"):
        banner += sock1.recv(1)
    assert banner.startswith(b"SSH-2.0-"), banner
    again = wire.Connection(wire.Channel.SESSION, wire.Role.CLIENT, wire.Role.STARTER)
    sock1.sendall(again.send(wire.SessionOpen(capability=first.capability)))
    data = b""
    try:
        while chunk := sock1.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # sshd hung up on the garbage before reading all of it
    assert b"session_ready" not in data
    sock1.close()
    wait_no_session_dirs(pool)


def test_starter_replay_cache_refuses_a_second_open() -> None:
    """The starter's check records each capability: the same one presented twice is a replay."""
    broker, starter_seed = wire.new_signing_key(), wire.new_signing_key()
    now = int(time.time())
    cap = wire.Capability(
        session_id="5e" * 16,
        job="7.0",
        owner_uid=4242,
        requester_uid=4242,
        client_key=generate_key("")[1],
        starter_id="s1",
        starter_key=wire.public_key_of(starter_seed),
        issued_at=now,
        expires_at=now + 30,
    )
    blob = wire.sign_capability(cap, broker)
    starter = types.SimpleNamespace(
        broker_key=wire.public_key_of(broker),
        name="s1",
        public_key=cap.starter_key,
        replay=wire.ReplayCache(),
    )
    job = types.SimpleNamespace(
        id="7.0",
        plan=types.SimpleNamespace(run=types.SimpleNamespace(uid=4242)),
        accepts_sessions=lambda: True,
    )
    check = cast("Callable[[Any, Any, str, bytes], wire.Capability]", _check_capability)
    assert check(starter, job, cap.session_id, blob) == cap
    with pytest.raises(wire.CapabilityError, match="already used"):
        check(starter, job, cap.session_id, blob)


def test_capability_for_another_job_is_refused(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str]
) -> None:
    """A capability for job J opens no session into job K, even re-signed by the broker's key."""
    a = users["a"]
    j = run_job(a, "/bin/sleep", "300")
    k = run_job(a, "/bin/sleep", "300")
    grant_j, sock_j = get_grant(pool, j)
    sock_j.close()
    _grant_k, sock_k = get_grant(pool, k)
    assert "for another session" in refused(sock_k, grant_j.capability)
    # Beyond the session id: validly signed capabilities for K's session that name another
    # job, starter or owner are refused by the starter's own checks.
    seed = broker_seed(pool)
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"job": j}, f"for job {j}, not {k}"),
        ({"starter_id": "some-other-starter"}, "for another starter"),
        ({"starter_key": wire.public_key_of(wire.new_signing_key())}, "for another starter"),
        ({"owner_uid": users["b"].uid}, "another job owner"),
        ({}, None),  # the unchanged capability opens the session: the forging itself is sound
    ]
    for change, why in cases:
        grant_k, sock_k = get_grant(pool, k)
        forged = wire.sign_capability(attrs.evolve(decode_cap(grant_k.capability), **change), seed)
        if why is None:
            ready, _conn = present(sock_k, forged)
            assert isinstance(ready, wire.SessionReady), ready
            sock_k.close()
        else:
            assert why in refused(sock_k, forged), change
    wait_no_session_dirs(pool)


def test_expired_capability_is_refused(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """With a 1 s capability lifetime, a capability presented after expiry + skew is refused."""
    pool = make_pool("capability_lifetime = 1\n")
    (job,) = pool.submit(users["a"], "/bin/sleep", "300")
    pool.wait_state(job, "running")
    fresh, sock = get_grant(pool, job)
    ready, _conn = present(sock, fresh.capability)
    assert isinstance(ready, wire.SessionReady), ready
    sock.close()
    grant, sock = get_grant(pool, job)
    cap = decode_cap(grant.capability)
    assert cap.expires_at - cap.issued_at == 1
    time.sleep(max(0.0, cap.expires_at + wire.CLOCK_SKEW + 1.2 - time.time()))
    assert "expired" in refused(sock, grant.capability)


def test_another_client_key_is_denied_by_sshd(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str], tmp_path: pathlib.Path
) -> None:
    """sshd accepts only the key the capability names: real ssh with another key is denied."""
    a = users["a"]
    job = run_job(a, "/bin/sleep", "300")
    k1_private, k1_public = generate_key("")
    k2_private, _k2_public = generate_key("")
    grant, sock = get_grant(pool, job, k1_public)
    ready = open_session(sock, grant, ())
    r = run_ssh(sock, ready, k2_private, tmp_path / "k2", "id -u")
    assert r.returncode == 255, (r.returncode, r.stdout, r.stderr)
    assert "Permission denied (publickey)" in r.stderr
    assert r.stdout == ""
    grant, sock = get_grant(pool, job, k1_public)
    ready = open_session(sock, grant, ())
    r = run_ssh(sock, ready, k1_private, tmp_path / "k1", "id -u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(a.uid)


# ---------------------------------------------------------------------------- host keys


def _fake_starter(
    sock: socket.socket, answer: wire.SessionReady, seen: list[wire.SessionOpen]
) -> None:
    conn = wire.Connection(wire.Channel.SESSION, wire.Role.STARTER, wire.Role.CLIENT)
    header = _recv_exact(sock, wire.FRAME_HEADER.size)
    (length,) = wire.FRAME_HEADER.unpack(header)
    conn.receive_data(header + _recv_exact(sock, length))
    msg = conn.next_event()
    assert isinstance(msg, wire.SessionOpen)
    seen.append(msg)
    sock.sendall(conn.send(answer))


def test_client_refuses_a_host_key_the_starter_did_not_sign() -> None:
    """open_session accepts a host key only if the starter the broker named signed it for
    this session and login."""
    starter_seed, mallory = wire.new_signing_key(), wire.new_signing_key()
    grant = wire.SshGrant(
        session_id="ab" * 16,
        job="3.0",
        capability=b"capability bytes",
        starter_id="s1",
        starter_key=wire.public_key_of(starter_seed),
    )
    host_key = generate_key("")[1]
    other_key = generate_key("")[1]

    def ready(seed: bytes, session_id: str, signed_key: str, sent_key: str) -> wire.SessionReady:
        stmt = wire.host_key_statement(session_id, "alice", signed_key)
        return wire.SessionReady(host_key=sent_key, login="alice", signature=wire.sign(seed, stmt))

    cases = {
        "signed by another key": (ready(mallory, grant.session_id, host_key, host_key), False),
        "signed for another session": (ready(starter_seed, "cd" * 16, host_key, host_key), False),
        "another host key sent": (
            ready(starter_seed, grant.session_id, host_key, other_key),
            False,
        ),
        "properly signed": (ready(starter_seed, grant.session_id, host_key, host_key), True),
    }
    for name, (answer, good) in cases.items():
        ours, theirs = socket.socketpair()
        _open_sockets.extend((ours, theirs))
        seen: list[wire.SessionOpen] = []
        t = threading.Thread(target=_fake_starter, args=(theirs, answer, seen))
        t.start()
        try:
            if good:
                assert open_session(ours, grant, (), timeout=IO_TIMEOUT).host_key == host_key
            else:
                with pytest.raises(SessionError, match="not signed by the starter"):
                    open_session(ours, grant, (), timeout=IO_TIMEOUT)
        finally:
            t.join(IO_TIMEOUT)
            ours.close()
            theirs.close()
        assert [m.capability for m in seen] == [grant.capability], name


def test_client_pins_exactly_the_signed_host_key(
    pool: Pool,
    users: dict[str, User],
    run_job: Callable[..., str],
    user_tmp: Callable[[User], pathlib.Path],
) -> None:
    """ssh-to-job's known_hosts holds only the starter's signed session key, strictly checked."""
    a = users["a"]
    job = run_job(a, "/bin/sleep", "300")
    live = Live(pool, a, job, user_tmp(a))
    try:
        private = serialization.load_ssh_private_key(
            (live.starter_dir / "host_key").read_bytes(), None
        )
        public = (
            private.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        known = live.client_dir / "known_hosts"
        assert known.read_text() == f"{live.alias} {public}\n"
        config = (live.client_dir / "config").read_text()
        for line in (
            f"HostKeyAlias {live.alias}",
            f'UserKnownHostsFile "{known}"',
            f'GlobalKnownHostsFile "{known}"',
            "StrictHostKeyChecking yes",
        ):
            assert f"\n  {line}\n" in config, line
    finally:
        live.stop()


def test_ssh_refuses_a_host_key_other_than_the_pinned_one(
    pool: Pool, users: dict[str, User], run_job: Callable[..., str], tmp_path: pathlib.Path
) -> None:
    """With ssh-to-job's ssh_config, real ssh refuses a session whose host key is not pinned."""
    job = run_job(users["a"], "/bin/sleep", "300")
    private, public = generate_key("")
    grant, sock = get_grant(pool, job, public)
    ready = open_session(sock, grant, ())
    r = run_ssh(sock, ready, private, tmp_path / "s", "true", known_key=generate_key("")[1])
    assert r.returncode == 255, (r.returncode, r.stderr)
    assert "Host key verification failed" in r.stderr


# ---------------------------------------------------------------------------- no listeners


_SS_PID = re.compile(r"pid=(\d+)")


def listeners_by_ss() -> dict[int, list[str]]:
    out = subprocess.run(
        ["ss", "-Hlnp", "-A", "tcp,udp,raw,unix_stream,unix_seqpacket,unix_dgram"],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,
        check=True,
    ).stdout
    found: dict[int, list[str]] = {}
    for line in out.splitlines():
        for pid in _SS_PID.findall(line):
            found.setdefault(int(pid), []).append(line)
    return found


def listeners_by_proc() -> dict[int, list[str]]:
    """pid -> listening sockets, from /proc/net (TCP LISTEN, bound UDP, listening unix)."""
    inodes: dict[str, str] = {}
    for name in ("tcp", "tcp6", "udp", "udp6"):
        lines = pathlib.Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        for line in lines:
            f = line.split()
            if name.startswith("udp") or f[3] == "0A":
                inodes[f[9]] = f"{name} {f[1]}"
    for line in pathlib.Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening unix socket
            inodes[f[6]] = "unix " + (f[7] if len(f) > 7 else "")
    found: dict[int, list[str]] = {}
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in inodes:
                found.setdefault(int(proc.name), []).append(inodes[link[8:-1]])
    return found


def session_pids(pool: Pool, job: str, live: Live) -> tuple[set[int], set[int]]:
    """The execute side (starter, its children, the job's cgroup: job and sshd processes) and
    the client side (ssh-to-job and its children) of a live session."""
    (starter,) = pool.pids("starter")
    execute = descendants({starter})
    cgroup = pathlib.Path(f"/proc/{pool.job(job)['pids'][0]}/cgroup").read_text()
    rel = next(line[3:] for line in cgroup.splitlines() if line.startswith("0::"))
    mounts = pathlib.Path("/proc/self/mounts").read_text().splitlines()
    mount = next((m.split()[1] for m in mounts if m.split()[2] == "cgroup2"), None)
    if mount is not None and "/job-" in rel:
        for procs in (pathlib.Path(mount) / rel.lstrip("/")).rglob("cgroup.procs"):
            execute |= {int(p) for p in procs.read_text().split()}
    client = descendants({live.proc.pid})
    return execute, client


def test_nothing_listens_during_a_session(
    pool: Pool,
    users: dict[str, User],
    run_job: Callable[..., str],
    user_tmp: Callable[[User], pathlib.Path],
) -> None:
    """While a session runs, no socket listens in the starter, sshd, the job or the client."""
    a = users["a"]
    job = run_job(a, "/bin/sleep", "300")
    live = Live(pool, a, job, user_tmp(a))
    try:
        execute, client = session_pids(pool, job, live)
        assert {"sshd", "sleep"} <= {comm(p) for p in execute}
        # ssh-to-job-py: the Python client the compiled ssh-to-job front execs (same pid).
        assert {"ssh", "ssh-to-job-py"} <= {comm(p) for p in client}
        (broker,) = pool.pids("broker")
        for found in (listeners_by_ss(), listeners_by_proc()):
            assert broker in found, "the check sees no listener even in the broker"
            bad = {p: found[p] for p in (execute | client) if p in found}
            assert not bad, bad
    finally:
        live.stop()


# ---------------------------------------------------------------------------- session dirs


async def test_starter_follows_no_link_its_job_owner_plants(
    users: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink the job's owner plants in its (owner-owned) session dir while the starter sets
    it up makes the starter, root, neither truncate nor chown the file it points to."""
    a = users["a"]
    state = new_state_dir()
    vault = pathlib.Path(tempfile.mkdtemp(prefix="stjt-vault-", dir="/tmp"))
    victim = vault / "precious"
    victim.write_text("root's data\n")
    victim.chmod(0o644)
    try:
        config = common.PoolConfig(starter=common.StarterConfig(name="t-links", use_shim=False))
        starter = Starter(state, config)
        starter.sessions_dir.mkdir(parents=True, mode=0o711)
        spec = wire.JobSpec(executable="/bin/true")
        run = wire.JobRun(id="1.0", uid=a.uid, gid=a.gid, owner="a", spec=spec)
        plan = JobPlan(run, (a.gid,), {}, state, state / "out", state / "err", None)
        job = Job(plan, starter.post, pid=os.getpid())
        session_id = secrets.token_hex(16)
        make_host_key = _session.make_host_key

        def plant_then_make_key() -> tuple[bytes, str]:
            # The window an owner racing the starter hits (its job knows the session id once
            # the owner asks): the session dir exists and is the owner's already.
            link = starter.sessions_dir / session_id[:16] / "sshd.log"
            os.symlink(victim, link)
            os.lchown(link, a.uid, a.gid)
            return make_host_key()

        monkeypatch.setattr(_session, "make_host_key", plant_then_make_key)
        cap = wire.Capability(
            session_id=session_id,
            job=job.id,
            owner_uid=a.uid,
            requester_uid=a.uid,
            client_key=generate_key("")[1],
            starter_id=starter.name,
            starter_key=starter.public_key,
            issued_at=0,
            expires_at=0,
        )
        msg = wire.SessionOpen(capability=b"checked already")
        conn = wire.Connection(wire.Channel.SESSION, wire.Role.STARTER, wire.Role.CLIENT)
        conn.receive_data(
            wire.Connection(wire.Channel.SESSION, wire.Role.CLIENT, wire.Role.STARTER).send(msg)
        )
        assert conn.next_event() == msg
        ours, theirs = trio.socket.socketpair()
        with trio.fail_after(IO_TIMEOUT), theirs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_session._serve, starter, job, session_id, cap, msg, ours, conn)
                first = await theirs.recv(65536)
                theirs.close()  # so that an sshd, had one started, sees the end at once
        st = victim.stat()
        assert (victim.read_text(), st.st_uid, stat.S_IMODE(st.st_mode)) == (
            "root's data\n",
            0,
            0o644,
        ), "the starter wrote through the planted link"
        assert b"session set-up failed" in first, first
        assert not (starter.sessions_dir / session_id[:16]).exists()
    finally:
        shutil.rmtree(vault, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------------------- secrets


def _secret_strings(key_file: pathlib.Path) -> list[bytes]:
    """Pieces of a private key that must never appear in argv or an environment."""
    pem = key_file.read_bytes()
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    key = serialization.load_ssh_private_key(pem, None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return [
        *(b[:40] for b in body),
        b"".join(body)[:60],
        raw.hex().encode(),
        base64.b64encode(raw)[:40],
    ]


def test_no_key_material_in_argv_or_environment(
    pool: Pool,
    users: dict[str, User],
    run_job: Callable[..., str],
    user_tmp: Callable[[User], pathlib.Path],
) -> None:
    """Neither the client's nor the host's private key is in any process's argv or environment."""
    a = users["a"]
    job = run_job(a, "/bin/sleep", "300")
    live = Live(pool, a, job, user_tmp(a))
    try:
        secrets_ = _secret_strings(live.client_dir / "id") + _secret_strings(
            live.starter_dir / "host_key"
        )
        execute, client = session_pids(pool, job, live)
        scanned: set[int] = set()
        for proc in pathlib.Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                blobs = [(proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()]
            except OSError:
                continue
            scanned.add(int(proc.name))
            for blob in blobs:
                leaked = [s for s in secrets_ if s in blob]
                assert not leaked, f"pid {proc.name} ({comm(int(proc.name))}) carries key material"
        names = {comm(p) for p in scanned & (execute | client)}
        assert {"ssh-to-job-py", "ssh", "sshd", "sleep"} <= names, names
        # The proxy has come and gone: its argv is the ProxyCommand line of the client config.
        proxy = next(
            line
            for line in (live.client_dir / "config").read_text().splitlines()
            if "ProxyCommand" in line
        )
        assert not [s for s in secrets_ if s.decode() in proxy]
    finally:
        live.stop()
