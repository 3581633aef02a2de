"""``ssh-to-job``: a real OpenSSH session into a running job, condor_ssh_to_job's way.

1. make an ephemeral user key (its private half never leaves this host);
2. ask the broker (unix socket, we are known by SO_PEERCRED) for a session; it answers with a
   capability and the session socket itself, already connected to the job's starter;
3. present the capability on that socket; the starter answers with a host key signed by its
   identity key, which the broker vouched for: verify it and pin it (never trust on first use);
4. run ssh/scp/sftp with our own config: ProxyCommand + ProxyUseFdpass hand it the socket,
   so no Python process copies a byte of the session.

Exit status: the remote command's (ssh's 255 passes through), 2 for bad arguments, 1 when the
session could not be set up. Key files live in a 0700 directory removed on every exit path;
stale ones from a killed run are swept at the next start.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal without enum; no stub
import _socket
import os
import pwd
import stat
import sys
import time

# The session path imports only what it uses (tests/test_client_imports.py pins the set): the
# wire's attrs-free ``lean`` codec instead of the attrs message classes, os.path instead of
# pathlib, posix_spawn instead of subprocess, _signal and _socket instead of signal and socket
# (whose enum wrappers, with functools and collections, cost every session ~5 ms), bytes
# instead of the array module for SCM_RIGHTS. ``wire`` itself loads its names on first use.
from ssh_to_job import common, wire
from ssh_to_job.wire import lean

from . import _mux, _persist
from ._broker import (
    BrokerClient,
    BrokerUnavailable,
    die,
    find_socket,
    receive_grant,
    send_request,
    socket_path,
)

# Not typing.TYPE_CHECKING: importing typing costs more than this module's own work.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import pathlib
    from typing import NoReturn, Protocol

    class _Polled(Protocol):
        def poll(self) -> int | None: ...


USAGE = """\
usage: ssh-to-job [-help] [-debug] [-name broker] [-pool addr] [-ssh ssh-command]
                  [-keygen-options opts] [-shells a,b,...] [-auto-retry]
                  [-remove-on-interrupt] [-X | -x] [--persist | --persist-name NAME]
                  cluster[.proc[.node]] [remote-command ...]

Open an ssh session into a running job, as the job's user, in its environment and working
directory. Without a remote command you get an interactive shell.

  -name broker          broker to ask: its state directory or socket path
  -pool host:port       a remote pool's broker (see `stj keys` and `stj pool-ca --trust`)
  -ssh "cmd args"       run this instead of ssh, e.g. -ssh sftp, -ssh scp
                        (with scp, write the remote side as remote:path)
  -keygen-options opts  session key type, e.g. "-t rsa -b 3072" (default ed25519)
  -shells a,b,c         shells to try on the execute host (default: your $SHELL)
  -auto-retry           wait while the job is idle instead of failing
  -remove-on-interrupt  remove the job if this command is interrupted
  -X / -x               enable / disable X11 forwarding
  -debug                say what happens, and run ssh with -v
  --persist             attach to a terminal (tmux) that lives in the job: it survives
                        a dropped connection and ends with the job
  --persist-name NAME   the same, picking one of several named terminals
                        (--persist alone is --persist-name main)

examples:
  ssh-to-job 32.0
  ssh-to-job 32 'ls -l; cat out.log'
  ssh-to-job -ssh sftp 32.0
  ssh-to-job -ssh scp 32 remote:out.dat .
  rsync -av -e ssh-to-job 32.0:out/ ./out/
"""

ALIAS = "ssh-to-job"
_WITH_ARG = {"name", "pool", "ssh", "keygen-options", "shells", "l", "p", "o", "persist-name"}
_FLAGS = {
    "help",
    "h",
    "debug",
    "auto-retry",
    "remove-on-interrupt",
    "X",
    "x",
    "version",
    "persist",
}


class SlurmJobId:
    """A Slurm job named on the command line; the broker resolves it (broker/_slurm.py)."""

    __slots__ = ("text",)
    node = None

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def one(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return type(other) is SlurmJobId and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"SlurmJobId(text={self.text!r}, node=None)"


def parse_job(text: str) -> wire.JobId | SlurmJobId:
    """A job of this pool's queue (``32.0``) or of its Slurm cluster (``slurm:1234``)."""
    jid = _parse_job(text)
    if isinstance(jid, SlurmJobId):
        return jid
    return wire.JobId(jid.cluster, jid.proc, jid.node)


def _parse_job(text: str) -> lean.LocalJobId | SlurmJobId:
    """``parse_job`` for the session path: the same ids and errors, without attrs."""
    if text.startswith(("slurm:", "slurm-")):
        # slurm:JOB[_TASK][.STEP][+NODE] (docs/slurm.md); "slurm-" for rsync.
        wire.parse_slurm_id(text)
        return SlurmJobId(text)
    return lean.parse_job_id(text)


def split_words(text: str) -> list[str]:
    """``shlex.split(text)``, without importing shlex (and re, ~4 ms of a session's start-up)
    for text that has nothing for it to interpret: printable ASCII with no quote or backslash,
    where it splits at spaces, as the default ``-ssh ssh`` and ``-keygen-options`` are."""
    if text.isascii() and text.isprintable() and not any(c in "'\"\\" for c in text):
        return [w for w in text.split(" ") if w]
    import shlex

    return shlex.split(text)


#: What shlex.quote leaves unquoted.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")


def _quote(word: str) -> str:
    """``shlex.quote(word)`` without importing re."""
    if word and all(c in _SAFE for c in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


class UsageError(ValueError):
    pass


class Options:
    """The parsed command line (a plain class: attrs is not on the session path)."""

    def __init__(
        self,
        job: str = "",
        command: list[str] | None = None,
        name: str | None = None,
        pool: str | None = None,
        ssh: str = "ssh",
        keygen: str = "",
        shells: tuple[str, ...] = (),
        auto_retry: bool = False,
        remove_on_interrupt: bool = False,
        x11: bool | None = None,
        debug: bool = False,
        help: bool = False,
        version: bool = False,
        persist: str = "",
    ) -> None:
        self.job = job
        self.command: list[str] = [] if command is None else command
        self.name = name
        self.pool = pool
        self.ssh = ssh
        self.keygen = keygen
        self.shells = shells
        self.auto_retry = auto_retry
        self.remove_on_interrupt = remove_on_interrupt
        self.x11 = x11
        self.debug = debug
        self.help = help
        self.version = version
        #: --persist / --persist-name: the job's tmux session to attach to ("" for none).
        self.persist = persist

    def __eq__(self, other: object) -> bool:
        return type(other) is Options and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"Options({inner})"


def parse_args(argv: list[str]) -> Options:
    """condor_ssh_to_job's options, single- or double-dash, before the job id."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        if arg == "--":
            i += 1
            break
        key, eq, inline = arg.lstrip("-").partition("=")
        if key in _WITH_ARG:
            if eq:
                value = inline
            else:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option {arg} needs a value")
                value = argv[i]
            if key == "name":
                opts.name = value
            elif key == "pool":
                opts.pool = value
            elif key == "ssh":
                if not split_words(value):
                    raise UsageError("-ssh needs a command")
                opts.ssh = value
            elif key == "keygen-options":
                opts.keygen = value
            elif key == "shells":
                opts.shells = tuple(s for s in value.split(",") if s)
            elif key == "persist-name":
                opts.persist = value
            # -l user / -p port / -o opt: what rsync and others pass to an "ssh"; the job
            # decides the user and there is no port, so they are accepted and ignored.
        elif key in _FLAGS and not eq:
            if key in ("help", "h"):
                opts.help = True
            elif key == "version":
                opts.version = True
            elif key == "debug":
                opts.debug = True
            elif key == "auto-retry":
                opts.auto_retry = True
            elif key == "remove-on-interrupt":
                opts.remove_on_interrupt = True
            elif key == "X":
                opts.x11 = True
            elif key == "x":
                opts.x11 = False
            elif key == "persist":
                opts.persist = opts.persist or _persist.DEFAULT
        else:
            raise UsageError(f"unknown option {arg}")
        i += 1
    if opts.help or opts.version:
        return opts
    if i >= len(argv):
        raise UsageError("no job id given")
    job = argv[i]
    # rsync -e ssh-to-job writes the host word as "user@32.0" when asked for a user.
    job = job.rpartition("@")[2]
    try:
        jid = _parse_job(job)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if jid.node:
        # Jobs of this queue have one node, node 0: never quietly enter another than asked.
        raise UsageError(f"job {jid.one} has no node {jid.node} (its only node is 0)")
    if os.path.basename(split_words(opts.ssh)[0]) == "rsync":
        raise UsageError(
            "rsync runs ssh-to-job, not the other way round: "
            f"rsync -av -e ssh-to-job {jid.one}:remote/path ./local/"
        )
    opts.job = job
    opts.command = argv[i + 1 :]
    if opts.persist:
        why = _persist.check(opts.persist, opts.command, os.path.basename(split_words(opts.ssh)[0]))
        if why:
            raise UsageError(why)
    return opts


# ---------------------------------------------------------------------------- keys


def generate_key(options: str) -> tuple[bytes, str]:
    """An ephemeral user key in OpenSSH format, made in-process: (private, public line)."""
    words = split_words(options)
    kind, bits = "ed25519", 0
    j = 0
    while j < len(words):
        w = words[j]
        if w in ("-N", "-C"):
            # A passphrase or a comment on a key that lives for one session and never
            # leaves this host would be silently meaningless: refuse them.
            raise UsageError(
                f"-keygen-options: {w} is not supported for ephemeral session keys "
                "(only -t TYPE and -b BITS)"
            )
        if w in ("-t", "-b"):
            if j + 1 >= len(words):
                raise UsageError(f"-keygen-options: {w} needs a value")
            if w == "-t":
                kind = words[j + 1].lower()
            elif w == "-b":
                try:
                    bits = int(words[j + 1])
                except ValueError:
                    raise UsageError(f"-keygen-options: bad bit count {words[j + 1]!r}") from None
            j += 2
            continue
        if w == "-q":
            j += 1
            continue
        raise UsageError(f"-keygen-options: unsupported option {w!r} (use -t and -b)")
    if kind == "ed25519":
        return wire.ed25519_keypair()
    # Other key types are rare: only they pay for importing cryptography.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        bits = bits or 3072
        if not 2048 <= bits <= 16384:
            raise UsageError("-keygen-options: rsa keys need 2048 to 16384 bits")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif kind == "ecdsa":
        curves = {0: ec.SECP256R1(), 256: ec.SECP256R1(), 384: ec.SECP384R1(), 521: ec.SECP521R1()}
        if bits not in curves:
            raise UsageError("-keygen-options: ecdsa keys are 256, 384 or 521 bits")
        key = ec.generate_private_key(curves[bits])
    else:
        raise UsageError(f"-keygen-options: unsupported key type {kind!r} (ed25519, rsa, ecdsa)")
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return private, public


# ---------------------------------------------------------------------------- session files


def runtime_dir() -> tuple[pathlib.Path, bool]:
    """Our private directory for session files (0700, ours, not a symlink), and whether it is
    the shared per-uid one (True) or a fresh one made because that one was squatted.

    With XDG_RUNTIME_DIR unset the per-uid name in /tmp is predictable, so another user can
    create it first; that must not lock us out: we then make an unpredictable one instead.
    """
    import pathlib

    d, shared = _runtime_dir()
    return pathlib.Path(d), shared


def _runtime_dir() -> tuple[str, bool]:
    d = common.runtime_base()
    base = os.path.dirname(d)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            import tempfile  # only here: it is not cheap to import

            return tempfile.mkdtemp(prefix=f"ssh-to-job-{os.getuid()}-", dir=base), False
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
    return d, True


def _read_pid(d: str) -> int:
    try:
        with open(os.path.join(d, "pid"), "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _remove_tree(d: str | os.PathLike[str]) -> None:
    """``shutil.rmtree(d, ignore_errors=True)`` for a session directory: a few files, no
    subdirectory unless someone put one there (then shutil, which is not cheap to import)."""
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError:
        entries = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                import shutil

                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass


def sweep_stale(base: str | os.PathLike[str]) -> None:
    """Remove session directories whose ssh-to-job process is gone (killed with SIGKILL)."""
    base = os.fspath(base)
    for name in os.listdir(base):
        entry = os.path.join(base, name)
        if name.startswith("mux-"):
            # A repeat-command master's socket (its ssh removes it), or the config and lock
            # beside it: those go once no master has used them for a while.
            stem = name.split(".", 1)[0]
            try:
                idle = time.time() - os.lstat(entry).st_mtime > 600
            except FileNotFoundError:
                continue
            if name != stem and idle and not os.path.exists(os.path.join(base, stem)):
                try:
                    os.unlink(entry)
                except FileNotFoundError:
                    pass
            continue
        if name.startswith(common.CONFIG_MEMO):
            # common._where's memo of the config file stays; a writer's temp file left by a
            # killed command goes.
            try:
                if name != common.CONFIG_MEMO and time.time() - os.lstat(entry).st_mtime > 60:
                    os.unlink(entry)
            except FileNotFoundError:
                pass
            continue
        pid = _read_pid(entry)
        if pid:
            try:
                os.kill(pid, 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        else:
            try:
                if time.time() - os.stat(entry).st_mtime < 60:
                    continue  # a session being set up right now
            except FileNotFoundError:
                continue  # another ssh-to-job just finished with it
        import shutil  # only for a stale directory: it is not cheap to import

        shutil.rmtree(entry, ignore_errors=True)


def _quote_cfg(path: str | os.PathLike[str]) -> str:
    s = os.fspath(path)
    if '"' in s or "\n" in s:
        raise ValueError(f"path {s!r} cannot be written into an ssh_config")
    return f'"{s}"'


def ssh_config(
    d: str | os.PathLike[str],
    login: str,
    alias: str,
    proxy_name: str,
    x11: bool | None,
    debug: bool,
    agent: bool = False,
) -> str:
    """The ssh_config of one session. ``agent``: the user asked for agent forwarding and the
    pool allows it; ssh then needs its agent (``IdentityAgent none`` would switch off the
    forwarding too), and ``IdentitiesOnly`` still keeps the agent's keys out of the login."""
    here = os.path.dirname(os.path.abspath(__file__))
    helper = os.path.join(here, "stj-fdpass")  # built at install: starts in <1 ms (critical)
    if os.access(helper, os.X_OK):
        argv = [helper, proxy_name]
    else:
        argv = [sys.executable, "-I", "-S", os.path.join(here, "_fdproxy.py"), proxy_name]
    proxy = " ".join(_quote(p) for p in argv)
    lines = [
        "# ssh-to-job session: generated; nothing from ~/.ssh/config applies.",
        "Host *",
        f"  User {login}",
        f"  HostKeyAlias {alias}",
        f"  UserKnownHostsFile {_quote_cfg(os.path.join(d, 'known_hosts'))}",
        f"  GlobalKnownHostsFile {_quote_cfg(os.path.join(d, 'known_hosts'))}",
        "  StrictHostKeyChecking yes",
        "  CheckHostIP no",
        "  UpdateHostKeys no",
        f"  IdentityFile {_quote_cfg(os.path.join(d, 'id'))}",
        "  IdentitiesOnly yes",
        *([] if agent else ["  IdentityAgent none"]),
        "  PreferredAuthentications publickey",
        "  PasswordAuthentication no",
        "  KbdInteractiveAuthentication no",
        "  GSSAPIAuthentication no",
        "  BatchMode yes",
        f"  ProxyCommand {proxy}",
        "  ProxyUseFdpass yes",
        "  ControlMaster no",
        "  ControlPath none",
        "  ForwardAgent no",
        # AES-GCM first: with AES-NI it moves ~1.4x the bytes of chacha20-poly1305 here.
        "  Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,"
        "aes256-gcm@openssh.com,aes128-ctr,aes256-ctr",
        "  ServerAliveInterval 30",
        f"  LogLevel {'DEBUG' if debug else 'ERROR'}",
    ]
    if x11 is not None:
        lines.append(f"  ForwardX11 {'yes' if x11 else 'no'}")
    return "\n".join(lines) + "\n"


def _write(path: str | os.PathLike[str], data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the starter closed the session socket")
        buf += chunk
    return buf


def open_session(
    sock: _socket.socket,
    grant: wire.SshGrant | lean.SshGrant,
    shells: tuple[str, ...],
    timeout: float = 30.0,
    persist: str = "",
) -> lean.SessionReady:
    """Present the capability; return the starter's verified, signed host key.

    Reads exactly one frame: sshd's first bytes follow right behind it and belong to ssh.
    The frames are ``wire.SessionOpen`` and ``wire.SessionReady`` (or ``wire.Error``), byte
    for byte, checked as strictly, by ``wire.lean``.
    """
    send_open(sock, grant, shells, timeout, persist)
    return read_ready(sock, grant, timeout)


def send_open(
    sock: _socket.socket,
    grant: wire.SshGrant | lean.SshGrant,
    shells: tuple[str, ...],
    timeout: float = 30.0,
    persist: str = "",
) -> None:
    """``open_session``'s first half: present the capability (the starter starts work)."""
    sock.settimeout(timeout)
    sock.sendall(lean.session_open_frame(grant.capability, shells, persist))


def read_ready(
    sock: _socket.socket, grant: wire.SshGrant | lean.SshGrant, timeout: float = 30.0
) -> lean.SessionReady:
    """``open_session``'s second half: the starter's answer, its host key checked."""
    sock.settimeout(timeout)
    header = _recv_exact(sock, wire.FRAME_HEADER.size)
    (length,) = wire.FRAME_HEADER.unpack(header)
    if length > wire.DEFAULT_MAX_FRAME:
        raise wire.RemoteProtocolError(f"starter announced a {length}-byte frame")
    msg = lean.decode_reply(_recv_exact(sock, length), lean.READY_REPLIES)
    if isinstance(msg, lean.Error):
        raise SessionError(msg.message)
    assert isinstance(msg, lean.SessionReady)
    statement = wire.host_key_statement(grant.session_id, msg.login, msg.host_key)
    if not lean.verify(grant.starter_key, statement, msg.signature):
        raise SessionError(
            "the starter's host key is not signed by the starter the broker "
            "named; refusing to connect (possible man in the middle)"
        )
    if "\n" in msg.host_key or not msg.host_key.startswith("ssh-"):
        raise SessionError("the starter sent a malformed host key")
    sock.settimeout(None)
    return msg


class SessionError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- running ssh


def wants_agent(words: list[str]) -> bool:
    """Whether these ssh options ask for agent forwarding (-A, -tA, -o ForwardAgent=yes)."""
    for i, w in enumerate(words):
        if w.startswith("-o"):
            opt = w[2:] or (words[i + 1] if i + 1 < len(words) else "")
            key, _, value = opt.replace(" ", "=", 1).partition("=")
            if key.lower() == "forwardagent" and value.strip().lower() not in ("no", ""):
                return True
        elif w.startswith("-") and not w.startswith("--") and "A" in w[1:]:
            return True
    return False


def build_argv(opts: Options, cfg: str | os.PathLike[str]) -> list[str]:
    words = split_words(opts.ssh)
    prog = os.path.basename(words[0])
    cfg = os.fspath(cfg)
    if prog == "scp":
        return [words[0], "-F", cfg, *words[1:], *opts.command]
    if prog == "sftp":
        return [words[0], "-F", cfg, *words[1:], *opts.command, ALIAS]
    argv = [words[0], "-F", cfg, *words[1:]]
    if opts.debug:
        argv.append("-v")
    if opts.x11 is True:
        argv.append("-X")
    elif opts.x11 is False:
        argv.append("-x")
    if opts.persist:
        # -t: tmux needs a terminal even when ssh-to-job's stdin is not one.
        return [*argv, "-t", ALIAS, _persist.remote_command(opts.persist)]
    return [*argv, ALIAS, *opts.command]


class Child:
    """ssh (scp, sftp) as a child process: ``subprocess.Popen``'s part that we use, on
    ``os.posix_spawnp`` (importing subprocess costs every session a few ms of CPU).

    As Popen's ``close_fds``, no descriptor but 0, 1 and 2 reaches the child: ours are
    close-on-exec already, and any inherited from our own parent is closed in the child; as
    its ``restore_signals``, the signals Python ignores are the default again in the child.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        closes = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if fd > 2 and os.get_inheritable(fd):
                    closes.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                pass  # listdir's own descriptor, closed by now
        self.args = argv
        # As Popen's restore_signals: Python ignores SIGPIPE and SIGXFSZ, and an ignored
        # signal stays ignored across exec; ssh must die of a closed pipe as from a shell.
        self.pid = os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=closes,
            setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),
        )
        self.returncode: int | None = None
        #: Reaped by a wait() that a signal handler's poll() interrupted before it could
        #: store the status: the pid is no longer ours to signal.
        self._reaped = False

    # A signal handler (_Signals) polls the child while wait() blocks in waitpid, so each of
    # the two may find the child already reaped by the other (ECHILD), as Popen allows for.
    def poll(self) -> int | None:
        if self.returncode is None and not self._reaped:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self._reaped = True
                return None
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _pid, status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                stored = self._stored()  # by the handler's poll(), during our waitpid
                if stored is None:
                    raise
                return stored
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _stored(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and not self._reaped:
            os.kill(self.pid, sig)


class _Signals:
    """While ssh runs: remember interrupts, pass SIGTERM/SIGHUP on to ssh."""

    def __init__(self) -> None:
        self.child: Child | None = None
        self.interrupted = False
        self.signum: int = _signal.SIGINT
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            self._old[sig] = _signal.signal(sig, self._handle)
        return self

    def _handle(self, sig: int, _frame: object) -> None:
        self.interrupted = True
        self.signum = sig
        if self.child is None:
            raise KeyboardInterrupt
        # Pass it on: a Ctrl-C from the terminal reached ssh already (a second SIGINT changes
        # nothing), but a `kill -INT` aimed at us alone must reach ssh too.
        try:
            self.child.send_signal(sig)
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            _signal.signal(sig, old)


def hand_over(listener: _socket.socket, session: _socket.socket, child: _Polled) -> bool:
    """Give the session socket to the proxy helper ssh starts (only to our own uid)."""
    listener.settimeout(0.2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            fd, _ = listener._accept()  # type: ignore[attr-defined]  # socket.accept's core
        except TimeoutError:
            continue
        conn = _socket.socket(fileno=fd)
        try:
            creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            uid = int.from_bytes(creds[4:8], sys.byteorder)
            if uid != os.getuid():
                continue  # someone else guessed the name: they get nothing
            rights = session.fileno().to_bytes(4, sys.byteorder)  # one C int
            conn.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
            return True
        finally:
            conn.close()
    return False


def run(opts: Options) -> int:
    try:
        jid = _parse_job(opts.job)
    except ValueError as exc:
        return die(str(exc), 2)
    if os.path.basename(split_words(opts.ssh)[0]) in ("ssh", "scp", "sftp"):
        # The OpenSSH client exits ("No user exists for uid N") without a passwd entry for the
        # uid running it: say so before the broker and the starter set a session up for nothing.
        try:
            pwd.getpwuid(os.getuid())
        except KeyError:
            return die(
                f"your uid {os.getuid()} has no passwd entry on this host, and the OpenSSH "
                "client does not run without one; ask a queue superuser to connect, or "
                "add an entry for the uid"
            )
    shells = opts.shells or ((os.environ["SHELL"],) if os.environ.get("SHELL") else ())
    try:
        base, shared = _runtime_dir()
        if shared:
            sweep_stale(base)
    except OSError as exc:
        return die(f"cannot prepare a private directory for session keys: {exc}")
    d = os.path.join(base, os.urandom(6).hex())
    os.mkdir(d, 0o700)
    signals = _Signals()
    try:
        with signals:
            with open(os.path.join(d, "pid"), "w") as f:
                f.write(str(os.getpid()))
            return _session(opts, jid, shells, d, signals, base if shared else None)
    except KeyboardInterrupt:
        if opts.remove_on_interrupt:
            _remove_job(opts, jid)
        # The shell's convention: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
        return die("interrupted", 128 + signals.signum)
    finally:
        _remove_tree(d)
        if not shared:
            _remove_tree(base)


def _debug(opts: Options, msg: str) -> None:
    if opts.debug:
        print(f"ssh-to-job: {msg}", file=sys.stderr)


def _through_master(opts: Options, d: str, path: str, signals: _Signals) -> int:
    """A repeat command: through this user's live master for the job, no broker (_mux)."""
    _debug(opts, f"reusing this job's session through {path}")
    cfg = os.path.join(d, "config")
    _write(cfg, _mux.client_config(path, opts.debug).encode())
    argv = build_argv(opts, cfg)
    try:
        child = Child(argv)
    except OSError as exc:
        return die(f"cannot run {argv[0]}: {exc.strerror}")
    signals.child = child
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


def _session(
    opts: Options,
    jid: lean.LocalJobId | SlurmJobId,
    shells: tuple[str, ...],
    d: str,
    signals: _Signals,
    mux_dir: str | None = None,
) -> int:
    # A remote pool needs no local broker, config or state dir.
    try:
        sockpath = socket_path(opts.name) if not opts.pool else None
    except ValueError as exc:  # common.ConfigError: a config file that does not parse
        return die(str(exc))
    mux_path: str | None = None
    # A --persist session needs its tmux session made ready by the starter: always a full one.
    # -debug shows a whole set-up and -remove-on-interrupt acts on this session: full ones;
    # so does -keygen-options, which asks for a session key of its own kind.
    full = opts.persist or opts.debug or opts.remove_on_interrupt or bool(opts.keygen)
    if mux_dir is not None and not full and _mux.usable(split_words(opts.ssh), opts.x11):
        # _mux.socket_path's name without its pathlib (not on the session path otherwise).
        mux_path = _mux._name(mux_dir, opts.pool or str(sockpath), jid.one, shells)
        # An interactive login takes a session of its own (and its welcome line): see _mux.
        login = not opts.command and os.path.basename(split_words(opts.ssh)[0]) == "ssh"
        if not login and _mux.alive(mux_path):
            return _through_master(opts, d, mux_path, signals)
    try:
        private, public = generate_key(opts.keygen)
    except UsageError as exc:
        return die(str(exc), 2)
    _write(os.path.join(d, "id"), private)
    words = split_words(opts.ssh)
    asks_agent = wants_agent(words[1:])
    # The name ssh knows the session by (its Host, and the known_hosts line written once the
    # starter has answered): ours to choose, so that ssh can start before the broker answers.
    alias = "ssh-to-job-" + "".join(c if c.isalnum() or c in "._" else "_" for c in jid.one)
    alias += "-" + os.urandom(4).hex()
    # The first command of a burst makes this job's master (_mux); -debug and
    # -remove-on-interrupt act on a session of their own. (_mux.usable already said no
    # to agent forwarding, whose socket would be the master's.)
    master = (
        mux_path is not None
        and not (opts.debug or opts.remove_on_interrupt)
        and _mux.claim(mux_path)
    )
    # ssh reads its config at start, and its key and known_hosts only once connected: so plain
    # ssh starts while the broker grants and the starter sets the session up, on a guess of
    # what session_ready will say (the login, the agent, the master's idle time); its start-up
    # (~12 ms here) leaves the session's path. A wrong guess costs a restart, a refusal a
    # SIGKILL. Only plain ssh: scp and sftp run ssh as their own child, which a SIGKILL of
    # them (a wrong guess, a failed set-up) would leave behind.
    early = os.path.basename(words[0]) == "ssh"
    guess: _Plan = (_own_login(), asks_agent, _GUESS_PERSIST if master else 0.0)
    launch: _Launch | None = None
    next_n = 1  # the number of ssh's config file, should the early one be abandoned
    _debug(opts, f"asking broker {opts.pool or sockpath} for a session into job {jid.one}")
    since = time.monotonic()
    status_shown = False
    granted = False
    try:
        while True:
            try:
                if opts.pool:  # a remote pool: TLS, a signed request, a relayed socket
                    if early:
                        early = False
                        launch = _Launch.start(opts, d, alias, guess, mux_path, 1)
                    reply, fd = _remote_grant(opts.pool, jid.one, public)
                else:
                    assert sockpath is not None
                    pending = send_request(sockpath, jid.one, public)
                    if early:  # while the broker works on the request
                        early = False
                        try:
                            launch = _Launch.start(opts, d, alias, guess, mux_path, 1)
                        except BaseException:
                            pending.close()
                            raise
                    reply, fd = receive_grant(pending)
            except (BrokerUnavailable, _CannotRun) as exc:
                return die(str(exc))
            if isinstance(reply, lean.Error) and reply.code == "idle" and opts.auto_retry:
                waited = time.monotonic() - since
                if sys.stderr.isatty():
                    print(
                        f"\rssh-to-job: job {jid.one} is idle; waited {int(waited)} s ...",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    print(
                        f"ssh-to-job: job {jid.one} is idle; waited {int(waited)} s",
                        file=sys.stderr,
                        flush=True,
                    )
                status_shown = True
                if launch is not None:  # waiting may take long: ssh starts again once granted
                    launch.abandon()
                    next_n, launch = launch.n + 1, None
                time.sleep(1.0)
                continue
            if status_shown and sys.stderr.isatty():
                print(file=sys.stderr)
            if isinstance(reply, lean.Error):
                if opts.auto_retry and reply.code in ("held", "finished", "unknown_job"):
                    return die(f"stopped waiting: {reply.message}")
                return die(reply.message)
            assert isinstance(reply, lean.SshGrant)
            assert fd is not None
            break
        granted = True
    finally:
        if not granted and launch is not None:
            # Refused, failed or interrupted before any grant: the early ssh goes quietly.
            launch.abandon()

    session = _socket.socket(fileno=fd)
    try:
        _debug(
            opts,
            f"session {reply.session_id[:8]} granted by the broker; starter {reply.starter_id}",
        )
        # The capability first, so that the starter sets the session up while ssh starts.
        try:
            send_open(session, reply, shells, persist=opts.persist)
        except OSError as exc:
            return die(f"job {reply.job}: {exc}")
        if launch is None and os.path.basename(words[0]) == "ssh":
            # Granted after waiting for an idle job (the early ssh went meanwhile): now.
            try:
                launch = _Launch.start(opts, d, alias, guess, mux_path, next_n)
            except _CannotRun as exc:
                return die(str(exc))
        try:
            ready = read_ready(session, reply)
        except (SessionError, OSError, ConnectionError, wire.ProtocolError) as exc:
            return die(f"job {reply.job}: {exc}")
        _debug(opts, f"starter host key verified; logging in as {ready.login}")
        forward_agent = ready.agent_forwarding and asks_agent
        _write(os.path.join(d, "known_hosts"), f"{alias} {ready.host_key}\n".encode())
        plan: _Plan = (ready.login, forward_agent, ready.mux_persist if master else 0.0)
        if launch is None or plan != launch.plan:
            n = 1
            if launch is not None:
                _debug(opts, "the starter's session_ready differs from the guess: restarting ssh")
                launch.abandon()
                n = launch.n + 1
                launch = None
            try:
                launch = _Launch.start(opts, d, alias, plan, mux_path, n)
            except _CannotRun as exc:
                return die(str(exc))
        if ready.banner and not opts.command and os.path.basename(launch.argv[0]) == "ssh":
            print(ready.banner, file=sys.stderr, flush=True)
        if not ready.agent_forwarding and asks_agent:
            # sshd would refuse the agent channel without a word: say it, once.
            print(
                "ssh-to-job: agent forwarding is off in this pool "
                "([starter] allow_agent_forwarding); -A has no effect",
                file=sys.stderr,
                flush=True,
            )
        # Until now a signal ended the set-up (KeyboardInterrupt, and ssh abandoned below);
        # from here on it is passed on to ssh.
        child = signals.child = launch.child
        try:
            handed = hand_over(launch.listener, session, child)
        finally:
            launch.listener.close()
        launch = None  # from here on ssh is the session's, to wait for
        session.close()
        rc = child.wait()
        if not handed and rc == 0:
            rc = 1
        if signals.interrupted and opts.remove_on_interrupt:
            _remove_job(opts, jid)
        return rc if rc >= 0 else 128 - rc
    finally:
        if launch is not None:
            # Set-up failed or was interrupted before ssh got the socket: ssh (waiting for
            # its ProxyCommand) goes without a word.
            launch.abandon()
        session.close()


#: ``[starter] mux_persist``'s default: the guess for a master's idle time (_Launch).
_GUESS_PERSIST = 10.0


def _own_login() -> str:
    """The login the starter names for a job of ours (``starter._session.login_name``)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"u{os.getuid()}"


#: What ssh's command line and config take from ``session_ready``: the login, agent
#: forwarding, and the master's idle time (0: no master).
_Plan = tuple[str, bool, float]


class _CannotRun(OSError):
    """ssh (scp, sftp) could not be started: the message names it."""


class _Launch:
    """ssh started ahead of the session socket: its ProxyCommand waits on ``listener``."""

    def __init__(
        self, child: Child, listener: _socket.socket, argv: list[str], plan: _Plan, n: int
    ) -> None:
        self.child = child
        self.listener = listener
        self.argv = argv
        self.plan = plan
        self.n = n

    @classmethod
    def start(
        cls,
        opts: Options,
        d: str,
        alias: str,
        plan: _Plan,
        mux_path: str | None,
        n: int,
    ) -> _Launch:
        login, agent, persist = plan
        # A fresh name each time: a helper of an abandoned ssh may still be connecting.
        proxy_name = f"ssh-to-job-{os.getuid()}-{os.urandom(16).hex()}"
        cfg = os.path.join(d, "config" if n == 1 else f"config.{n}")
        _write(cfg, ssh_config(d, login, alias, proxy_name, opts.x11, opts.debug, agent).encode())
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            listener.bind("\0" + proxy_name)
            listener.listen(1)
            argv = build_argv(opts, cfg)
            if persist > 0 and mux_path is not None:
                # The first command of a burst: its ssh stays as this job's master (_mux).
                argv[1:1] = _mux.master_options(mux_path, persist)
            if opts.debug:
                import shlex  # only to show the command line

                _debug(opts, "running " + shlex.join(argv))
            env = dict(os.environ)
            env["SHELL"] = "/bin/sh"  # ssh runs the ProxyCommand with $SHELL: keep it plain
            try:
                child = Child(argv, env)
            except OSError as exc:
                raise _CannotRun(f"cannot run {argv[0]}: {exc.strerror}") from None
        except BaseException:
            listener.close()
            raise
        return cls(child, listener, argv, plan, n)

    def abandon(self) -> None:
        """Stop this ssh before it had the socket (SIGKILL: not a word on the terminal; its
        ProxyCommand helper, finding ssh gone, exits quietly too). ssh goes first: were the
        listener closed while ssh lived, its helper would report the refusal."""
        try:
            self.child.send_signal(_signal.SIGKILL)
        except OSError:
            pass
        try:
            self.child.wait()
        except ChildProcessError:
            pass
        self.listener.close()


def _remote_grant(
    pool: str, job: str, public: str
) -> tuple[lean.SshGrant | lean.Error, int | None]:
    """A remote pool's answer (``client._remote``, wire messages) in the local path's shape."""
    from ._remote import request_session

    reply, fd = request_session(pool, job, public)
    if isinstance(reply, wire.Error):
        return lean.Error(code=reply.code, message=reply.message), fd
    if isinstance(reply, wire.SshGrant):
        grant = lean.SshGrant(
            session_id=reply.session_id,
            job=reply.job,
            capability=reply.capability,
            starter_id=reply.starter_id,
            starter_key=reply.starter_key,
        )
        return grant, fd
    if fd is not None:
        os.close(fd)
    raise BrokerUnavailable(f"the broker answered {reply.TYPE!r} to a session request")


def _remove_job(opts: Options, jid: lean.LocalJobId | SlurmJobId) -> None:
    if isinstance(jid, SlurmJobId):
        print(f"ssh-to-job: {jid.one} is Slurm's: remove it with scancel", file=sys.stderr)
        return
    try:
        with BrokerClient(find_socket(opts.name), timeout=10) as bc:
            reply = bc.request(
                wire.Act(action="rm", ids=(jid.one,), reason="ssh-to-job -remove-on-interrupt")
            )
        if isinstance(reply, wire.ActReply):
            for r in reply.results:
                print(f"ssh-to-job: {r.message}", file=sys.stderr)
    except (BrokerUnavailable, OSError) as exc:
        print(f"ssh-to-job: could not remove job {jid.one}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"ssh-to-job: {exc}\n\n{USAGE}", file=sys.stderr)
        return 2
    if opts.help:
        print(USAGE)
        return 0
    if opts.version:
        from ssh_to_job import __version__

        print(f"ssh-to-job {__version__}")
        return 0
    return run(opts)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once stdout and stderr are flushed, skipping the
    interpreter's teardown (module by module, then its heaps): 6–13 ms of CPU per session
    here, after a session whose files are already removed and whose ssh has exited."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can be said on it
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
