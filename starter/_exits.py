"""The exit status of each session's command, for its record, from the kernel's process events.

sshd sends a session's exit status to the client only, inside the encrypted stream, and logs it
at no level (OpenSSH 9.2, checked up to DEBUG3); its log does name the command's pid
(``session_exit_message: ... pid N``). The command is not our child (sshd's session process
forks it and reaps it), so the starter learns its status from the proc connector (netlink,
``NETLINK_CONNECTOR``/``CN_IDX_PROC``): it follows forks from each session's sshd down two
levels (sshd → its session process → the commands it runs) and keeps the exit status of those
commands only, until the session's record is written.

The connector needs root (CAP_NET_ADMIN) in the host's first network namespace; elsewhere (a
personal pool run by a user, a starter in a network namespace) it is not there and statuses stay
unknown (-1). Events lost to a full socket buffer make a status unknown, never wrong: a pid is
only ever matched to the process whose fork we saw.

Must never: block the starter (reads are non-blocking), or keep state for processes that are not
a session's.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

import trio

log = logging.getLogger("stj.starter")

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_NLMSG_DONE = 3
_PROC_EVENT_FORK = 0x00000001
_PROC_EVENT_EXIT = 0x80000000
#: nlmsghdr (16) + cn_msg (20), then proc_event: what, cpu, timestamp (16), then the event.
_EVENT_AT = 16 + 20
_BODY_AT = _EVENT_AT + 16
_FORK = struct.Struct("=IIII")  # parent pid, parent tgid, child pid, child tgid
_EXIT = struct.Struct("=IIIIII")  # pid, tgid, exit code, exit signal, parent pid, parent tgid
#: A session's commands whose forks we follow (sshd forks one per channel, xauth...).
MAX_COMMANDS = 64


def wait_status(code: int) -> int:
    """A raw wait status as a shell reports it: the exit status, or 128 + the signal."""
    sig = code & 0x7F
    return 128 + sig if sig else (code >> 8) & 0xFF


class ExitWatch:
    """Exit statuses of the commands the watched sshd processes run.

    Subscribed only while a session is open: every fork and exit on the host is an event, and
    a starter with no session has no use for them.
    """

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        #: Whether this host gives us process events at all (checked once, by ``probe``).
        self.available = False
        self._opened = trio.Event()
        #: sshd pid -> {command pid: raw wait status, or None while it runs}
        self._sessions: dict[int, dict[int, int | None]] = {}
        #: an sshd's session process (its fork) -> that sshd
        self._middle: dict[int, int] = {}
        #: a command (a fork of a session process) -> its sshd
        self._commands: dict[int, int] = {}

    def probe(self) -> bool:
        """Whether process events can be had here (root, the host's network namespace)."""
        self.available = self._open()
        self._close()
        if not self.available:
            log.info("no process events here: session exit statuses are not recorded")
        return self.available

    def _open(self) -> bool:
        if os.geteuid() != 0:
            return False
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
        except OSError:
            return False
        try:
            sock.bind((0, _CN_IDX_PROC))
            op = struct.pack("=I", _PROC_CN_MCAST_LISTEN)
            cn = struct.pack("=IIIIHH", _CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(op), 0) + op
            sock.send(struct.pack("=IHHII", 16 + len(cn), _NLMSG_DONE, 0, 0, 0) + cn)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("process events: %s; this session's exit status is not recorded", exc)
            return False
        self.sock = sock
        self._opened.set()
        return True

    def _close(self) -> None:
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None

    async def run(self) -> None:
        """Read events whenever a session is open, for as long as the starter runs."""
        try:
            while True:
                sock = self.sock
                if sock is None:
                    await self._opened.wait()
                    self._opened = trio.Event()
                    continue
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    continue  # the last session ended
                self.drain()
        finally:
            self._close()

    def watch(self, sshd: int) -> None:
        """Follow the forks of this just started sshd (it forks its session process only after
        the key exchange, long after this)."""
        if self.available and (self.sock is not None or self._open()):
            self._sessions[sshd] = {}

    def result(self, sshd: int, command_pid: int) -> int:
        """The exit status of ``command_pid`` if it was one of this sshd's commands (-1 when
        not known); forget everything about this sshd."""
        self.drain(limit=100_000)
        statuses = self._sessions.pop(sshd, {})
        for table in (self._middle, self._commands):
            for pid in [p for p, owner in table.items() if owner == sshd]:
                del table[pid]
        if not self._sessions:
            self._close()
        code = statuses.get(command_pid)
        return -1 if code is None else wait_status(code)

    def drain(self, limit: int = 1000) -> None:
        """Handle up to ``limit`` events queued now, without blocking (a host that forks
        without pause must not keep the starter from its other work)."""
        for _ in range(limit):
            if self.sock is None:
                return
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    log.warning("process events: %s; exit statuses not recorded", exc)
                    self.available = False
                    self._close()
                # ENOBUFS: events were lost, so some status will be unknown.
                continue
            self._event(data)

    def _event(self, data: bytes) -> None:
        if len(data) < _BODY_AT + _EXIT.size:
            return
        (what,) = struct.unpack_from("=I", data, _EVENT_AT)
        if what == _PROC_EVENT_FORK:
            _ppid, ptgid, pid, tgid = _FORK.unpack_from(data, _BODY_AT)
            if pid != tgid:
                return  # a thread
            if ptgid in self._sessions:
                self._middle[pid] = ptgid
            elif ptgid in self._middle:
                sshd = self._middle[ptgid]
                commands = self._sessions[sshd]
                if len(commands) < MAX_COMMANDS:
                    commands[pid] = None
                    self._commands[pid] = sshd
        elif what == _PROC_EVENT_EXIT:
            pid, tgid, code, _sig, _ppid, _ptgid = _EXIT.unpack_from(data, _BODY_AT)
            if pid != tgid:
                return
            if pid in self._commands:
                self._sessions[self._commands.pop(pid)][pid] = code
            self._middle.pop(pid, None)
