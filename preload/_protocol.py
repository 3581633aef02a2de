"""The shim's configuration protocol (docs/shim.md): the config record, its encoding, the ack.

Sans-IO (:class:`ShimHandshake`) except :func:`run_handshake`, a small blocking driver for the
parent's end of the socketpair (tests and benchmarks use it; the starter drives the same
object from trio).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import attrs

ENV_FD = "SSH_TO_JOB_SHIM_FD"
"""The environment variable that tells the shim which inherited fd carries its configuration."""

GO = b"g"
"""The byte that lets the shimmed program (sshd) start, once the starter has seen ``ok``."""

CONFIG_MAX = 16384
"""The shim reads at most this many bytes of configuration, the ``end`` line included."""

ACK_MAX = 256
"""An ``ok``/``err`` line longer than this is not from the shim."""

NOT_LOADED = "the shim did not load into sshd (LD_PRELOAD ignored?)"

_ID_MAX = 2**32 - 2  # uid_t/gid_t are 32-bit; (uid_t)-1 means "no id"


class ShimError(RuntimeError):
    """The shim is missing, unusable, refused its configuration, or did not answer."""


def _bad_chars(value: str) -> str | None:
    for ch, what in ((":", "':'"), ("\n", "a newline"), ("\0", "a NUL byte")):
        if ch in value:
            return what
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "characters that cannot be encoded"
    return None


def _check_id(_inst: Any, attribute: attrs.Attribute[int], value: object) -> None:
    if type(value) is not int or not 0 <= value <= _ID_MAX:
        raise ValueError(f"{attribute.name} must be an integer from 0 to {_ID_MAX}, not {value!r}")


def _check_name(_inst: Any, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")
    bad = _bad_chars(value)
    if bad is not None:
        raise ValueError(f"{attribute.name} {value!r} must not contain {bad}")


def _check_path(_inst: Any, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{attribute.name} must be an absolute path, not {value!r}")
    bad = _bad_chars(value)
    if bad is not None:
        raise ValueError(f"{attribute.name} {value!r} must not contain {bad}")


def _check_gecos(_inst: Any, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string, not {value!r}")
    bad = _bad_chars(value)
    if bad is not None:
        raise ValueError(f"{attribute.name} {value!r} must not contain {bad}")


def _check_bool(_inst: Any, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False, not {value!r}")


@attrs.frozen
class ShimConfig:
    """The passwd entry the shim gives sshd for the uid it runs as.

    The shim checks ``uid`` against the uid of the process it is loaded into and refuses
    anything else, so a configuration can never grant another uid.
    """

    uid: int = attrs.field(validator=_check_id)
    gid: int = attrs.field(validator=_check_id)
    name: str = attrs.field(validator=_check_name)
    home: str = attrs.field(validator=_check_path)
    shell: str = attrs.field(validator=_check_path)
    hide_tty_group: bool = attrs.field(default=True, validator=_check_bool)
    gecos: str = attrs.field(default="", validator=_check_gecos)
    """Empty means "the shim uses ``name``"."""

    def __attrs_post_init__(self) -> None:
        size = len(encode_config(self))
        if size > CONFIG_MAX:
            raise ValueError(
                f"home, shell, name and gecos are too long: the configuration is {size} "
                f"bytes, the shim reads at most {CONFIG_MAX}"
            )


def encode_config(cfg: ShimConfig) -> bytes:
    """The configuration text: ``key=value`` lines, then ``end``."""
    fields: list[tuple[str, str]] = [
        ("uid", str(cfg.uid)),
        ("gid", str(cfg.gid)),
        ("name", cfg.name),
        ("home", cfg.home),
        ("shell", cfg.shell),
        ("hide_tty_group", "1" if cfg.hide_tty_group else "0"),
    ]
    if cfg.gecos:
        fields.append(("gecos", cfg.gecos))
    text = "".join(f"{key}={value}\n" for key, value in fields) + "end\n"
    return text.encode("utf-8", "surrogateescape")


def parse_ack(line: bytes) -> int:
    """The pid from the shim's ``ok <pid>`` line; ShimError for ``err ...`` or anything else."""
    if not line:
        raise ShimError(f"no answer from the shim: {NOT_LOADED}")
    text = line[:-1] if line.endswith(b"\n") else line
    if b"\n" not in text:
        if text.startswith(b"ok "):
            digits = text[3:]
            if digits.isdigit() and len(digits) <= 10 and int(digits) > 0:
                return int(digits)
        elif text == b"err" or text.startswith(b"err "):
            message = text[4:].decode("utf-8", "replace").strip() or "no reason given"
            raise ShimError(f"the shim refused its configuration: {message}")
    raise ShimError(f"unexpected answer from the shim {line[:80]!r}: {NOT_LOADED}")


class ShimHandshake:
    """The parent's end of the shim handshake, sans-IO: config bytes out, the ack parsed in.

    Send :attr:`config`, then feed whatever arrives to :meth:`receive_data` until it returns
    the pid the shim reports (``b""`` means end of stream). It raises :class:`ShimError` for a
    refusal, garbage, an overlong line, data after the line, or an early end of stream. The
    blocking :func:`run_handshake` and the starter's trio code both drive this object, so the
    rules and the messages are the same everywhere. Sending :data:`GO` is left to the caller.
    """

    def __init__(self, cfg: ShimConfig) -> None:
        self.config = encode_config(cfg)
        self._buf = b""
        self.pid: int | None = None

    def receive_data(self, data: bytes) -> int | None:
        if self.pid is not None:
            if data:
                raise ShimError(f"unexpected data after the shim's answer: {data[:80]!r}")
            return self.pid
        if not data:
            # End of stream: whatever we have is the whole answer (parse_ack says what is wrong).
            self.pid = parse_ack(self._buf)
            return self.pid
        self._buf += data
        line, nl, rest = self._buf.partition(b"\n")
        if rest:
            raise ShimError(f"unexpected data after the shim's answer: {self._buf[:80]!r}")
        if not nl:
            if len(self._buf) >= ACK_MAX:
                raise ShimError(f"unexpected answer from the shim {self._buf[:80]!r}: {NOT_LOADED}")
            return None
        self.pid = parse_ack(line + nl)
        return self.pid

    @staticmethod
    def send_failed(timeout: float, error: OSError | None = None) -> ShimError:
        if error is None:
            return ShimError(
                f"the shim did not take its configuration within {timeout:g} s: {NOT_LOADED}"
            )
        return ShimError(f"cannot send the shim its configuration ({error}): {NOT_LOADED}")

    @staticmethod
    def no_answer(timeout: float, error: OSError | None = None) -> ShimError:
        if error is None:
            return ShimError(f"no answer from the shim within {timeout:g} s: {NOT_LOADED}")
        return ShimError(f"cannot read the shim's answer ({error}): {NOT_LOADED}")


def run_handshake(sock: socket.socket, cfg: ShimConfig, timeout: float) -> int:
    """Configure the shim over our end of its socketpair and return the pid it reports.

    Blocking; gives up after ``timeout`` seconds. Does not send :data:`GO`: the caller sends
    it when it is ready for the program to start.
    """
    hs = ShimHandshake(cfg)
    deadline = time.monotonic() + timeout
    old_timeout = sock.gettimeout()
    try:
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.sendall(hs.config)
        except TimeoutError:
            raise hs.send_failed(timeout) from None
        except OSError as e:
            raise hs.send_failed(timeout, e) from e
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise hs.no_answer(timeout)
            try:
                sock.settimeout(remaining)
                chunk = sock.recv(ACK_MAX)
            except TimeoutError:
                raise hs.no_answer(timeout) from None
            except OSError as e:
                raise hs.no_answer(timeout, e) from e
            pid = hs.receive_data(chunk)
            if pid is not None:
                return pid
    finally:
        sock.settimeout(old_timeout)
