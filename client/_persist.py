"""``ssh-to-job --persist [--persist-name NAME]``: attach to a tmux session that lives in the job.

The client only asks (``SessionOpen.persist``): the starter starts the job's tmux server as the
job, in the job, and makes the named session before sshd runs. The ssh session then attaches to
it through the job's private socket, which the session finds in ``SSH_TO_JOB_TMUX``. Detaching,
or losing the connection, leaves the terminal running in the job until the job ends.
"""

from __future__ import annotations

#: The default session name of a bare ``--persist``.
DEFAULT = "main"
#: tmux target names: no '.', ':' or '=' (tmux's target syntax), nothing a shell expands.
#: A name's characters ([A-Za-z0-9_-], 1 to 32 of them): a set, not a regex, since re costs
#: every session's start-up ~3 ms and this module is on its path.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check(name: str, command: list[str], ssh_prog: str) -> str:
    """Why these options cannot go together ("" if they can)."""
    if not (1 <= len(name) <= 32 and all(c in _NAME_CHARS for c in name)):
        return f"--persist-name {name!r}: use 1 to 32 letters, digits, '_' or '-'"
    if command:
        return "--persist attaches to a terminal: it takes no remote command"
    if ssh_prog != "ssh":
        return f"--persist needs ssh, not {ssh_prog}"
    return ""


def remote_command(name: str) -> str:
    """The remote command that attaches (``=``: that session exactly, not one whose name
    starts so; ``-N``: never start a tmux server outside the job)."""
    return f'exec tmux -N -S "$SSH_TO_JOB_TMUX" attach-session -t ={name}'
