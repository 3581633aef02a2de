"""Who may send what, when: the protocol's one transition table.

Each connection is one *channel* with one shared state; both peers run the same table, so the
side that sends and the side that receives agree on what comes next. A message that is not in
the table for the current state is a protocol error: ours (``LocalProtocolError``) if we tried
to send it, the peer's (``RemoteProtocolError``) if it arrived.

Channels:

CONTROL  a local client and the broker: one request, then its reply (``job_list`` may come in
         pages; ``ssh_grant`` ends the conversation because the socket it carries is the point).
STARTER  a starter and the broker over mutually authenticated TLS 1.3: ``starter_hello``,
         ``welcome``, then free traffic both ways.
ATTACH   a starter's session connection to the broker: ``session_attach`` over TLS, the
         broker's ``session_cert`` (the session's host certificate), then both sides leave TLS
         and the socket is handed on untouched (RAW). A spare connection opens with
         ``attach_standby`` and carries its ``session_attach`` later.
SESSION  a client and a starter on that handed-on socket: ``session_open`` with the capability,
         ``session_ready`` with the signed host key, then raw SSH.
REMOTE   a remote client and the broker over TLS (no client certificate): ``remote_hello``,
         ``remote_challenge`` (a fresh nonce), ``remote_ssh`` signed by a registered key, then
         ``ssh_grant``, both sides leave TLS and the broker relays the socket (RAW).
"""

from __future__ import annotations

import enum


class Channel(enum.Enum):
    CONTROL = "control"
    STARTER = "starter"
    ATTACH = "attach"
    SESSION = "session"
    REMOTE = "remote"


class Role(enum.Enum):
    CLIENT = "client"
    BROKER = "broker"
    STARTER = "starter"


START = "start"
RAW = "raw"
CLOSED_STATE = "closed"

C, B, S = Role.CLIENT, Role.BROKER, Role.STARTER

# (state, sender, message type) -> next state
_Table = dict[tuple[str, Role, str], str]

_CONTROL: _Table = {}
for _req, _reply, _after in (
    ("submit", "submit_reply", START),
    ("query", "job_list", START),
    ("act", "act_reply", START),
    ("ssh_allow", "act_reply", START),
    ("session_query", "session_list", START),
    ("status", "status_reply", START),
    ("output", "output_reply", START),
    ("token_create", "token_created", START),
    ("starter_revoke", "starter_revoked", START),
    ("ssh_request", "ssh_grant", CLOSED_STATE),
    ("key_add", "key_added", START),
    ("key_list", "key_list_reply", START),
    ("key_remove", "key_removed", START),
    ("pool_ca", "pool_ca_reply", START),
    ("cluster_query", "cluster_list", START),
):
    _CONTROL[(START, C, _req)] = _req
    _CONTROL[(_req, B, _reply)] = _after
    _CONTROL[(_req, B, "error")] = START
# A query with table=true is answered with job_table pages instead of job_list ones.
_CONTROL[("query", B, "job_table")] = START
# A paged listing: job_list (or cluster_list) with last=false keeps the state (see next_state).
_CONTROL[(START, B, "error")] = CLOSED_STATE

# TLS has authenticated both ends before the first frame: the hello only says what this
# starter offers, and the welcome carries the key that signs capabilities.
_STARTER: _Table = {
    (START, S, "starter_hello"): "hello",
    ("hello", B, "welcome"): "ready",
    ("hello", B, "error"): CLOSED_STATE,
    (START, B, "error"): CLOSED_STATE,
}
for _t in (
    "starter_sync",
    "job_update",
    "session_failed",
    "session_ended",
    "output_data",
    "ping",
    "cert_renew",
):
    _STARTER[("ready", S, _t)] = "ready"
for _t in ("run_job", "signal_job", "open_session", "fetch_output", "ack", "ping", "cert_renewed"):
    _STARTER[("ready", B, _t)] = "ready"
_STARTER[("ready", B, "error")] = CLOSED_STATE
_STARTER[("ready", S, "error")] = CLOSED_STATE

_ATTACH: _Table = {
    (START, S, "session_attach"): "attached",
    ("attached", B, "session_cert"): RAW,
    # A spare connection, dialled before its session exists (starter/_spare.py): it says so,
    # then waits for the session_attach of the starter's next session.
    (START, S, "attach_standby"): "standby",
    ("standby", S, "session_attach"): "attached",
}

_SESSION: _Table = {
    (START, C, "session_open"): "opening",
    ("opening", S, "session_ready"): RAW,
    ("opening", S, "error"): CLOSED_STATE,
}

# A remote client over TLS without a certificate: one challenge, one signed request; a grant
# leaves TLS (close_notify both ways) and the connection is relayed to the starter, RAW.
_REMOTE: _Table = {
    (START, C, "remote_hello"): "hello",
    ("hello", B, "remote_challenge"): "challenged",
    ("hello", B, "error"): CLOSED_STATE,
    ("challenged", C, "remote_ssh"): "requested",
    ("requested", B, "ssh_grant"): RAW,
    ("requested", B, "error"): CLOSED_STATE,
    (START, B, "error"): CLOSED_STATE,
}

TABLES: dict[Channel, _Table] = {
    Channel.CONTROL: _CONTROL,
    Channel.STARTER: _STARTER,
    Channel.ATTACH: _ATTACH,
    Channel.SESSION: _SESSION,
    Channel.REMOTE: _REMOTE,
}


def next_state(channel: Channel, state: str, sender: Role, msg_type: str, more: bool) -> str | None:
    """The state after ``sender`` sends ``msg_type`` in ``state``; None if not allowed.

    ``more`` is true for a ``job_list``, ``job_table`` or ``cluster_list`` page that is not
    the last one.
    """
    after = TABLES[channel].get((state, sender, msg_type))
    if after is not None and more:
        return state
    return after
