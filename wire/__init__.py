"""The ssh-to-job protocol, sans-IO.

What broker, starter and client all speak: length-prefixed frames, JSON-encoded attrs messages,
one transition table, and the Ed25519-signed capability. This package contains no networking
code at all and must never import trio or open a socket: it is tested byte by byte.
"""

from typing import TYPE_CHECKING, Any

from ._connection import Connection
from ._crypto import (
    CLOCK_SKEW,
    MAX_CAP_LIFETIME,
    Capability,
    ReplayCache,
    host_key_statement,
    new_signing_key,
    public_key_of,
    same_secret,
    sign,
    sign_capability,
    verify,
    verify_capability,
)
from ._errors import CapabilityError, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frame import CLOSED, DEFAULT_MAX_FRAME, NEED_DATA, FrameDecoder, Sentinel, encode_frame
from ._frame import HEADER as FRAME_HEADER
from ._jobid import JobId, parse_job_id
from ._messages import (
    MESSAGE_TYPES,
    Ack,
    Act,
    ActReply,
    ActResult,
    CertRenew,
    CertRenewed,
    Error,
    FetchOutput,
    JobInfo,
    JobList,
    JobReport,
    JobRun,
    JobSpec,
    JobUpdate,
    Message,
    OpenSession,
    Output,
    OutputData,
    OutputReply,
    Ping,
    Query,
    RunJob,
    SessionAttach,
    SessionEnded,
    SessionFailed,
    SessionInfo,
    SessionList,
    SessionOpen,
    SessionQuery,
    SessionReady,
    SignalJob,
    SshAllow,
    SshGrant,
    SshRequest,
    StarterHello,
    StarterInfo,
    StarterRevoke,
    StarterRevoked,
    StarterSync,
    Status,
    StatusReply,
    Submit,
    SubmitReply,
    TokenCreate,
    TokenCreated,
    Welcome,
    decode_message,
    encode_message,
)
from ._sshkey import ed25519_keypair
from ._state import Channel, Role, next_state

if TYPE_CHECKING:
    from ._identity import (
        PEER_NAME_RE,
        POOL_ID_RE,
        ROLE_BROKER,
        ROLE_CLIENT,
        ROLE_STARTER,
        ROLES,
        PeerName,
        check_pool_id,
        parse_peer_uri,
    )

_LAZY = {
    "PEER_NAME_RE": "_identity",
    "POOL_ID_RE": "_identity",
    "ROLE_BROKER": "_identity",
    "ROLE_CLIENT": "_identity",
    "ROLE_STARTER": "_identity",
    "ROLES": "_identity",
    "PeerName": "_identity",
    "check_pool_id": "_identity",
    "parse_peer_uri": "_identity",
}


def __getattr__(name: str) -> Any:
    # Certificate identities are for the daemons and `stj token`: loaded on first use, so
    # that ssh-to-job's start-up does not pay for them.
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module 'ssh_to_job.wire' has no attribute {name!r}")


__all__ = [
    "CLOCK_SKEW",
    "CLOSED",
    "DEFAULT_MAX_FRAME",
    "FRAME_HEADER",
    "MAX_CAP_LIFETIME",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PEER_NAME_RE",
    "POOL_ID_RE",
    "ROLES",
    "ROLE_BROKER",
    "ROLE_CLIENT",
    "ROLE_STARTER",
    "Ack",
    "Act",
    "ActReply",
    "ActResult",
    "Capability",
    "CapabilityError",
    "CertRenew",
    "CertRenewed",
    "Channel",
    "Connection",
    "Error",
    "FetchOutput",
    "FrameDecoder",
    "JobId",
    "JobInfo",
    "JobList",
    "JobReport",
    "JobRun",
    "JobSpec",
    "JobUpdate",
    "LocalProtocolError",
    "Message",
    "OpenSession",
    "Output",
    "OutputData",
    "OutputReply",
    "PeerName",
    "Ping",
    "ProtocolError",
    "Query",
    "RemoteProtocolError",
    "ReplayCache",
    "Role",
    "RunJob",
    "Sentinel",
    "SessionAttach",
    "SessionEnded",
    "SessionFailed",
    "SessionInfo",
    "SessionList",
    "SessionOpen",
    "SessionQuery",
    "SessionReady",
    "SignalJob",
    "SshAllow",
    "SshGrant",
    "SshRequest",
    "StarterHello",
    "StarterInfo",
    "StarterRevoke",
    "StarterRevoked",
    "StarterSync",
    "Status",
    "StatusReply",
    "Submit",
    "SubmitReply",
    "TokenCreate",
    "TokenCreated",
    "Welcome",
    "check_pool_id",
    "decode_message",
    "ed25519_keypair",
    "encode_frame",
    "encode_message",
    "host_key_statement",
    "new_signing_key",
    "next_state",
    "parse_job_id",
    "parse_peer_uri",
    "public_key_of",
    "same_secret",
    "sign",
    "sign_capability",
    "verify",
    "verify_capability",
]
