"""Length-prefixed frames: a 4-byte big-endian payload length, then the payload.

Sans-IO: bytes go in with ``receive_data``, whole payloads come out of ``next_frame``. Every
frame has a size limit, checked from the header alone so an oversize frame is refused before a
single payload byte is buffered. ``receive_data(b"")`` means end of stream: a clean end between
frames gives ``CLOSED``, an end inside a frame is the peer's error.
"""

from __future__ import annotations

import struct

from ._errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">I")
#: Default payload limit. Large listings are paged (see ``JobList.last``), so no honest
#: message comes near it.
DEFAULT_MAX_FRAME = 1 << 20


class Sentinel:
    """What ``next_frame`` returns when it has no payload: ``NEED_DATA`` or ``CLOSED``, two
    singletons compared with ``is``. Not an ``enum.Enum``: importing enum (with functools and
    collections) cost every ``ssh-to-job`` session ~2 ms of its start-up."""

    __slots__ = ("name",)
    NEED_DATA: Sentinel
    CLOSED: Sentinel

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Sentinel.{self.name}"

    def __reduce__(self) -> str:
        return f"Sentinel.{self.name}"  # pickled and copied as the same singleton


NEED_DATA = Sentinel.NEED_DATA = Sentinel("NEED_DATA")
CLOSED = Sentinel.CLOSED = Sentinel("CLOSED")


def encode_frame(payload: bytes, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    if len(payload) > max_size:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds the {max_size}-byte limit")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads."""

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
            return
        if not data:
            self._eof = True
        else:
            self._buf += data

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet returned as a frame."""
        return bytes(self._buf)

    def next_frame(self) -> bytes | Sentinel:
        if len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_size:
                raise RemoteProtocolError(
                    f"peer announced a {length}-byte frame; the limit is {self.max_size}"
                )
            end = HEADER.size + length
            if len(self._buf) >= end:
                payload = bytes(self._buf[HEADER.size : end])
                del self._buf[:end]
                return payload
        if self._eof:
            if self._buf:
                raise RemoteProtocolError(
                    f"peer closed the connection in the middle of a frame ({len(self._buf)} bytes)"
                )
            return CLOSED
        return NEED_DATA
