"""One protocol connection, sans-IO: frames + messages + the transition table.

``receive_data(bytes)`` feeds what the socket gave; ``next_event()`` returns the next message,
``NEED_DATA`` or ``CLOSED``; ``send(msg)`` checks the table and returns the bytes to write.
Any protocol error moves the connection to the final ``error`` state: the adapter above closes
the socket, and the daemon carries on.
"""

from __future__ import annotations

from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frame import CLOSED, DEFAULT_MAX_FRAME, NEED_DATA, FrameDecoder, Sentinel, encode_frame
from ._messages import (
    ClusterList,
    Error,
    JobList,
    JobTable,
    Message,
    decode_message,
    encode_message,
)
from ._state import RAW, START, Channel, Role, next_state

ERROR_STATE = "error"


class Connection:
    def __init__(
        self,
        channel: Channel,
        our_role: Role,
        their_role: Role,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.channel = channel
        self.our_role = our_role
        self.their_role = their_role
        self.state = START
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)

    def _payload(self, msg: Message) -> bytes:
        return encode_message(msg)

    def _advance(self, sender: Role, msg: Message, error: type[ProtocolError]) -> None:
        if self.state == ERROR_STATE:
            raise error("connection is already in the error state")
        more = isinstance(msg, JobList | JobTable | ClusterList) and not msg.last
        after = next_state(self.channel, self.state, sender, msg.TYPE, more)
        if after is None:
            prev, self.state = self.state, ERROR_STATE
            raise error(
                f"{sender.value} may not send {msg.TYPE!r} on a {self.channel.value} "
                f"connection in state {prev!r}"
            )
        self.state = after

    def send(self, msg: Message) -> bytes:
        try:
            self._advance(self.our_role, msg, LocalProtocolError)
            return encode_frame(self._payload(msg), self.max_frame)
        except LocalProtocolError:
            self.state = ERROR_STATE
            raise

    def farewell(self, error: Error) -> bytes:
        """One last ``Error`` frame telling the peer why we hang up; the state becomes final.

        Allowed in any state (the peer may have broken the protocol already): it is the only
        frame ever sent outside the table, and nothing can follow it.
        """
        self.state = ERROR_STATE
        return encode_frame(self._payload(error), self.max_frame)

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Message | Sentinel:
        if self.state == ERROR_STATE:
            # Final: NEED_DATA here would invite the adapter to keep reading a broken peer.
            raise RemoteProtocolError("connection is already in the error state")
        if self.state == RAW:
            return NEED_DATA
        try:
            payload = self._decoder.next_frame()
            if payload is NEED_DATA or payload is CLOSED:
                return payload
            assert isinstance(payload, bytes)
            msg = decode_message(payload)
            self._advance(self.their_role, msg, RemoteProtocolError)
            return msg
        except RemoteProtocolError:
            self.state = ERROR_STATE
            raise

    @property
    def trailing_data(self) -> bytes:
        """Bytes that arrived after the last frame (must be empty when going RAW)."""
        return self._decoder.buffered


__all__ = ["CLOSED", "NEED_DATA", "Connection", "Sentinel"]
