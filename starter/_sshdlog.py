"""What a session's sshd logged about the session: the forwards it was asked for, and which
process was its command.

The session's sshd runs at ``LogLevel DEBUG1`` (written to ``sshd.log`` in the session dir,
never sent anywhere): that is the lowest level at which OpenSSH names a session's forwarding
requests. Measured with OpenSSH 9.2: a remote forward (``-R``) is logged when it is asked for;
a local or dynamic forward (``-L``, ``-D``) only when a connection goes through it, as a
``direct-tcpip`` channel to its target, so the two look alike here and an unused ``-L`` leaves
no trace; X11 and agent forwarding show as their session requests. sshd logs no exit status at
any level.

The log is written by sshd as the job's uid, in a directory that uid owns: what it says is what
the job's user could have written. It is read like untrusted input: no link followed, no FIFO
blocked on, a bounded amount, a bounded number of entries.

Must never: raise on any content of the log.
"""

from __future__ import annotations

import os
import pathlib
import re
import stat

#: Read at most this much of a session's log, and keep at most this many distinct forwards.
MAX_READ = 8 << 20
MAX_FORWARDS = 32

_LOCAL = ("", "localhost", "127.0.0.1", "::1")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"tcpip-forward listen (\S*) port (\d+)"), "R"),
    (re.compile(r"server_request_direct_tcpip: originator .* target (\S+) port (\d+)"), "L"),
    (re.compile(r"streamlocal-forward listen path (\S+)"), "R"),
    (re.compile(r"server_request_direct_streamlocal: originator .* target (\S+)"), "L"),
    (re.compile(r"session_input_channel_req: session \d+ req x11-req"), "X11"),
    (re.compile(r"session_input_channel_req: session \d+ req auth-agent-req"), "agent"),
)


def _entry(kind: str, groups: tuple[str, ...]) -> str:
    if kind in ("X11", "agent"):
        return kind
    if len(groups) == 1:
        return f"{kind}:{groups[0]}"  # a unix socket path
    host, port = groups
    if kind == "R" and host in _LOCAL:
        return f"R:{port}"
    return f"{kind}:{host}:{port}"


def forwards(text: str) -> str:
    """The forwards in an sshd log, in the order first seen, comma-separated."""
    seen: dict[str, None] = {}
    more = 0
    for line in text.splitlines():
        for pattern, kind in _PATTERNS:
            m = pattern.search(line)
            if m is None:
                continue
            entry = _entry(kind, m.groups()).replace(",", "%2C")
            if entry in seen:
                break
            if len(seen) < MAX_FORWARDS:
                seen[entry] = None
            else:
                more += 1
            break
    out = ",".join(seen)
    return f"{out},+{more} more" if more else out


_EXIT_MESSAGE = re.compile(r"session_exit_message: session \d+ channel \d+ pid (\d+)")


def command_pid(text: str) -> int:
    """The pid of the session's first command whose exit sshd reported to the client (0 if
    none): its exit status is the session's."""
    m = _EXIT_MESSAGE.search(text)
    return int(m[1]) if m and len(m[1]) <= 10 else 0


def read(path: pathlib.Path, limit: int = MAX_READ) -> str:
    """A log a job's uid could have tampered with, read as root: "" if it is not a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
