"""One ssh session into a job, on the execute side.

The starter dials a new TLS connection to the broker (the execute host opens no port), whose
certificate proves it is the starter the broker asked, names the session, leaves TLS (both
sides exchange close_notify) and waits for the client's capability on that same bare socket.
It checks the capability (broker signature, time window, single use, this session, this
starter, this job, still running), makes an ephemeral ed25519 host key, signs it with its
identity key, and execs ``sshd -i`` on the socket as the job's uid. sshd never listens; no
Python process touches a byte of the SSH stream.

Must never: accept a capability for another job or starter; leave a key file behind; load the
shim into anything but sshd; let anything read past the capability frame (those bytes belong
to sshd).
"""

from __future__ import annotations

import itertools
import logging
import os
import pathlib
import pwd
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ssh_to_job import common, preload, wire
from ssh_to_job.transport import PeerClosed, PeerGone, receive_one_frame_exact

from . import _persist, _procs, _spawn, _sshdlog

if TYPE_CHECKING:
    from ._daemon import Starter
    from ._jobs import Job

log = logging.getLogger("stj.starter")

_BAD_SHELLS = ("nologin", "false")
#: Seconds sshd (with the shim loaded) has to take its configuration and answer.
SHIM_TIMEOUT = 10.0


class SessionRefused(Exception):
    """The session cannot go ahead; the message goes to the client."""


def login_name(uid: int) -> tuple[str, pwd.struct_passwd | None]:
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return f"u{uid}", None
    return pw.pw_name, pw


def choose_shell(wanted: tuple[str, ...], pw: pwd.struct_passwd | None) -> str:
    """The first requested shell that exists here, else the user's own, else /bin/sh."""
    for shell in wanted:
        # sshd runs every command (the login, rsync, scp -O) through this shell: a client
        # whose $SHELL is nologin/false must not turn the session into "account not available".
        if shell.endswith(_BAD_SHELLS):
            continue
        if shell.startswith("/") and os.access(shell, os.X_OK) and os.path.isfile(shell):
            return shell
        if not shell.startswith("/"):
            found = shutil.which(shell, path="/usr/local/bin:/usr/bin:/bin")
            if found:
                return found
    if pw is not None and os.access(pw.pw_shell, os.X_OK) and not pw.pw_shell.endswith(_BAD_SHELLS):
        return pw.pw_shell
    return "/bin/sh"


def make_host_key() -> tuple[bytes, str]:
    return wire.ed25519_keypair()


def _setenv_line(env: dict[str, str]) -> str:
    """The job's environment as one sshd ``SetEnv`` directive.

    sshd clears the session's environment and applies SetEnv last, after its own variables,
    so the job's values win (HOME included). Values that sshd's config syntax cannot carry
    (newlines, NUL) are left out and logged.
    """
    words = []
    for k, v in sorted(env.items()):
        if not (k.isascii() and k.replace("_", "a").isalnum()) or k[0].isdigit():
            continue
        if "\n" in v or "\0" in v or "\r" in v:
            log.warning("environment variable %s has a newline; not passed to sessions", k)
            continue
        escaped = v.replace("\\", "\\\\").replace('"', '\\"')
        words.append(f'"{k}={escaped}"')
    return "SetEnv " + " ".join(words) + "\n" if words else ""


def sshd_config(
    d: pathlib.Path,
    login: str,
    env: dict[str, str],
    forwarding: bool,
    debug: bool,
    agent_forwarding: bool = False,
    host_certificate: bool = False,
    mux: bool = False,
) -> str:
    fwd = "yes" if forwarding else "no"
    agent = "yes" if agent_forwarding else "no"
    # The pool's host certificate for this key (broker-signed, host name job-<id>): plain ssh
    # with a @cert-authority line checks it (stj ssh-config -pool).
    cert = f'HostCertificate "{d}/host_key-cert.pub"\n' if host_certificate else ""
    return f"""\
# ssh-to-job session config: one connection on stdin/stdout (sshd -i), never a listener.
HostKey "{d}/host_key"
{cert}AuthorizedKeysFile "{d}/authorized_keys"
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
PidFile none
StrictModes no
PermitRootLogin no
AllowUsers {login}
# In-process sftp: a separate sftp-server would run without the shim and fail for uids
# with no passwd entry ("No user found for uid").
Subsystem sftp internal-sftp
PermitUserEnvironment no
PermitUserRC no
PermitTTY yes
AllowAgentForwarding {agent}
AllowTcpForwarding {fwd}
AllowStreamLocalForwarding {fwd}
X11Forwarding {fwd}
X11UseLocalhost yes
PermitTunnel no
GatewayPorts no
PrintMotd no
PrintLastLog no
UseDNS no
# Generous: the socket is already authorized by the capability, and 200 sessions opened at
# once on 2 cores take tens of seconds to finish their key exchanges.
LoginGraceTime 120
ClientAliveInterval 30
ClientAliveCountMax 4
# DEBUG1 is where sshd names the session's forwards, for its record (see _sshdlog.py); the
# log stays in the session dir.
LogLevel {"DEBUG2" if debug else "DEBUG1"}
# Repeat commands through the client's ControlMaster (mux_persist); off: one session only.
MaxSessions {10 if mux else 1}
{_setenv_line(env)}"""


def _tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes received, bytes sent and acknowledged) on a TCP socket, from TCP_INFO; zeros
    where the kernel does not say (tcpi_bytes_received and tcpi_bytes_acked, Linux 4.1+)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0, 0
    if len(info) < 136:
        return 0, 0
    acked, received = struct.unpack_from("=QQ", info, 120)
    return received, acked


async def run_session(starter: Starter, job: Job, session_id: str) -> None:
    """Everything the starter does for one session; never raises."""
    cfg = starter.config.starter
    sock: trio.socket.SocketType | None = None
    t0 = time.perf_counter()
    # The host key is made before dialling so that the broker can certify it (session_cert).
    host_key = make_host_key()
    try:
        with trio.fail_after(cfg.session_timeout):
            spare = starter.spares.take()
            how = "spare" if spare is not None else "dial, TLS"
            attached = None
            if spare is not None:
                try:
                    attached = await _attach(starter, session_id, host_key, spare.tls, spare.conn)
                except _SPARE_LOST as exc:
                    # Closed by the broker after take() looked: this session dials its own,
                    # as it would have without spares (the broker had not attached it).
                    log.info(
                        "session %s: the spare connection failed (%s); dialling",
                        session_id[:8],
                        exc,
                    )
                    how = "dial, TLS (the spare failed)"
            if attached is None:
                tls = await starter.connect_broker()
                conn = wire.Connection(wire.Channel.ATTACH, wire.Role.STARTER, wire.Role.BROKER)
                attached = await _attach(starter, session_id, host_key, tls, conn)
            raw, extra, certificate = attached
        assert isinstance(raw, trio.SocketStream)
        sock = raw.socket
        t1 = time.perf_counter()
        frame = await _frame_after(sock, bytes(extra), cfg.session_timeout)
        if starter.debug:
            log.debug(
                "session %s: host key, %s and attach %.1f ms; the capability %.1f ms later",
                session_id[:8],
                how,
                (t1 - t0) * 1000,
                (time.perf_counter() - t1) * 1000,
            )
    except (
        OSError,
        PeerGone,
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        wire.ProtocolError,
    ) as exc:
        log.info("session %s: no capability arrived: %s", session_id[:8], exc)
        if sock is not None:
            sock.close()
        return
    except BaseException:
        # Cancelled (the starter stopping) while waiting for the capability.
        if sock is not None:
            sock.close()
        raise
    conn = wire.Connection(wire.Channel.SESSION, wire.Role.STARTER, wire.Role.CLIENT)
    try:
        conn.receive_data(frame)
        msg = conn.next_event()
        assert isinstance(msg, wire.SessionOpen)
        cap = _check_capability(starter, job, session_id, msg.capability)
    except (wire.ProtocolError, wire.CapabilityError, SessionRefused) as exc:
        log.warning("session %s for job %s refused: %s", session_id[:8], job.id, exc)
        starter.audit("session-refused", job.id, str(exc))
        try:
            await sock.send(conn.send(wire.Error("refused", f"starter refused the session: {exc}")))
        except (OSError, wire.ProtocolError):
            pass
        sock.close()
        return
    await _serve(starter, job, session_id, cap, msg, sock, conn, host_key, certificate)


#: How a spare connection that the broker has closed fails when the session uses it. Until
#: the starter's own close_notify (in unwrap) the broker cannot have attached the session, so
#: dialling afresh is safe; after it, the broker refuses a second attach for the session.
_SPARE_LOST = (
    OSError,
    PeerGone,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    # An error frame (a refused standby) where session_cert was due.
    wire.ProtocolError,
)


async def _attach(
    starter: Starter,
    session_id: str,
    host_key: tuple[bytes, str],
    tls: trio.SSLStream[trio.SocketStream],
    attach: wire.Connection,
) -> tuple[trio.abc.Stream, bytes, str]:
    """``session_attach`` on ``tls``, the broker's ``session_cert``, then out of TLS: the bare
    stream, what came after the close_notify, and the session's host certificate."""
    try:
        await tls.send_all(
            attach.send(
                wire.SessionAttach(
                    session_id=session_id, starter_id=starter.name, host_key=host_key[1]
                )
            )
        )
        while not isinstance(reply := attach.next_event(), wire.Message):
            if reply is wire.CLOSED:
                raise PeerClosed("the broker closed the session connection")
            attach.receive_data(bytes(await tls.receive_some(65536)))
        assert isinstance(reply, wire.SessionCert)
        if attach.trailing_data:
            raise wire.RemoteProtocolError("bytes after the broker's session_cert")
        raw, extra = await tls.unwrap()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return raw, bytes(extra), reply.certificate


async def _frame_after(sock: trio.socket.SocketType, head: bytes, within: float) -> bytes:
    """The client's first frame: ``head`` (read past TLS's close_notify) plus the rest.

    Nothing past that frame is read: those bytes belong to sshd.
    """
    if not head:
        return await receive_one_frame_exact(sock, wire.DEFAULT_MAX_FRAME, within)
    size = wire.FRAME_HEADER.size
    with trio.fail_after(within):
        while len(head) < size:
            chunk = await sock.recv(size - len(head))
            if not chunk:
                raise PeerClosed("peer closed the connection in the middle of a frame")
            head += chunk
        (length,) = wire.FRAME_HEADER.unpack(head[:size])
        if length > wire.DEFAULT_MAX_FRAME or len(head) > size + length:
            raise wire.RemoteProtocolError("the client's first frame is oversized or overrun")
        while len(head) < size + length:
            chunk = await sock.recv(size + length - len(head))
            if not chunk:
                raise PeerClosed("peer closed the connection in the middle of a frame")
            head += chunk
    return head


def _check_capability(starter: Starter, job: Job, session_id: str, blob: bytes) -> wire.Capability:
    cap = wire.verify_capability(blob, starter.broker_key, time.time())
    if cap.session_id != session_id:
        raise SessionRefused("the capability is for another session")
    if cap.starter_id != starter.name or cap.starter_key != starter.public_key:
        raise SessionRefused("the capability is for another starter")
    if cap.job != job.id:
        raise SessionRefused(f"the capability is for job {cap.job}, not {job.id}")
    if cap.owner_uid != job.plan.run.uid:
        raise SessionRefused("the capability names another job owner")
    if not job.accepts_sessions():
        raise SessionRefused(f"job {job.id} is not running here any more")
    starter.replay.use(cap.session_id, cap.expires_at, time.time())
    return cap


async def _serve(
    starter: Starter,
    job: Job,
    session_id: str,
    cap: wire.Capability,
    msg: wire.SessionOpen,
    sock: trio.socket.SocketType,
    conn: wire.Connection,
    host_key: tuple[bytes, str] | None = None,
    certificate: str = "",
) -> None:
    cfg = starter.config.starter
    uid, gid = job.plan.run.uid, job.plan.run.gid
    login, pw = login_name(uid)
    shell = choose_shell(msg.shells, pw)
    d = starter.sessions_dir / session_id[:16]
    cgroup: pathlib.Path | None = None
    proc: trio.Process | _spawn.Process | None = None
    meter: socket.socket | None = None
    # From here on the socket is a plain blocking one: sshd gets it as stdin/stdout.
    ours = socket.socket(fileno=sock.detach())
    ours.setblocking(True)
    # Where the set-up's time goes, for the debug log (issue 12: the starter's share of a
    # cold session, taken apart before anything is cut).
    marks = [("capability", time.perf_counter())]
    try:
        common.private_dir(d, uid, gid)
        private, public = host_key if host_key is not None else make_host_key()
        common.write_private(d / "host_key", private, uid, gid)
        if certificate:
            common.write_private(d / "host_key-cert.pub", certificate.encode() + b"\n", uid, gid)
        common.write_private(d / "authorized_keys", (cap.client_key + "\n").encode(), uid, gid)
        if msg.persist:
            try:
                await _persist.ensure(starter, job, msg.persist, shell)
            except _persist.PersistError as exc:
                raise SessionRefused(str(exc)) from None
        pids = job.group.own_pids(job.pid, hidden=(job.reaper_pid,))
        env = dict(job.plan.env)
        env.update(
            {
                "SSH_TO_JOB_PIDS": " ".join(map(str, pids)),
                "SSH_TO_JOB_SESSION": session_id[:16],
                "SSH_TO_JOB_TMUX": str(_persist.socket_path(job)),
            }
        )
        banner = (
            f"ssh-to-job: welcome to job {job.id} on {starter.name}; "
            f"its processes: {' '.join(map(str, pids)) or 'none'}"
        )
        common.write_private(
            d / "sshd_config",
            sshd_config(
                d,
                login,
                env,
                cfg.allow_forwarding,
                starter.debug,
                cfg.allow_agent_forwarding,
                host_certificate=bool(certificate),
                mux=cfg.mux_persist > 0,
            ).encode(),
            uid,
            gid,
        )
        cgroup = job.group.session_cgroup(session_id)
        # sshd starts every session in the passwd home: the shim makes that the job's
        # working directory (the job's own HOME still reaches the session through SetEnv).
        home = str(job.plan.scratch)
        statement = wire.host_key_statement(session_id, login, public)
        ready = wire.SessionReady(
            host_key=public,
            login=login,
            signature=wire.sign(starter.identity, statement),
            banner=banner,
            agent_forwarding=cfg.allow_agent_forwarding,
            mux_persist=cfg.mux_persist,
        )
        # sshd gets its own duplicate of the socket as stdin/stdout; ours is closed below.
        argv = [cfg.sshd, "-i", "-e", "-f", str(d / "sshd_config")]
        sshd_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        log_path = d / "sshd.log"
        # d belongs to the job's uid by now, and its owner knows the session id: a symlink
        # planted here must not make us (root) truncate and chown the file it points to.
        log_fd = os.open(
            log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        os.fchown(log_fd, uid, gid)
        preexec = _procs.make_preexec(uid, gid, list(job.plan.groups), cgroup)
        marks.append(("files", time.perf_counter()))
        if cfg.use_shim:
            parent, child = socket.socketpair()
            shim_cfg = preload.ShimConfig(
                uid=uid, gid=gid, name=login, home=home, shell=shell, hide_tty_group=True
            )
            sshd_env["LD_PRELOAD"] = str(starter.shim)
            sshd_env[preload.ENV_FD] = str(child.fileno())
            try:
                proc = await _spawn.start(
                    argv,
                    stdin=ours.fileno(),
                    stdout=ours.fileno(),
                    stderr=log_fd,
                    env=sshd_env,
                    cgroup=cgroup,
                    uid=uid,
                    gid=gid,
                    groups=job.plan.groups,
                    preexec=preexec,
                    pass_fds=(child.fileno(),),
                    mode=cfg.spawn,
                )
            finally:
                child.close()
                os.close(log_fd)
            job.group.adopt(proc.pid)
            marks.append(("spawn", time.perf_counter()))
            with parent:
                await job.group.settle(proc.pid)
                try:
                    await _shim_handshake(parent, shim_cfg, SHIM_TIMEOUT)
                except preload.ShimError as exc:
                    proc.kill()
                    raise SessionRefused(str(exc)) from None
                marks.append(("shim", time.perf_counter()))
                ours.sendall(conn.send(ready))
                parent.sendall(preload.GO)
        else:
            ours.sendall(conn.send(ready))
            try:
                proc = await _spawn.start(
                    argv,
                    stdin=ours.fileno(),
                    stdout=ours.fileno(),
                    stderr=log_fd,
                    env=sshd_env,
                    cgroup=cgroup,
                    uid=uid,
                    gid=gid,
                    groups=job.plan.groups,
                    preexec=preexec,
                    mode=cfg.spawn,
                )
            finally:
                os.close(log_fd)
            job.group.adopt(proc.pid)
            await job.group.settle(proc.pid)
            marks.append(("spawn", time.perf_counter()))
        if starter.debug:
            steps = ", ".join(
                f"{name} {(t - marks[i][1]) * 1000:.1f} ms" for i, (name, t) in enumerate(marks[1:])
            )
            total = (marks[-1][1] - marks[0][1]) * 1000
            log.debug(
                "session %s set-up: %.1f ms from the capability (%s)", session_id[:8], total, steps
            )
        if job.killed:
            # rm/hold came while we set up: the group kill may have missed this sshd (it
            # joins the job's cgroup only as it starts).
            raise SessionRefused(f"job {job.id} is being removed ({job.killed})")
        # A duplicate of the session's socket, only to count its bytes when sshd is done: it
        # is closed right after, so the client still sees the connection end with sshd.
        starter.exits.watch(proc.pid)
        meter = ours.dup()
        ours.close()
        started = time.time()
        starter.audit("session-open", job.id, f"session {session_id[:16]} uid {cap.requester_uid}")
        job.sessions[session_id] = proc
        job.report_sessions()
        await proc.wait()
        bytes_in, bytes_out = _tcp_bytes(meter)
        meter.close()
        meter = None
        text = _sshdlog.read(log_path)
        exit_status = starter.exits.result(proc.pid, _sshdlog.command_pid(text))
        starter.post(
            wire.SessionEnded(
                session_id=session_id,
                job=job.id,
                started=started,
                ended=time.time(),
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                forwards=_sshdlog.forwards(text),
                exit_status=exit_status,
            )
        )
        if starter.debug:
            log.debug("sshd log for %s:\n%s", session_id[:8], _read_log(log_path))
    except SessionRefused as exc:
        log.warning("session %s into job %s failed: %s", session_id[:8], job.id, exc)
        _tell(ours, conn, f"session set-up failed: {exc}")
    except (OSError, ValueError, subprocess.SubprocessError, wire.ProtocolError) as exc:
        # ValueError: a login, home or shell the shim's configuration cannot carry.
        log.exception("session %s into job %s failed", session_id[:8], job.id)
        _tell(ours, conn, f"session set-up failed: {exc}")
    finally:
        ours.close()
        if meter is not None:
            meter.close()
        with trio.CancelScope(shield=True):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc is not None:
                job.group.release(proc.pid)  # reaped: the pid may now be anyone's
            await _end_session(d, cgroup, cfg.session_end_grace)
        job.sessions.pop(session_id, None)
        job.report_sessions()
        starter.audit("session-closed", job.id, f"session {session_id[:16]}")


def _read_log(path: pathlib.Path, limit: int = 65536) -> str:
    """sshd's log, read as root from a directory the job's uid owns: follow no link the job
    put there, never block on a FIFO, read a bounded amount."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"(cannot read {path.name}: {exc.strerror})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"({path.name} is not a regular file)"
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def _tell(sock: socket.socket, conn: wire.Connection, message: str) -> None:
    """Best effort: tell the client why its session failed (unless sshd already has it)."""
    if sock.fileno() == -1 or conn.state != "opening":
        return
    try:
        sock.sendall(conn.send(wire.Error("failed", message)))
    except (OSError, wire.ProtocolError):
        pass


async def _shim_handshake(parent: socket.socket, cfg: preload.ShimConfig, within: float) -> None:
    """Send the shim its config and wait for its ``ok``; it then waits for GO from us."""
    hs = preload.ShimHandshake(cfg)
    parent.setblocking(False)
    tsock = trio.socket.from_stdlib_socket(parent)
    with trio.move_on_after(within) as scope:
        try:
            sent = 0
            while sent < len(hs.config):
                sent += await tsock.send(hs.config[sent:])
        except OSError as exc:
            raise hs.send_failed(within, exc) from exc
        while True:
            try:
                chunk = await tsock.recv(preload.ACK_MAX)
            except OSError as exc:
                raise hs.no_answer(within, exc) from exc
            if hs.receive_data(chunk) is not None:
                return
    if scope.cancelled_caught:
        raise hs.no_answer(within)


async def _end_session(d: pathlib.Path, cgroup: pathlib.Path | None, grace: float) -> None:
    """Leave nothing of a session behind: its processes (after ``grace``), cgroup and dir.

    A remote command whose client went away outlives sshd unless its cgroup is ended. The
    session dir belongs to the job's uid, whose other processes may race us by creating
    entries in it: ``remove_owned_tree`` takes it back first.
    """
    if cgroup is not None:
        path = cgroup
        await wait_gone(lambda: _procs.cgroup_pids(path), grace)
        _procs.kill_cgroup(cgroup)
        await wait_gone(lambda: _procs.cgroup_pids(path), 5)
        _procs.remove_cgroup_tree(cgroup)
    remove_owned_tree(d)


async def wait_gone(pids: Callable[[], set[int]], seconds: float) -> None:
    """Poll (without blocking the loop) until ``pids()`` is empty, for at most ``seconds``."""
    with trio.move_on_after(seconds):
        for _ in itertools.count():
            if not pids():
                return
            await trio.sleep(0.02)


def _take_back(top: pathlib.Path) -> None:
    """Make every directory of a tree a job's uid owns root's and 0700, top-down.

    Each directory is taken before it is listed, so its listing is final: after this, the
    job's uid cannot add an entry anywhere in the tree, not even through a directory it
    still has open.
    """
    todo = [top]
    while todo:
        path = todo.pop()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o700)
            with os.scandir(fd) as entries:
                subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            subdirs = []
        finally:
            os.close(fd)
        todo.extend(path / name for name in subdirs)


def remove_owned_tree(d: pathlib.Path) -> None:
    """Remove a directory tree that a job's uid owns, even while its processes race us."""
    _take_back(d)
    shutil.rmtree(d, ignore_errors=True)
    if os.path.lexists(d):
        log.warning("could not remove %s", d)


def cleanup_session_dirs(sessions_dir: pathlib.Path) -> None:
    """At start: the session dirs (keys, configs) of sessions an earlier starter served."""
    for d in sessions_dir.iterdir() if sessions_dir.is_dir() else ():
        log.info("removing session dir %s left by an earlier starter", d)
        remove_owned_tree(d)
