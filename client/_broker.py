"""A small blocking client for the broker's unix socket (no trio: command start-up is lean).

Who we are is not sent: the broker reads it from the socket (SO_PEERCRED). ``ssh`` also
receives the session socket the broker passes along with the grant (SCM_RIGHTS).
"""

from __future__ import annotations

import _socket
import os
import sys

from ssh_to_job import common, wire
from ssh_to_job.wire import lean

# Not typing.TYPE_CHECKING: typing, pathlib and the wire's message classes stay off the
# session path (``request_grant``); ``wire`` and ``common`` load their names on first use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable
    from typing import Any, TypeVar

    _R = TypeVar("_R", bound=wire.Message)


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached, went away mid-request, or answered nonsense."""


class BrokerRefused(Exception):
    """The broker answered with an error frame; ``message`` is meant for the user."""

    def __init__(self, error: wire.Error) -> None:
        super().__init__(error.message)
        self.code = error.code
        self.message = error.message


class RequestTooLarge(ValueError):
    """The request does not fit in one frame (e.g. a submit with a huge environment)."""


def find_socket(name: str | None = None, config_path: str | None = None) -> pathlib.Path:
    """Where the broker listens: -name, $STJ_STATE_DIR, the config, your pool, the system's
    (the whole config file is checked, as every ``stj`` command does)."""
    import pathlib

    if not name:
        common.load_config(config_path)
    return pathlib.Path(socket_path(name, config_path))


def socket_path(name: str | None = None, config_path: str | None = None) -> str:
    """``find_socket`` for a session's start-up: of the config, only ``[pool]`` is read."""
    return common.broker_socket(name, config_path)


def _connect(path: str | os.PathLike[str], timeout: float) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise BrokerUnavailable(
            f"cannot reach the broker at {path}: {exc.strerror or exc}. Is a pool running "
            "('stj pool'), or does -name/STJ_STATE_DIR point at it?"
        ) from None
    return sock


def _receive_fds(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            # C ints (not the array module: it imports collections.abc, ~2 ms a session).
            into.extend(
                int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True)
                for i in range(0, len(payload) - 3, 4)
            )


def request_grant(
    path: str | os.PathLike[str], job: str, client_key: str, timeout: float = 60.0
) -> tuple[lean.SshGrant | lean.Error, int | None]:
    """``BrokerClient(path).ssh(wire.SshRequest(job, client_key))`` on ``wire.lean``: the
    reply and, with a grant, the session socket's file descriptor (the caller's to close)."""
    return receive_grant(send_request(path, job, client_key, timeout))


def send_request(
    path: str | os.PathLike[str], job: str, client_key: str, timeout: float = 60.0
) -> _socket.socket:
    """The first half of :func:`request_grant`: connect and send the request. The caller may
    do other work while the broker answers, then must call :func:`receive_grant`."""
    try:
        data = lean.ssh_request_frame(job, client_key)
    except wire.LocalProtocolError as exc:
        raise RequestTooLarge(f"the request is too large to send: {exc}") from None
    sock = _connect(path, timeout)
    try:
        sock.sendall(data)
    except OSError as exc:
        sock.close()
        raise BrokerUnavailable(f"lost the broker: {exc.strerror or exc}") from None
    return sock


def receive_grant(sock: _socket.socket) -> tuple[lean.SshGrant | lean.Error, int | None]:
    """The second half of :func:`request_grant`: the broker's answer on ``sock`` (closed)."""
    fds: list[int] = []
    try:
        decoder = wire.FrameDecoder()
        try:
            while True:
                payload = decoder.next_frame()
                if isinstance(payload, bytes):
                    reply = lean.decode_reply(payload, lean.GRANT_REPLIES)
                    break
                if payload is wire.CLOSED:
                    raise BrokerUnavailable("the broker closed the connection")
                try:
                    chunk, ancdata, _flags, _addr = sock.recvmsg(65536, _socket.CMSG_SPACE(4 * 4))
                except OSError as exc:
                    raise BrokerUnavailable(f"lost the broker: {exc}") from None
                _receive_fds(ancdata, fds)
                decoder.receive_data(chunk)
        except wire.RemoteProtocolError as exc:
            raise BrokerUnavailable(f"the broker sent something unreadable: {exc}") from None
        fd = fds.pop(0) if fds else None
        if isinstance(reply, lean.SshGrant) and fd is None:
            raise BrokerUnavailable("the broker granted a session but passed no socket")
        assert isinstance(reply, lean.SshGrant | lean.Error)
        return reply, fd
    finally:
        for extra in fds:
            os.close(extra)
        sock.close()


class BrokerClient:
    def __init__(self, path: pathlib.Path, timeout: float = 60.0) -> None:
        self.path = path
        self.sock = _connect(path, timeout)
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
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, _socket.CMSG_SPACE(4 * 4))
            except OSError as exc:
                raise BrokerUnavailable(f"lost the broker: {exc}") from None
            _receive_fds(ancdata, self.fds)
            self.conn.receive_data(data)

    def _receive(self) -> wire.Message:
        try:
            return self._next()
        except wire.RemoteProtocolError as exc:
            raise BrokerUnavailable(f"the broker sent something unreadable: {exc}") from None

    def request(self, msg: wire.Message) -> wire.Message:
        try:
            data = self.conn.send(msg)
        except wire.LocalProtocolError as exc:
            raise RequestTooLarge(f"the request is too large to send: {exc}") from None
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise BrokerUnavailable(f"lost the broker: {exc.strerror or exc}") from None
        return self._receive()

    def call(self, msg: wire.Message, reply_type: type[_R]) -> _R:
        """Send ``msg`` and return its reply: BrokerRefused for an error, BrokerUnavailable
        for anything that is not a ``reply_type``."""
        reply = self.request(msg)
        if isinstance(reply, wire.Error):
            raise BrokerRefused(reply)
        if not isinstance(reply, reply_type):
            raise BrokerUnavailable(f"the broker answered {reply.TYPE!r} to {msg.TYPE!r}")
        return reply

    def jobs(self, query: wire.Query) -> list[wire.JobInfo] | wire.Error:
        reply = self.request(query)
        out: list[wire.JobInfo] = []
        while True:
            if isinstance(reply, wire.Error):
                return reply
            if not isinstance(reply, wire.JobList):
                raise BrokerUnavailable(f"the broker answered {reply.TYPE!r} to a query")
            out.extend(reply.jobs)
            if reply.last:
                return out
            reply = self._receive()

    def job_table(
        self, query: wire.Query, on_page: Callable[[list[Any] | None, str, int], None]
    ) -> wire.Error | None:
        """The rows of a ``query`` with ``table`` (``wire.JOB_COLUMNS`` values each, or with
        ``objects`` objects keyed by them), handed to ``on_page`` with the page's text and
        its number of rows a page at a time as they arrive, so that the caller's work
        overlaps the broker's. Each row's shape is checked (an array as long as the columns,
        or an object of exactly the columns in order, none twice); its values are the
        caller's to check. A page of objects that ``_object_page`` matches (ASCII text, each
        value also of its column's JSON type) is not parsed: its rows are None."""
        import json  # only listings need it, not a session's start-up

        import attrs

        reply = self.request(attrs.evolve(query, table=True))
        width = len(wire.JOB_COLUMNS)
        columns = list(wire.JOB_COLUMNS)

        def row(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            # Every object of a page of objects is a row (no value is an object): exactly
            # the columns, in order, none twice.
            if [k for k, _ in pairs] != columns:
                raise ValueError("not a job row")
            return dict(pairs)

        fast = _object_page().fullmatch if query.objects else None
        while True:
            if isinstance(reply, wire.Error):
                return reply
            if not isinstance(reply, wire.JobTable):
                raise BrokerUnavailable(f"the broker answered {reply.TYPE!r} to a query")
            if reply.columns != wire.JOB_COLUMNS:
                raise BrokerUnavailable("the broker's job rows have other columns than ours")
            text = reply.rows
            if fast is not None and fast(text):
                # Rows are separated by ",\n" and a matched page holds no other line feed.
                on_page(None, text, text.count("\n") + 1 if len(text) > 2 else 0)
            else:
                try:
                    rows = json.loads(text, object_pairs_hook=row) if fast else json.loads(text)
                except (ValueError, RecursionError):
                    rows = None
                if type(rows) is not list or not (
                    set(map(type, rows)) <= {dict}
                    if query.objects
                    else set(map(type, rows)) <= {list} and set(map(len, rows)) <= {width}
                ):
                    raise BrokerUnavailable("the broker sent malformed job rows")
                on_page(rows, text, len(rows))
            if reply.last:
                return None
            reply = self._receive()

    def clusters(self, query: wire.ClusterQuery) -> list[wire.ClusterInfo] | wire.Error:
        reply = self.request(query)
        out: list[wire.ClusterInfo] = []
        while True:
            if isinstance(reply, wire.Error):
                return reply
            if not isinstance(reply, wire.ClusterList):
                raise BrokerUnavailable(f"the broker answered {reply.TYPE!r} to a query")
            out.extend(reply.clusters)
            if reply.last:
                return out
            reply = self._receive()

    def ssh(self, msg: wire.SshRequest) -> tuple[wire.Message, int | None]:
        """Returns the reply and, with a grant, the session socket's file descriptor."""
        reply = self.request(msg)
        fd = self.fds.pop(0) if self.fds else None
        if isinstance(reply, wire.SshGrant) and fd is None:
            raise BrokerUnavailable("the broker granted a session but passed no socket")
        return reply, fd


def _object_page() -> Any:
    """The compiled pattern of a ``job_table`` page of objects as the broker writes it: rows
    separated by ``,`` and a line feed, each exactly ``wire.JOB_COLUMNS`` in order with no
    whitespace, each value of its ``JobInfo`` field's JSON type, all text printable ASCII
    (anything else is for ``json.loads``). What it matches is JSON, and a stricter check
    than a parse: 0.13 s for 100,000 rows against 0.38 s for ``json.loads`` and the keys."""
    import re
    import typing

    text = r'"(?:[ !#-\[\]-~]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"'
    integer = r"-?+(?:0|[1-9][0-9]{0,18})"
    number = integer + r"(?:\.[0-9]{1,40})?+(?:[eE][-+]?+[0-9]{1,3})?+"

    def value(tp: Any) -> str:
        if tp is str:
            return text
        if tp is int:
            return integer
        if tp is float:
            return number
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
            item = value(args[0])
            return rf"\[(?:{item}(?:,{item})*+)?+\]"
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return rf"(?:{value(args[0])}|null)"
        return "(?!)"  # a type this pattern does not know: every page goes to json.loads

    hints = typing.get_type_hints(wire.JobInfo)
    row = r"\{" + ",".join(f'"{c}":{value(hints[c])}' for c in wire.JOB_COLUMNS) + r"\}"
    return re.compile(rf"\[(?:{row}(?:,\n{row})*+)?+\]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (an escape sequence in a job's
    arguments, a hold reason, a starter's name) are shown as ``\\xNN``, never sent raw."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        for c in text
    )


def die(message: str, code: int = 1) -> int:
    print(f"{os.path.basename(sys.argv[0]) or 'stj'}: {printable(message)}", file=sys.stderr)
    return code
