"""Repeat commands over one OpenSSH ControlMaster per (user, pool, job).

The first ``ssh-to-job`` of a burst is a full session (broker, capability, host key) whose ssh
becomes a ControlMaster with a short ``ControlPersist``; while it lives, the next commands to
the same job from the same user go through it and skip the broker, the capability and the key
exchange. The pool decides: the starter says in ``session_ready`` how long a master may idle
(``[starter] mux_persist``; 0 turns it off, and then its sshd refuses a second session on a
connection with ``MaxSessions 1``).

Never: a socket anywhere but the user's own 0700 runtime directory (OpenSSH's master checks
the peer uid too), a master shared between pools, jobs or shell choices (they are in the
socket's name), or a master for a session whose ssh options this module cannot vouch for
(agent or X11 forwarding, a custom -ssh program): those always get a full session.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shlex
import socket
import stat
import sys

#: The client's own off switch (the pool's is the starter's ``mux_persist``).
ENV_OFF = "SSH_TO_JOB_MUX"
#: ``ssh-to-job``'s entry point lives here so that a repeat command costs an interpreter and
#: this module, not the imports of a full session (attrs, wire, nacl: ~150 ms on a loaded
#: 2-core machine against the master's ~8 ms).
_JOB_RE = re.compile(r"^([0-9]{1,12})(?:\.([0-9]{1,9}))?(?:\.0)?$")
#: The options a repeat command may have; any other (-keygen-options, -debug, -X,
#: -remove-on-interrupt, ...) takes the full path, which checks and honours it.
_WITH_ARG = {"name", "ssh", "shells", "l", "p", "o"}
_HOST = "ssh-to-job"


def socket_path(base: pathlib.Path, broker: str, job: str, shells: tuple[str, ...]) -> pathlib.Path:
    """The master's socket: in ``base`` (the user's 0700 runtime directory), named by the pool
    (its broker's socket), the job and the shells asked for; short enough for ``sun_path``."""
    key = "\0".join((os.path.realpath(broker), job, ",".join(shells)))
    return base / f"mux-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def usable(ssh_words: list[str], x11: bool | None) -> bool:
    """Whether a session run with these options may make or use a master: plain ssh, scp or
    sftp, no agent forwarding (it would be the master's), no X11 (the master's DISPLAY)."""
    if os.environ.get(ENV_OFF, "1") in ("0", "no", "off"):
        return False
    if x11:
        return False
    if os.path.basename(ssh_words[0]) not in ("ssh", "scp", "sftp"):
        return False
    for i, w in enumerate(ssh_words[1:], 1):
        if w.startswith("-o"):
            opt = (w[2:] or (ssh_words[i + 1] if i + 1 < len(ssh_words) else "")).lower()
            if opt.startswith(("forwardagent", "forwardx11", "control", "proxy")):
                return False
        elif w.startswith("-") and not w.startswith("--") and set(w[1:]) & set("AXYSM"):
            # Agent, X11, or a control socket or master of the user's own.
            return False
    return True


def alive(path: pathlib.Path) -> bool:
    """Whether a master answers on ``path``; what a gone one left behind is removed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except FileNotFoundError:
        return False
    except OSError:
        # A master killed without cleaning up: the next full session makes a new one.
        try:
            path.unlink()
        except OSError:
            pass
        return False
    finally:
        s.close()


def master_options(path: pathlib.Path, persist: float) -> list[str]:
    """ssh options that make the first session's ssh the master, idling ``persist`` seconds
    (command-line options win over our config's ``ControlMaster no``)."""
    return [
        "-o",
        "ControlMaster=yes",
        "-o",
        f"ControlPath={path}",
        "-o",
        f"ControlPersist={max(1, int(persist))}s",
    ]


def client_config(path: pathlib.Path, debug: bool) -> str:
    """The ssh_config of a command through the master: nothing else may be used. Were the
    master to go between our check and ssh's connect, ``ProxyCommand false`` makes ssh fail
    (exit 255) rather than connect anywhere else."""
    quoted = str(path)
    if '"' in quoted or "\n" in quoted:
        raise ValueError(f"path {quoted!r} cannot be written into an ssh_config")
    return (
        "\n".join(
            [
                "# ssh-to-job: a command through this user's master for the job; generated.",
                "Host *",
                "  ControlMaster no",
                f'  ControlPath "{quoted}"',
                f"  ProxyCommand {shlex.quote('/bin/false')}",
                "  BatchMode yes",
                "  ForwardAgent no",
                "  ForwardX11 no",
                "  IdentityAgent none",
                "  IdentitiesOnly yes",
                "  StrictHostKeyChecking yes",
                "  UserKnownHostsFile /dev/null",
                "  GlobalKnownHostsFile /dev/null",
                f"  LogLevel {'DEBUG' if debug else 'ERROR'}",
            ]
        )
        + "\n"
    )


def config_path(path: pathlib.Path) -> pathlib.Path:
    """Where the client config of commands through the master at ``path`` is kept."""
    return path.with_name(path.name + ".cfg")


#: The lock of the ssh-to-job that is making a master: held until it exits (by then its ssh
#: has bound the socket, or failed), never inherited by ssh.
_claimed: list[int] = []


def claim(path: pathlib.Path) -> bool:
    """Become the one session that makes the master at ``path`` and write the client config
    of the commands that will use it. False when another ssh-to-job is making it right now
    (two would race for the socket, and the loser's ssh would complain on the terminal)."""
    import fcntl  # only the first command of a burst needs it

    try:
        fd = os.open(
            path.with_name(path.name + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    if alive(path):  # made meanwhile by the one that held the lock
        os.close(fd)
        return False
    cfg = config_path(path)
    tmp = cfg.with_name(f"{cfg.name}.{os.getpid()}")
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(out, client_config(path, debug=False).encode())
        finally:
            os.close(out)
        os.replace(tmp, cfg)
    except OSError:
        os.close(fd)
        return False
    _claimed.append(fd)
    return True


def command_argv(words: list[str], cfg: pathlib.Path, command: list[str]) -> list[str]:
    """ssh, scp or sftp with ``cfg``, as ``ssh_to_job.build_argv`` runs them."""
    prog = os.path.basename(words[0])
    if prog == "scp":
        return [words[0], "-F", str(cfg), *words[1:], *command]
    if prog == "sftp":
        return [words[0], "-F", str(cfg), *words[1:], *command, _HOST]
    return [words[0], "-F", str(cfg), *words[1:], _HOST, *command]


def _broker_socket(name: str | None) -> str | None:
    """``client._broker.find_socket`` without its imports; None where it would need the
    config parser's judgement (then the full path decides)."""
    if name:
        return os.path.join(name, "broker.sock") if os.path.isdir(name) else name
    env = os.environ.get("STJ_STATE_DIR")
    if env:
        return os.path.join(env, "broker.sock")
    config = os.environ.get("STJ_CONFIG") or "/etc/ssh-to-job/config.toml"
    if os.environ.get("STJ_CONFIG") or os.path.exists(config):
        import tomllib  # only here: a config file is read as the full path reads it

        try:
            with open(config, "rb") as f:
                state_dir = tomllib.load(f).get("pool", {}).get("state_dir", "")
        except (OSError, ValueError, AttributeError):
            return None  # the full path says what is wrong with it
        if not isinstance(state_dir, str):
            return None
        if state_dir:
            return os.path.join(state_dir, "broker.sock")
    if os.getuid() == 0:
        personal = "/var/lib/ssh-to-job/broker.sock"
    else:
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        personal = os.path.join(base, "ssh-to-job", "broker.sock")
    system = "/var/lib/ssh-to-job/broker.sock"
    return personal if os.path.exists(personal) or not os.path.exists(system) else system


def _private_base() -> pathlib.Path | None:
    """The per-uid runtime directory ``ssh_to_job.runtime_dir`` uses, if it is ours and
    private; never made here (the first, full session makes it)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base) or os.stat(base).st_uid != os.getuid():
        base = os.environ.get("TMPDIR") or "/tmp"
    d = pathlib.Path(base) / f"ssh-to-job-{os.getuid()}"
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return d


def repeat_argv(argv: list[str]) -> list[str] | None:
    """The command to exec for a repeat command through a live master, or None: then the
    full ``ssh-to-job`` runs (any option but the plain ones, no master, anything unsure)."""
    ssh, name, shells = "ssh", None, ""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        if arg == "--":
            i += 1
            break
        key, eq, inline = arg.lstrip("-").partition("=")
        if key not in _WITH_ARG:
            return None
        if not eq:
            i += 1
            if i >= len(argv):
                return None
            inline = argv[i]
        if key == "ssh":
            ssh = inline
        elif key == "name":
            name = inline
        elif key == "shells":
            shells = inline
        i += 1
    if i >= len(argv):
        return None
    m = _JOB_RE.match(argv[i].rpartition("@")[2].strip())
    if not m:
        return None
    job = f"{int(m[1])}.{int(m[2] or 0)}"
    try:
        words = shlex.split(ssh)
    except ValueError:
        return None
    if not words or not usable(words, None):
        return None
    wanted = tuple(x for x in shells.split(",") if x)
    if not wanted and os.environ.get("SHELL"):
        wanted = (os.environ["SHELL"],)
    broker = _broker_socket(name)
    base = _private_base()
    if broker is None or base is None:
        return None
    path = socket_path(base, broker, job, wanted)
    cfg = config_path(path)
    if not alive(path) or not cfg.exists():
        return None
    return command_argv(words, cfg, argv[i + 1 :])


def main() -> int:
    """``ssh-to-job``: a repeat command through a live master, else the full session."""
    argv = sys.argv[1:]
    again = repeat_argv(argv)
    if again is not None:
        try:
            os.execvp(again[0], again)  # noqa: S606 - the user's ssh, as the full path runs it
        except OSError:
            pass  # the full path says what is wrong
    from .ssh_to_job import main as full

    return full(argv)
