"""Every message of the protocol, as frozen attrs classes, and their encoding.

A frame payload is one UTF-8 JSON object: ``{"type": "<name>", <fields>}``. Bytes fields travel
as standard base64 text. Decoding is strict: unknown types, missing or unknown fields, and
values of the wrong type are the peer's error, reported with the field's name. Integers are
range-checked (JSON has no integer size) and booleans are never accepted as integers.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs

from ._errors import LocalProtocolError, RemoteProtocolError

# The strict JSON hooks are shared with the attrs-free session codec (one reading of a frame).
from .lean import _no_constant, _no_duplicates

_INT_LIMIT = 1 << 63
#: Longest list we accept; everything else (strings, environments, output) is bounded by the frame.
_MAX_LIST = 100_000


def _nonneg(_inst: object, att: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{att.name} must be >= 0, not {value}")


# --------------------------------------------------------------------------- value types


DEBUG_ON = ("exit", "signal", "timeout")


def _check_debug_on(_inst: object, _attr: object, value: tuple[str, ...]) -> None:
    bad = [v for v in value if v not in DEBUG_ON]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"debug_on takes {', '.join(DEBUG_ON)} (each once), not {value!r}")


def _check_seconds(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 366 * 86400:
        raise ValueError(f"{attribute.name} must be between 0 and a year of seconds")


def _check_networks(_inst: object, _attr: object, value: tuple[str, ...]) -> None:
    import ipaddress

    for net in value:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(
                f"ssh_from takes networks like 10.1.0.0/16 or 2001:db8::/32, not {net!r}"
            ) from None


@attrs.frozen
class JobSpec:
    """What a user submits: run ``executable`` with ``args`` in ``initialdir``."""

    executable: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    initialdir: str = "/"
    #: Hold the job instead of completing it when it exits non-zero (so it can be debugged);
    #: the same as ``debug_on=("exit", "signal")``.
    hold_on_failure: bool = False
    #: When to keep the job for debugging instead of ending it: "exit" (a non-zero exit
    #: status), "signal" (killed by a signal), "timeout" (still running at ``time_limit``).
    debug_on: tuple[str, ...] = attrs.field(default=(), validator=_check_debug_on)
    #: How long a debug hold lasts, in seconds; 0: the pool's ``debug_hold_time``, which is
    #: also the most a job may ask for.
    debug_hold_ttl: float = attrs.field(default=0.0, validator=_check_seconds)
    #: Seconds the job may run; 0: no limit. Past it the job is killed and held, or with
    #: ``debug_on`` "timeout" kept running in a debug hold.
    time_limit: float = attrs.field(default=0.0, validator=_check_seconds)
    #: False: nobody may ssh into this job (``stj submit --no-ssh``).
    ssh: bool = True
    #: Users besides the owner (names or uids) who may ssh into it (``--ssh-users``).
    ssh_users: tuple[str, ...] = ()
    #: Networks (CIDR) remote clients must connect from (``--allow-ssh-from``); empty: any.
    #: Local clients (the broker's unix socket) are not subject to it.
    ssh_from: tuple[str, ...] = attrs.field(default=(), validator=_check_networks)

    def debugs(self, why: str) -> bool:
        """Whether a job that ended this way ("exit", "signal", "timeout") is kept."""
        return why in self.debug_on or (self.hold_on_failure and why in ("exit", "signal"))


@attrs.frozen
class JobInfo:
    """One row of ``stj q`` / ``stj history``.

    Listings carry up to 100,000 of these, so fields at their default are left out of the
    encoding (the decoder restores them): an idle job is about half the bytes.
    """

    OMIT_DEFAULTS: ClassVar[bool] = True

    id: str
    owner: str
    owner_uid: int
    state: str
    executable: str
    args: tuple[str, ...]
    submitted: float
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    hold_reason: str = ""
    starter: str = ""
    pids: tuple[int, ...] = ()
    scratch: str = ""
    initialdir: str = ""
    sessions: int = 0
    #: For a job in a debug hold: when the hold ends (Unix time); 0 otherwise.
    debug_until: float = 0.0


@attrs.frozen
class ClusterInfo:
    """One line of ``stj q``'s default view: a cluster's live jobs counted by state.

    ``hold_reason`` is one held job's reason (``more_reasons``: the held jobs do not all share
    it); ``debug_job`` is the lowest job of the cluster in a debug hold that has not ended, to
    connect to, and ``debug_until`` the latest end of those holds.
    """

    OMIT_DEFAULTS: ClassVar[bool] = True

    cluster: int
    owner: str
    owner_uid: int
    submitted: float
    executable: str
    args: tuple[str, ...]
    idle: int = 0
    running: int = 0
    suspended: int = 0
    held: int = 0
    releasing: int = 0
    sessions: int = 0
    hold_reason: str = ""
    more_reasons: bool = False
    debug_held: int = 0
    debug_job: str = ""
    debug_until: float = 0.0


@attrs.frozen
class ActResult:
    id: str
    ok: bool
    message: str


@attrs.frozen
class StarterInfo:
    starter_id: str
    slots: int
    busy: int
    connected: bool
    jobs: tuple[str, ...]
    address: str = ""
    #: Unix time the broker last heard from it (0: never since the broker started).
    last_seen: float = 0.0
    #: How a Slurm starter tracks sessions: "slurm-cgroup" or "process-tree" ("": not Slurm).
    tracking: str = ""


@attrs.frozen
class JobRun:
    """What the broker tells a starter to run."""

    id: str
    uid: int
    gid: int
    owner: str
    spec: JobSpec


@attrs.frozen
class JobReport:
    """A starter's account of one of its jobs (running, or finished while unreported)."""

    id: str
    running: bool
    pid: int = 0
    scratch: str = ""
    exit_code: int | None = None
    exit_signal: int | None = None
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    reason: str = ""
    started: float = 0.0
    finished: float = 0.0
    #: The job failed and is kept (processes, scratch dir) for debugging with ssh-to-job.
    debug_hold: bool = False
    #: When that debug hold ends (Unix time).
    debug_until: float = 0.0


# --------------------------------------------------------------------------- messages


class Message:
    """Marker base; every concrete message sets TYPE."""

    TYPE: ClassVar[str]


# Client -> broker requests (unix socket, caller identified by SO_PEERCRED).


@attrs.frozen
class Submit(Message):
    TYPE: ClassVar[str] = "submit"
    spec: JobSpec
    count: int = attrs.field(default=1, validator=_nonneg)


@attrs.frozen
class SubmitReply(Message):
    TYPE: ClassVar[str] = "submit_reply"
    cluster: int
    count: int


@attrs.frozen
class Query(Message):
    TYPE: ClassVar[str] = "query"
    ids: tuple[str, ...] = ()
    #: ``True``: finished jobs (completed, removed) instead of the live queue.
    history: bool = False
    owner: str = ""
    #: ``True``: answer with ``job_table`` pages (rows as JSON arrays) instead of ``job_list``.
    table: bool = False
    #: With ``table``: each row a JSON object keyed by the columns, one per line, as
    #: ``stj q --json`` prints them (the client checks and writes the text, never rebuilds it).
    objects: bool = False


@attrs.frozen
class SessionInfo:
    """One session attempt, as audited: granted, refused or failed, and how it went."""

    session_id: str
    job: str
    uid: int
    user: str
    outcome: str
    requested: float
    reason: str = ""
    starter: str = ""
    started: float = 0.0
    ended: float = 0.0
    #: Bytes from the client into the session, and from the session back (the starter's
    #: count on the session's connection).
    bytes_in: int = 0
    bytes_out: int = 0
    #: The forwards the session asked for, comma-separated (``L:host:port``, ``R:port``,
    #: ``D``, ``X11``, ``agent``), as its sshd logged them.
    forwards: str = ""
    #: The exit status of the session's command or shell; -1 when unknown.
    exit_status: int = -1
    #: A remote client's registered key (fingerprint) and address; empty for local clients.
    client_key: str = ""
    client_addr: str = ""


@attrs.frozen
class SessionQuery(Message):
    """``stj history --sessions [job]``: the session records the asker may see."""

    TYPE: ClassVar[str] = "session_query"
    job: str = ""


@attrs.frozen
class SessionList(Message):
    TYPE: ClassVar[str] = "session_list"
    sessions: tuple[SessionInfo, ...]


@attrs.frozen
class JobList(Message):
    TYPE: ClassVar[str] = "job_list"
    jobs: tuple[JobInfo, ...]
    last: bool = True


ACTIONS = frozenset({"rm", "hold", "release", "suspend", "continue"})


@attrs.frozen
class Act(Message):
    TYPE: ClassVar[str] = "act"
    action: str = attrs.field(validator=attrs.validators.in_(ACTIONS))
    ids: tuple[str, ...] = ()
    reason: str = ""


@attrs.frozen
class SshAllow(Message):
    """Let more users into a job's sessions (``stj ssh-allow 32.0 carol``); owner or superuser."""

    TYPE: ClassVar[str] = "ssh_allow"
    id: str
    users: tuple[str, ...]


@attrs.frozen
class ActReply(Message):
    TYPE: ClassVar[str] = "act_reply"
    results: tuple[ActResult, ...]


@attrs.frozen
class Status(Message):
    TYPE: ClassVar[str] = "status"


@attrs.frozen
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    starters: tuple[StarterInfo, ...]
    broker_pid: int = 0
    jobs_idle: int = 0
    jobs_running: int = 0
    jobs_held: int = 0


@attrs.frozen
class TokenCreate(Message):
    """Make a one-time join token (root or a queue superuser, over the unix socket)."""

    TYPE: ClassVar[str] = "token_create"
    #: Seconds it stays valid; 0: the broker's ``token_ttl``.
    ttl: float = 0.0


@attrs.frozen
class TokenCreated(Message):
    TYPE: ClassVar[str] = "token_created"
    token: str = attrs.field(repr=False)
    expires_at: float = 0.0


@attrs.frozen
class StarterRevoke(Message):
    """Revoke every certificate of starter ``name`` and cut its connections at once."""

    TYPE: ClassVar[str] = "starter_revoke"
    name: str


@attrs.frozen
class StarterRevoked(Message):
    TYPE: ClassVar[str] = "starter_revoked"
    #: The revoked serials, in hex.
    serials: tuple[str, ...]
    #: Live connections (control channel and sessions) that were cut.
    cut: int = 0


@attrs.frozen
class Output(Message):
    TYPE: ClassVar[str] = "output"
    id: str
    stream: str = "stdout"
    max_bytes: int = 65536


@attrs.frozen
class OutputReply(Message):
    TYPE: ClassVar[str] = "output_reply"
    id: str
    data: bytes
    running: bool


@attrs.frozen
class SshRequest(Message):
    """Ask for a session into a job; ``client_key`` is the client's ephemeral OpenSSH pubkey."""

    TYPE: ClassVar[str] = "ssh_request"
    job: str
    client_key: str


@attrs.frozen
class SshGrant(Message):
    """Sent together with the session socket's file descriptor (SCM_RIGHTS)."""

    TYPE: ClassVar[str] = "ssh_grant"
    session_id: str
    job: str
    capability: bytes
    starter_id: str
    starter_key: bytes


@attrs.frozen
class Error(Message):
    """A refusal or failure, with a message meant for a person."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


# Starter <-> broker control channel (TCP, mutually authenticated handshake first).


@attrs.frozen
class StarterHello(Message):
    """The starter's first frame on its TLS control channel: its name (the one its certificate
    names), the key that signs session host keys, and its slots."""

    TYPE: ClassVar[str] = "starter_hello"
    starter_id: str
    starter_key: bytes
    slots: int
    version: int = 2
    #: A Slurm starter's session tracking (docs/slurm.md): "slurm-cgroup" or "process-tree".
    tracking: str = ""


@attrs.frozen
class Welcome(Message):
    """The broker accepts the starter; ``broker_key`` verifies the capabilities it signs
    (trusted because TLS authenticated the broker against the pool CA)."""

    TYPE: ClassVar[str] = "welcome"
    broker_key: bytes


@attrs.frozen
class StarterSync(Message):
    """First message after the handshake: every job the starter has, running or unreported."""

    TYPE: ClassVar[str] = "starter_sync"
    jobs: tuple[JobReport, ...]


@attrs.frozen
class RunJob(Message):
    TYPE: ClassVar[str] = "run_job"
    job: JobRun


@attrs.frozen
class SignalJob(Message):
    """``action``: kill (rm), evict (hold), suspend, continue."""

    TYPE: ClassVar[str] = "signal_job"
    id: str
    action: str
    reason: str = ""


@attrs.frozen
class OpenSession(Message):
    TYPE: ClassVar[str] = "open_session"
    session_id: str
    job: str


@attrs.frozen
class FetchOutput(Message):
    TYPE: ClassVar[str] = "fetch_output"
    request: int
    id: str
    stream: str
    max_bytes: int


@attrs.frozen
class OutputData(Message):
    TYPE: ClassVar[str] = "output_data"
    request: int
    data: bytes
    found: bool


@attrs.frozen
class JobUpdate(Message):
    """A job started, exited, or changed (sessions count, pids)."""

    TYPE: ClassVar[str] = "job_update"
    report: JobReport
    sessions: int = 0


@attrs.frozen
class Ack(Message):
    """The broker has stored these job reports; the starter may forget them."""

    TYPE: ClassVar[str] = "ack"
    ids: tuple[str, ...]


@attrs.frozen
class CertRenew(Message):
    """A starter whose certificate has less than a third of its life left asks for a new one,
    for a key it just made (PEM SubjectPublicKeyInfo, Ed25519)."""

    TYPE: ClassVar[str] = "cert_renew"
    public_key: str


@attrs.frozen
class CertRenewed(Message):
    """The new certificate (PEM) for the key in ``cert_renew``; the old one stays valid."""

    TYPE: ClassVar[str] = "cert_renewed"
    certificate: str


@attrs.frozen
class SessionFailed(Message):
    TYPE: ClassVar[str] = "session_failed"
    session_id: str
    message: str


@attrs.frozen
class SessionEnded(Message):
    """A session's sshd has ended: when it ran, and the bytes each way on its connection."""

    TYPE: ClassVar[str] = "session_ended"
    session_id: str
    job: str
    started: float
    ended: float
    bytes_in: int = 0
    bytes_out: int = 0
    forwards: str = ""
    exit_status: int = -1


@attrs.frozen
class Ping(Message):
    TYPE: ClassVar[str] = "ping"


# Session socket: starter -> broker first, then client <-> starter, then raw SSH.


@attrs.frozen
class SessionAttach(Message):
    """The first and only frame a starter sends the broker on a session connection (over TLS,
    which says which starter it is; both sides then leave TLS and hand the socket on)."""

    TYPE: ClassVar[str] = "session_attach"
    session_id: str
    starter_id: str
    #: The session's host key (made before dialling), for the broker to certify.
    host_key: str = ""


@attrs.frozen
class SessionOpen(Message):
    TYPE: ClassVar[str] = "session_open"
    capability: bytes
    shells: tuple[str, ...] = ()
    #: ``ssh-to-job --persist``: the name of the job's tmux session to have ready ("" none).
    persist: str = ""


@attrs.frozen
class SessionReady(Message):
    """The starter's signed host key; after this frame the socket carries only SSH."""

    TYPE: ClassVar[str] = "session_ready"
    host_key: str
    login: str
    signature: bytes
    banner: str = ""
    #: Whether this session's sshd forwards an ssh agent (the pool's allow_agent_forwarding).
    agent_forwarding: bool = False
    #: Seconds the client's ssh may stay as an idle ControlMaster for repeat commands into
    #: this job (the pool's ``mux_persist``); 0: no multiplexing (sshd has ``MaxSessions 1``).
    mux_persist: float = 0.0


@attrs.frozen
class ClusterQuery(Message):
    """``stj q`` without ``--nobatch``: one summary per cluster (``cluster_list`` pages)."""

    TYPE: ClassVar[str] = "cluster_query"
    ids: tuple[str, ...] = ()
    owner: str = ""


@attrs.frozen
class ClusterList(Message):
    TYPE: ClassVar[str] = "cluster_list"
    clusters: tuple[ClusterInfo, ...]
    last: bool = True


#: The columns of a ``job_table`` row: ``JobInfo``'s fields, in its order.
JOB_COLUMNS: tuple[str, ...] = tuple(f.name for f in attrs.fields(JobInfo))


@attrs.frozen
class JobTable(Message):
    """One page of a ``query`` with ``table``: ``rows`` is the JSON text of a list of rows,
    each a list of the values of ``columns`` (``JobInfo``'s fields) in order.

    A listing of 100,000 jobs as ``JobInfo`` objects costs seconds to build, encode and check
    field by field; as arrays it is one ``json.dumps`` on the broker and one ``json.loads`` on
    the client, each in C. The client checks each row's length and types as it reads it.

    On the wire ``rows`` is the payload's *body*: the header (this message's JSON object
    without ``rows``), a line feed, then the rows' UTF-8 bytes as they are. As a JSON string
    field each quote of a page was escaped by the broker and unescaped again by the client
    (0.1 s on each side for 100,000 jobs), for text the client parses anyway.
    """

    TYPE: ClassVar[str] = "job_table"
    columns: tuple[str, ...]
    rows: str
    last: bool = True


#: The largest header of a payload with a body (its JSON object, before the line feed).
MAX_HEAD = 4096


# Remote clients (issue 11): keys registered over the unix socket, then TLS from anywhere.


@attrs.frozen
class ClientKeyInfo:
    """One registered client key (``stj keys list``)."""

    fingerprint: str
    key: str
    uid: int
    user: str
    comment: str = ""
    added: float = 0.0


@attrs.frozen
class KeyAdd(Message):
    """Register ``key`` (an ``ssh-ed25519`` public line) for the asker's uid (unix socket)."""

    TYPE: ClassVar[str] = "key_add"
    key: str
    comment: str = ""


@attrs.frozen
class KeyAdded(Message):
    TYPE: ClassVar[str] = "key_added"
    fingerprint: str
    pool_id: str


@attrs.frozen
class KeyList(Message):
    TYPE: ClassVar[str] = "key_list"


@attrs.frozen
class KeyListReply(Message):
    TYPE: ClassVar[str] = "key_list_reply"
    keys: tuple[ClientKeyInfo, ...]


@attrs.frozen
class KeyRemove(Message):
    TYPE: ClassVar[str] = "key_remove"
    fingerprint: str


@attrs.frozen
class KeyRemoved(Message):
    TYPE: ClassVar[str] = "key_removed"
    fingerprint: str


@attrs.frozen
class PoolCa(Message):
    """Ask for the pool CA certificate (over the unix socket: the trusted channel)."""

    TYPE: ClassVar[str] = "pool_ca"


@attrs.frozen
class PoolCaReply(Message):
    TYPE: ClassVar[str] = "pool_ca_reply"
    pool_id: str
    ca_cert: str
    #: The OpenSSH public line of the pool's host CA (sessions' host certificates).
    ssh_host_ca: str = ""


@attrs.frozen
class SessionCert(Message):
    """The broker's answer to ``session_attach``: an OpenSSH host certificate for the
    session's host key ("" if none was asked for); then both sides leave TLS."""

    TYPE: ClassVar[str] = "session_cert"
    certificate: str = ""


@attrs.frozen
class RemoteHello(Message):
    """A remote client's first frame on a TLS connection without a client certificate."""

    TYPE: ClassVar[str] = "remote_hello"
    version: int = 1


@attrs.frozen
class RemoteChallenge(Message):
    """A fresh nonce for this connection: the client signs it together with its request."""

    TYPE: ClassVar[str] = "remote_challenge"
    nonce: bytes
    pool_id: str


@attrs.frozen
class RemoteSsh(Message):
    """``ssh_request`` from a remote client, signed by its registered key (``key``) over
    ``remote_request_statement(pool_id, nonce, job, client_key, key)``."""

    TYPE: ClassVar[str] = "remote_ssh"
    job: str
    client_key: str
    key: str
    signature: bytes


@attrs.frozen
class AttachStandby(Message):
    """A starter's first frame on a spare attach connection, dialled ahead of any session: the
    connection then waits (at most the broker's ``standby_lifetime``) for the ``session_attach``
    of the starter's next session, which goes on as on a freshly dialled one."""

    TYPE: ClassVar[str] = "attach_standby"
    starter_id: str


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Submit,
        SubmitReply,
        Query,
        JobList,
        Act,
        SshAllow,
        ActReply,
        SessionQuery,
        SessionList,
        SessionEnded,
        Status,
        StatusReply,
        Output,
        OutputReply,
        TokenCreate,
        TokenCreated,
        StarterRevoke,
        StarterRevoked,
        SshRequest,
        SshGrant,
        Error,
        StarterHello,
        Welcome,
        StarterSync,
        RunJob,
        SignalJob,
        OpenSession,
        FetchOutput,
        OutputData,
        JobUpdate,
        Ack,
        SessionFailed,
        CertRenew,
        CertRenewed,
        Ping,
        SessionAttach,
        SessionOpen,
        SessionReady,
        KeyAdd,
        KeyAdded,
        KeyList,
        KeyListReply,
        KeyRemove,
        KeyRemoved,
        PoolCa,
        PoolCaReply,
        RemoteHello,
        RemoteChallenge,
        RemoteSsh,
        SessionCert,
        ClusterQuery,
        ClusterList,
        JobTable,
        AttachStandby,
    )
}


# --------------------------------------------------------------------------- encoding


_Encoder = Callable[[Any], Any]
_encoders: dict[type, list[tuple[str, _Encoder | None]]] = {}


def _encode_bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _encoder_for(tp: Any) -> _Encoder | None:
    """A converter to JSON-ready values for type ``tp``; None where the value is already one."""
    origin = typing.get_origin(tp)
    if tp is bytes:
        return _encode_bytes
    if origin is types.UnionType or origin is typing.Union:
        inner = _encoder_for(next(a for a in typing.get_args(tp) if a is not type(None)))
        if inner is None:
            return None
        return lambda v: None if v is None else inner(v)
    if origin is tuple:
        item = _encoder_for(typing.get_args(tp)[0])
        if item is None:
            return list
        return lambda v: [item(x) for x in v]
    if origin is Mapping or origin is dict:
        return dict
    if isinstance(tp, type) and attrs.has(tp):
        return lambda v: _encode_attrs(v)
    return None


def _fields_encoders(cls: type) -> list[tuple[str, _Encoder | None]]:
    table = _encoders.get(cls)
    if table is None:
        hints = _hints(cls)
        table = [(f.name, _encoder_for(hints[f.name])) for f in attrs.fields(cls)]
        _encoders[cls] = table
    return table


_encode_fns: dict[type, Callable[[Any], dict[str, Any]]] = {}
_KEEP = object()  # "no default to leave out" in an encoder's plan


def _make_encoder(cls: type) -> Callable[[Any], dict[str, Any]]:
    """The JSON-ready dict of one attrs class's values: a closure over a per-field plan.

    Classes marked ``OMIT_DEFAULTS`` (long job listings) leave out fields at their default
    value; the decoder puts the default back.
    """
    omit = getattr(cls, "OMIT_DEFAULTS", False)
    plan: list[tuple[str, _Encoder | None, Any]] = []
    for f, (name, conv) in zip(attrs.fields(cls), _fields_encoders(cls), strict=True):
        default = f.default
        plain = default is not attrs.NOTHING and not isinstance(default, attrs.Factory)  # type: ignore[arg-type]  # a class at run time
        plan.append((name, conv, default if omit and plain else _KEEP))

    def enc(value: Any) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for name, conv, default in plan:
            v = getattr(value, name)
            if default is not _KEEP and v == default:
                continue
            d[name] = v if conv is None else conv(v)
        return d

    return enc


def _encode_attrs(value: Any) -> dict[str, Any]:
    cls = type(value)
    enc = _encode_fns.get(cls)
    if enc is None:
        enc = _encode_fns[cls] = _make_encoder(cls)
    return enc(value)


def encode_message(msg: Message) -> bytes:
    if not isinstance(msg, Message) or not attrs.has(type(msg)):
        raise LocalProtocolError(f"not a protocol message: {msg!r}")
    body = _encode_attrs(msg)
    rows: str | None = body.pop("rows") if type(msg) is JobTable else None
    body["type"] = msg.TYPE
    try:
        # allow_nan=False: NaN and Infinity are not JSON, and the decoder refuses them.
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        if rows is None:
            return text.encode("utf-8")
        # Compact JSON holds no line feed (one in a string is written \n): the first one
        # ends the header.
        head = text.encode("utf-8")
        if len(head) > MAX_HEAD:
            raise ValueError(f"its header is over {MAX_HEAD} bytes")
        return head + b"\n" + rows.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise LocalProtocolError(f"cannot encode {msg.TYPE!r}: {exc}") from None


def _fail(path: str, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"field {path}: {what}")


_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _hints_cache[cls] = hints
    return hints


def _check_text(value: str, path: str) -> None:
    # JSON's \ud800 escapes can smuggle lone surrogates into a str; such a string cannot be
    # encoded again (to a frame, SQLite, a log, argv), so it is refused here, at the boundary.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(path, "string is not valid Unicode (lone surrogate)") from None


_Decoder = Callable[[Any, str], Any]
_decoders: dict[Any, _Decoder] = {}


def _decoder_for(tp: Any) -> _Decoder:
    """The checking converter for type ``tp``, built once per type (decoding is a hot path:
    ``stj q`` over 100,000 jobs decodes every one of them)."""
    dec = _decoders.get(tp)
    if dec is None:
        dec = _build_decoder(tp)
        _decoders[tp] = dec
    return dec


def _dec_int(value: Any, path: str) -> int:
    if type(value) is not int or not -_INT_LIMIT <= value < _INT_LIMIT:
        raise _fail(path, "expected an integer")
    return value


def _dec_float(value: Any, path: str) -> float:
    # JSON reads 1e400 as inf and a 400-digit integer as an int too big for a float.
    if type(value) is int and -_INT_LIMIT <= value < _INT_LIMIT:
        return float(value)
    if type(value) is not float or not math.isfinite(value):
        raise _fail(path, "expected a finite number")
    return value


def _dec_bool(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise _fail(path, "expected true or false")
    return value


def _dec_str(value: Any, path: str) -> str:
    if type(value) is not str:
        raise _fail(path, "expected a string")
    _check_text(value, path)
    return value


def _dec_bytes(value: Any, path: str) -> bytes:
    if type(value) is not str:
        raise _fail(path, "expected base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _fail(path, "invalid base64") from None


def _dec_env(value: Any, path: str) -> dict[str, str]:
    if type(value) is not dict:
        raise _fail(path, "expected an object")
    for k, v in value.items():
        _check_text(k, path)
        if type(v) is not str:
            raise _fail(f"{path}.{k}", "expected a string")
        _check_text(v, f"{path}.{k}")
    return dict(value)


def _build_decoder(tp: Any) -> _Decoder:
    simple: dict[Any, _Decoder] = {
        int: _dec_int,
        float: _dec_float,
        bool: _dec_bool,
        str: _dec_str,
        bytes: _dec_bytes,
    }
    if tp in simple:
        return simple[tp]
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        inner = _decoder_for(next(a for a in typing.get_args(tp) if a is not type(None)))
        return lambda value, path: None if value is None else inner(value, path)
    if origin is tuple:
        item = _decoder_for(typing.get_args(tp)[0])

        def dec_tuple(value: Any, path: str) -> tuple[Any, ...]:
            if type(value) is not list or len(value) > _MAX_LIST:
                raise _fail(path, "expected a list")
            return tuple([item(v, f"{path}[{i}]") for i, v in enumerate(value)])

        return dec_tuple
    if origin is Mapping or origin is dict:
        return _dec_env
    if isinstance(tp, type) and attrs.has(tp):
        return lambda value, path: _decode_attrs(tp, value, path)
    raise LocalProtocolError(f"no decoder for type {tp!r}")  # pragma: no cover


_MISSING = object()
_Field = tuple[str, Any, _Decoder, bool]
_tables: dict[type, tuple[frozenset[str], list[_Field]]] = {}


def _table(cls: type) -> tuple[frozenset[str], list[_Field]]:
    table = _tables.get(cls)
    if table is None:
        hints = _hints(cls)
        fields: list[_Field] = []
        for f in attrs.fields(cls):
            tp = hints[f.name]
            # str and int fields are checked inline in _decode_attrs (most fields are).
            fields.append(
                (
                    f.name,
                    tp if tp in (str, int) else None,
                    _decoder_for(tp),
                    f.default is attrs.NOTHING,
                )
            )
        table = (frozenset(name for name, *_ in fields), fields)
        _tables[cls] = table
    return table


def _sub(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unknown_fields(cls: type, value: dict[str, Any], path: str, skip: frozenset[str]) -> None:
    known, _ = _table(cls)
    unknown = set(value) - known - skip
    if unknown:
        raise _fail(path or cls.__name__, f"unknown field(s) {sorted(unknown)}")


def _construct(cls: type, path: str, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        what = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        raise _fail(path or cls.__name__, what) from None


_DecodeFn = Callable[[Any, str, frozenset[str]], Any]
_decode_fns: dict[type, _DecodeFn] = {}
_REQUIRED, _FACTORY, _DEFAULT = range(3)


def _make_decoder(cls: type) -> _DecodeFn:
    """The checking decoder of one attrs class: a closure over the per-field table.

    str and int fields (most of them) are checked inline and call their decoder only to raise
    the error; absent fields take their attrs default (a factory is called, as attrs' own
    __init__ would); unknown fields and failing validators are the peer's error.
    """
    known, fields = _table(cls)
    attr_fields = attrs.fields(cls)
    names = [name for name, *_ in fields]
    plan: list[tuple[str, Any, _Decoder, int, Any]] = []
    for f, (name, inline, dec, required) in zip(attr_fields, fields, strict=True):
        if required:
            plan.append((name, inline, dec, _REQUIRED, None))
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]  # a class at run time
            plan.append((name, inline, dec, _FACTORY, f.default.factory))
        else:
            plan.append((name, inline, dec, _DEFAULT, f.default))

    def dec_fn(value: Any, path: str, skip: frozenset[str]) -> Any:
        if type(value) is not dict:
            raise _fail(path, "expected an object")
        if not known.issuperset(value.keys()):
            _unknown_fields(cls, value, path, skip)
        get = value.get
        args: list[Any] = []
        for name, inline, dec, kind, default in plan:
            v = get(name, _MISSING)
            if v is _MISSING:
                if kind == _REQUIRED:
                    raise _fail(_sub(path, name), "missing")
                args.append(default() if kind == _FACTORY else default)
                continue
            if inline is str:
                if not (type(v) is str and v.isascii()):
                    v = dec(v, _sub(path, name))
            elif inline is int:
                if not (type(v) is int and -_INT_LIMIT <= v < _INT_LIMIT):
                    v = dec(v, _sub(path, name))
            else:
                v = dec(v, _sub(path, name))
            args.append(v)
        try:
            return cls(*args)
        except (ValueError, TypeError):
            return _construct(cls, path, dict(zip(names, args, strict=True)))

    return dec_fn


def _decode_attrs(cls: type, value: Any, path: str, skip: frozenset[str] = frozenset()) -> Any:
    dec = _decode_fns.get(cls)
    if dec is None:
        dec = _decode_fns[cls] = _make_decoder(cls)
    return dec(value, path, skip)


def _loads(payload: bytes) -> Any:
    try:
        return json.loads(
            payload.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates
        )
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, our hooks, and the int-digits limit (a bare
        # ValueError from json for integers of more than 4300 digits).
        raise RemoteProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("frame nests too deeply") from None


def _job_table_head(payload: bytes) -> tuple[dict[str, Any], int] | None:
    """The header of a payload with a body and where the body starts, or None if the
    payload is one JSON object (a line feed in it can then only be JSON whitespace)."""
    end = payload.find(b"\n", 0, MAX_HEAD + 1)
    if end < 0:
        return None
    try:
        head = _loads(payload[:end])
    except RemoteProtocolError:
        return None
    if type(head) is not dict or head.get("type") != JobTable.TYPE:
        return None
    return head, end + 1


def decode_message(payload: bytes) -> Message:
    split = _job_table_head(payload)
    if split is not None:
        body, start = split
        if "rows" in body:
            raise RemoteProtocolError("field rows: given in the header and as the body")
        try:
            body["rows"] = payload[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"field rows: not valid UTF-8: {exc}") from None
    else:
        body = _loads(payload)
        if type(body) is not dict:
            raise RemoteProtocolError("frame is not a JSON object")
    name = body.get("type")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {name!r}")
    if cls is JobTable and split is None:
        raise RemoteProtocolError(
            "a job_table's rows must follow its header after a line feed, as the body"
        )
    msg: Message = _decode_attrs(cls, body, "", skip=frozenset({"type"}))
    return msg
