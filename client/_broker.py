"""A small blocking client for the broker's unix socket (no trio: command start-up is lean).

Who we are is not sent: the broker reads it from the socket (SO_PEERCRED). ``ssh`` also
receives the session socket the broker passes along with the grant (SCM_RIGHTS).
"""

from __future__ import annotations

import array
import os
import pathlib
import socket
import sys

from ssh_to_job import common, wire

SYSTEM_SOCKET = common.SYSTEM_STATE_DIR / "broker.sock"


class BrokerUnavailable(ConnectionError):
    pass


def find_socket(name: str | None = None, config_path: str | None = None) -> pathlib.Path:
    """Where the broker listens: -name, $STJ_STATE_DIR, the config, your pool, the system's."""
    if name:
        p = pathlib.Path(name)
        return p / "broker.sock" if p.is_dir() else p
    config = common.load_config(config_path)
    explicit = os.environ.get(common.ENV_STATE_DIR) or config.state_dir
    if explicit:
        return pathlib.Path(explicit) / "broker.sock"
    personal = common.default_state_dir() / "broker.sock"
    if personal.exists() or not SYSTEM_SOCKET.exists():
        return personal
    return SYSTEM_SOCKET


class BrokerClient:
    def __init__(self, path: pathlib.Path, timeout: float = 60.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise BrokerUnavailable(
                f"cannot reach the broker at {path}: {exc.strerror or exc}. Is a pool running "
                "('stj pool'), or does -name/STJ_STATE_DIR point at it?"
            ) from None
        self.conn = wire.Connection(wire.Channel.CONTROL, wire.Role.CLIENT, wire.Role.BROKER)
        self.fds: list[int] = []

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _next(self) -> wire.Message:
        while True:
            event = self.conn.next_event()
            if isinstance(event, wire.Message):
                return event
            if event is wire.CLOSED:
                raise BrokerUnavailable("the broker closed the connection")
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            except OSError as exc:
                raise BrokerUnavailable(f"lost the broker: {exc}") from None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.fds.extend(fds)
            self.conn.receive_data(data)

    def request(self, msg: wire.Message) -> wire.Message:
        self.sock.sendall(self.conn.send(msg))
        return self._next()

    def jobs(self, query: wire.Query) -> list[wire.JobInfo] | wire.Error:
        reply = self.request(query)
        out: list[wire.JobInfo] = []
        while True:
            if isinstance(reply, wire.Error):
                return reply
            assert isinstance(reply, wire.JobList)
            out.extend(reply.jobs)
            if reply.last:
                return out
            reply = self._next()

    def ssh(self, msg: wire.SshRequest) -> tuple[wire.Message, int | None]:
        """Returns the reply and, with a grant, the session socket's file descriptor."""
        reply = self.request(msg)
        fd = self.fds.pop(0) if self.fds else None
        if isinstance(reply, wire.SshGrant) and fd is None:
            raise BrokerUnavailable("the broker granted a session but passed no socket")
        return reply, fd


def die(message: str, code: int = 1) -> int:
    print(f"{os.path.basename(sys.argv[0]) or 'stj'}: {message}", file=sys.stderr)
    return code
