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

``repeat_argv`` is the reference for ``client/stj-front.c``, the compiled ``ssh-to-job`` on
PATH, which makes the same decision without starting Python and execs this module's ``main``
(the ``ssh-to-job-py`` entry point) for everything else: a change to the rules here needs the
same change there (tests/test_mux.py runs both on a table of command lines and compares).
"""

from __future__ import annotations

# The C modules, not hashlib/socket/pathlib/re: on a loaded 2-core host those cost 25 ms of
# imports against the master's ~8 ms for the command itself.
import _sha256  # type: ignore[import-not-found]  # hashlib's builtin sha256, no stub
import _socket
import os
import sys

# Not typing.TYPE_CHECKING: importing typing costs more than the rest of this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import pathlib

#: The client's own off switch (the pool's is the starter's ``mux_persist``).
ENV_OFF = "SSH_TO_JOB_MUX"
#: The options a repeat command may have; any other (-keygen-options, -debug, -X,
#: -remove-on-interrupt, ...) takes the full path, which checks and honours it.
_WITH_ARG = {"name", "ssh", "shells", "l", "p", "o"}
_HOST = "ssh-to-job"


def _name(base: str, broker: str, job: str, shells: tuple[str, ...]) -> str:
    key = "\0".join((os.path.realpath(broker), job, ",".join(shells)))
    digest: str = _sha256.sha256(key.encode()).hexdigest()
    return os.path.join(base, f"mux-{digest[:20]}")


def socket_path(base: pathlib.Path, broker: str, job: str, shells: tuple[str, ...]) -> pathlib.Path:
    """The master's socket: in ``base`` (the user's 0700 runtime directory), named by the pool
    (its broker's socket), the job and the shells asked for; short enough for ``sun_path``.
    ``job`` is the client's ``jid.one``; a Slurm job is named as ``job_one`` spells it, so that
    a repeat command, which has only ``job_one``, finds the master of any spelling of it."""
    import pathlib

    return pathlib.Path(_name(str(base), broker, job_one(job) or job, shells))


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


def alive(path: str | os.PathLike[str]) -> bool:
    """Whether a master answers on ``path``; a socket nobody listens on is removed."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(os.fspath(path))
        return True
    except FileNotFoundError:
        return False
    except OSError:
        # A master killed without cleaning up: the next full session makes a new one.
        try:
            os.unlink(path)
        except OSError:
            pass
        return False
    finally:
        s.close()


def master_options(path: str | os.PathLike[str], persist: float) -> list[str]:
    """ssh options that make the first session's ssh the master, idling ``persist`` seconds
    (command-line options win over our config's ``ControlMaster no``)."""
    return [
        "-o",
        "ControlMaster=yes",
        "-o",
        f"ControlPath={os.fspath(path)}",
        "-o",
        f"ControlPersist={max(1, int(persist))}s",
    ]


def client_config(path: str | os.PathLike[str], debug: bool) -> str:
    """The ssh_config of a command through the master: nothing else may be used. Were the
    master to go between our check and ssh's connect, ``ProxyCommand false`` makes ssh fail
    (exit 255) rather than connect anywhere else."""
    quoted = os.fspath(path)
    if '"' in quoted or "\n" in quoted:
        raise ValueError(f"path {quoted!r} cannot be written into an ssh_config")
    return (
        "\n".join(
            [
                "# ssh-to-job: a command through this user's master for the job; generated.",
                "Host *",
                "  ControlMaster no",
                f'  ControlPath "{quoted}"',
                "  ProxyCommand /bin/false",
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


def config_path(path: str | os.PathLike[str]) -> str:
    """Where the client config of commands through the master at ``path`` is kept."""
    return os.fspath(path) + ".cfg"


#: The lock of the ssh-to-job that is making a master: held until it exits (by then its ssh
#: has bound the socket, or failed), never inherited by ssh.
_claimed: list[int] = []


def claim(path: str | os.PathLike[str]) -> bool:
    """Become the one session that makes the master at ``path`` and write the client config
    of the commands that will use it. False when another ssh-to-job is making it right now
    (two would race for the socket, and the loser's ssh would complain on the terminal)."""
    import fcntl  # only the first command of a burst needs it

    path = os.fspath(path)
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    tmp = f"{cfg}.{os.getpid()}"
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


def command_argv(words: list[str], cfg: str, command: list[str]) -> list[str]:
    """ssh, scp or sftp with ``cfg``, as ``ssh_to_job.build_argv`` runs them."""
    prog = os.path.basename(words[0])
    if prog == "scp":
        return [words[0], "-F", cfg, *words[1:], *command]
    if prog == "sftp":
        return [words[0], "-F", cfg, *words[1:], *command, _HOST]
    return [words[0], "-F", cfg, *words[1:], _HOST, *command]


def broker_socket(name: str | None) -> str | None:
    """``client._broker.find_socket`` without its imports; None where the full path should
    judge (a config file that does not parse)."""
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


def _digits(text: str, most: int) -> bool:
    # ASCII digits only: int() and str.isdigit() would take other scripts' digits too.
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _slurm_one(text: str) -> str | None:
    """``str(wire.parse_slurm_id(text))`` (``slurm:JOB[_TASK][.STEP][+NODE]``, ``slurm-`` as
    ``slurm:``, numbers without leading zeros, the node as written); None where it raises."""
    text = text.strip()
    head, plus, node = text[6:].partition("+")
    if plus and not (
        0 < len(node) <= 64
        and node.isascii()
        and node[0].isalnum()
        and all(c.isalnum() or c in "._-" for c in node)
    ):
        return None
    head, dot, step = head.partition(".")
    job, under, task = head.partition("_")
    if not _digits(job, 10) or (under and not _digits(task, 10)):
        return None
    if dot and step != "batch":
        if not _digits(step, 9):
            return None
        step = str(int(step))
    one = f"slurm:{int(job)}"
    if under:
        one += f"_{int(task)}"
    if dot:
        one += f".{step}"
    return one + (f"+{node}" if plus else "")


def job_one(text: str) -> str | None:
    """The job ``ssh_to_job.parse_job(text)`` names, as one string: ``cluster.proc`` as
    ``wire.parse_job_id(text).one`` spells it, a Slurm job as ``str(wire.parse_slurm_id(text))``
    does (one name for every spelling of it); None where parse_job raises."""
    if text.startswith(("slurm:", "slurm-")):
        return _slurm_one(text)
    parts = text.strip().split(".")
    if not 1 <= len(parts) <= 3 or (len(parts) == 3 and parts[2] != "0"):
        return None
    limits = (12, 9, 1)
    for part, most in zip(parts, limits, strict=False):
        if not _digits(part, most):
            return None
    return f"{int(parts[0])}.{int(parts[1]) if len(parts) > 1 else 0}"


def repeat_argv(argv: list[str]) -> list[str] | None:
    """The command to exec for a repeat command through a live master, or None: then the
    full ``ssh-to-job`` runs (any option but the plain ones, no master, anything unsure)."""
    ssh, name, shells = "", None, ""
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
    job = job_one(argv[i].rpartition("@")[2])
    if job is None:
        return None
    words = ["ssh"]
    if ssh:
        import shlex  # only with -ssh: it imports re

        try:
            words = shlex.split(ssh)
        except ValueError:
            return None
    if not words or not usable(words, None):
        return None
    if not argv[i + 1 :] and words[0].rpartition("/")[2] == "ssh":
        # An interactive login is a person, not a loop: it takes the full path, which shows
        # the job's welcome line, and the master is left to repeat commands.
        return None
    wanted = tuple(x for x in shells.split(",") if x)
    if not wanted and os.environ.get("SHELL"):
        wanted = (os.environ["SHELL"],)
    broker = broker_socket(name)
    from ssh_to_job import common  # os and stat only (the runtime directory's checks)

    base = common.private_runtime_dir()
    if broker is None or base is None:
        return None
    path = _name(base, broker, job, wanted)
    cfg = config_path(path)
    if not alive(path) or not os.path.exists(cfg):
        return None
    return command_argv(words, cfg, argv[i + 1 :])


def main() -> int:
    """``ssh-to-job``: a repeat command through a live master, else the full session."""
    if sys.argv[0].endswith("ssh-to-job-py"):
        # The entry point the compiled front execs: messages name the command the user typed.
        sys.argv[0] = sys.argv[0][: -len("-py")]
    argv = sys.argv[1:]
    again = repeat_argv(argv)
    if again is not None:
        try:
            os.execvp(again[0], again)  # noqa: S606 - the user's ssh, as the full path runs it
        except OSError:
            pass  # the full path says what is wrong
    from .ssh_to_job import exit_now
    from .ssh_to_job import main as full

    # Without the interpreter's teardown (6-13 ms of CPU): the session is over, its files
    # are removed and its ssh has exited.
    exit_now(full(argv))
