"""The transition table through Connection: both peers in lock-step, every refusal, RAW."""

from __future__ import annotations

import collections

import pytest

from ssh_to_job import wire
from ssh_to_job.wire import (
    CLOSED,
    NEED_DATA,
    Channel,
    Connection,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Role,
    encode_frame,
    encode_message,
)

C, B, S = Role.CLIENT, Role.BROKER, Role.STARTER

#: The two peers of each channel: (the side that speaks first, the other side).
PEERS = {
    Channel.CONTROL: (C, B),
    Channel.STARTER: (S, B),
    Channel.ATTACH: (S, B),
    Channel.SESSION: (C, S),
    Channel.REMOTE: (C, B),
}

JOB = wire.JobSpec(executable="/bin/sleep", args=("60",))
REPORT = wire.JobReport(id="32.0", running=True, pid=4242)

#: One instance of every message type.
SAMPLES: dict[str, Message] = {
    m.TYPE: m
    for m in [
        wire.Submit(spec=JOB),
        wire.SubmitReply(cluster=32, count=1),
        wire.Query(ids=("32",)),
        wire.JobList(jobs=()),
        wire.ClusterQuery(ids=("32",)),
        wire.ClusterList(clusters=()),
        wire.JobTable(columns=wire.JOB_COLUMNS, rows="[]"),
        wire.Act(action="rm", ids=("32.0",)),
        wire.SshAllow(id="32.0", users=("carol",)),
        wire.SessionQuery(job="32.0"),
        wire.SessionList(sessions=()),
        wire.SessionEnded(session_id="s1", job="32.0", started=1.0, ended=2.0),
        wire.ActReply(results=(wire.ActResult(id="32.0", ok=True, message="removed"),)),
        wire.Status(),
        wire.StatusReply(starters=()),
        wire.Output(id="32.0"),
        wire.OutputReply(id="32.0", data=b"hello\n", running=True),
        wire.TokenCreate(ttl=600.0),
        wire.TokenCreated(token="stj1.a.b.c", expires_at=1.0),
        wire.StarterRevoke(name="exec1"),
        wire.StarterRevoked(serials=("1f",), cut=2),
        wire.SshRequest(job="32.0", client_key="ssh-ed25519 AAAA"),
        wire.SshGrant(
            session_id="s1", job="32.0", capability=b"cap", starter_id="st1", starter_key=b"k" * 32
        ),
        wire.Error(code="denied", message="not your job"),
        wire.StarterHello(starter_id="st1", starter_key=b"k" * 32, slots=4),
        wire.Welcome(broker_key=b"b" * 32),
        wire.StarterSync(jobs=(REPORT,)),
        wire.RunJob(job=wire.JobRun(id="32.0", uid=1000, gid=1000, owner="ann", spec=JOB)),
        wire.SignalJob(id="32.0", action="kill"),
        wire.OpenSession(session_id="s1", job="32.0"),
        wire.FetchOutput(request=1, id="32.0", stream="stdout", max_bytes=100),
        wire.OutputData(request=1, data=b"out", found=True),
        wire.JobUpdate(report=REPORT, sessions=1),
        wire.Ack(ids=("32.0",)),
        wire.SessionFailed(session_id="s1", message="job exited"),
        wire.Ping(),
        wire.CertRenew(public_key="-----BEGIN PUBLIC KEY-----"),
        wire.CertRenewed(certificate="-----BEGIN CERTIFICATE-----"),
        wire.SessionAttach(session_id="s1", starter_id="st1"),
        wire.SessionOpen(capability=b"cap", shells=("bash",)),
        wire.SessionReady(host_key="ssh-ed25519 AAAA", login="ann", signature=b"s" * 64),
        wire.KeyAdd(key="ssh-ed25519 AAAA"),
        wire.KeyAdded(fingerprint="SHA256:x", pool_id="p1"),
        wire.KeyList(),
        wire.KeyListReply(keys=()),
        wire.KeyRemove(fingerprint="SHA256:x"),
        wire.KeyRemoved(fingerprint="SHA256:x"),
        wire.PoolCa(),
        wire.PoolCaReply(pool_id="p1", ca_cert="-----BEGIN CERTIFICATE-----"),
        wire.SessionCert(certificate="ssh-ed25519-cert-v01@openssh.com AAAA"),
        wire.RemoteHello(),
        wire.RemoteChallenge(nonce=b"n" * 32, pool_id="p1"),
        wire.RemoteSsh(
            job="32.0", client_key="ssh-ed25519 AAAA", key="ssh-ed25519 BBBB", signature=b"s" * 64
        ),
        wire.AttachStandby(starter_id="st1"),
    ]
}

# The specification, written out independently of wire/_state.py: (state, sender, type) -> next.
SPEC: dict[Channel, dict[tuple[str, Role, str], str]] = {
    Channel.CONTROL: {
        ("start", C, "submit"): "submit",
        ("submit", B, "submit_reply"): "start",
        ("submit", B, "error"): "start",
        ("start", C, "query"): "query",
        ("query", B, "job_list"): "start",
        ("query", B, "job_table"): "start",
        ("query", B, "error"): "start",
        ("start", C, "act"): "act",
        ("act", B, "act_reply"): "start",
        ("act", B, "error"): "start",
        ("start", C, "ssh_allow"): "ssh_allow",
        ("ssh_allow", B, "act_reply"): "start",
        ("ssh_allow", B, "error"): "start",
        ("start", C, "session_query"): "session_query",
        ("session_query", B, "session_list"): "start",
        ("session_query", B, "error"): "start",
        ("start", C, "status"): "status",
        ("status", B, "status_reply"): "start",
        ("status", B, "error"): "start",
        ("start", C, "output"): "output",
        ("output", B, "output_reply"): "start",
        ("output", B, "error"): "start",
        ("start", C, "token_create"): "token_create",
        ("token_create", B, "token_created"): "start",
        ("token_create", B, "error"): "start",
        ("start", C, "starter_revoke"): "starter_revoke",
        ("starter_revoke", B, "starter_revoked"): "start",
        ("starter_revoke", B, "error"): "start",
        ("start", C, "ssh_request"): "ssh_request",
        ("ssh_request", B, "ssh_grant"): "closed",
        ("ssh_request", B, "error"): "start",
        ("start", C, "key_add"): "key_add",
        ("key_add", B, "key_added"): "start",
        ("key_add", B, "error"): "start",
        ("start", C, "key_list"): "key_list",
        ("key_list", B, "key_list_reply"): "start",
        ("key_list", B, "error"): "start",
        ("start", C, "key_remove"): "key_remove",
        ("key_remove", B, "key_removed"): "start",
        ("key_remove", B, "error"): "start",
        ("start", C, "pool_ca"): "pool_ca",
        ("pool_ca", B, "pool_ca_reply"): "start",
        ("pool_ca", B, "error"): "start",
        ("start", C, "cluster_query"): "cluster_query",
        ("cluster_query", B, "cluster_list"): "start",
        ("cluster_query", B, "error"): "start",
        ("start", B, "error"): "closed",
    },
    Channel.STARTER: {
        ("start", S, "starter_hello"): "hello",
        ("start", B, "error"): "closed",
        ("hello", B, "welcome"): "ready",
        ("hello", B, "error"): "closed",
        **{
            ("ready", S, t): "ready"
            for t in (
                "starter_sync",
                "job_update",
                "session_failed",
                "session_ended",
                "output_data",
                "ping",
                "cert_renew",
            )
        },
        **{
            ("ready", B, t): "ready"
            for t in (
                "run_job",
                "signal_job",
                "open_session",
                "fetch_output",
                "ack",
                "ping",
                "cert_renewed",
            )
        },
        ("ready", S, "error"): "closed",
        ("ready", B, "error"): "closed",
    },
    Channel.ATTACH: {
        ("start", S, "session_attach"): "attached",
        ("attached", B, "session_cert"): "raw",
        ("start", S, "attach_standby"): "standby",
        ("standby", S, "session_attach"): "attached",
    },
    Channel.SESSION: {
        ("start", C, "session_open"): "opening",
        ("opening", S, "session_ready"): "raw",
        ("opening", S, "error"): "closed",
    },
    Channel.REMOTE: {
        ("start", C, "remote_hello"): "hello",
        ("start", B, "error"): "closed",
        ("hello", B, "remote_challenge"): "challenged",
        ("hello", B, "error"): "closed",
        ("challenged", C, "remote_ssh"): "requested",
        ("requested", B, "ssh_grant"): "raw",
        ("requested", B, "error"): "closed",
    },
}


def paths(channel: Channel) -> dict[str, list[tuple[Role, str]]]:
    """The shortest message sequence from ``start`` to every state of the channel's SPEC."""
    found: dict[str, list[tuple[Role, str]]] = {"start": []}
    todo = collections.deque(["start"])
    while todo:
        state = todo.popleft()
        for (before, sender, type_), after in sorted(SPEC[channel].items(), key=str):
            if before == state and after not in found:
                found[after] = [*found[state], (sender, type_)]
                todo.append(after)
    return found


class Pair:
    """Both ends of one channel, driven in lock-step."""

    def __init__(self, channel: Channel) -> None:
        first, second = PEERS[channel]
        self.ends = {
            first: Connection(channel, first, second),
            second: Connection(channel, second, first),
        }

    def other(self, role: Role) -> Role:
        (them,) = set(self.ends) - {role}
        return them

    def say(self, sender: Role, msg: Message) -> None:
        """Send ``msg`` from ``sender``; the peer must receive it intact and agree on the state."""
        src, dst = self.ends[sender], self.ends[self.other(sender)]
        dst.receive_data(src.send(msg))
        assert dst.next_event() == msg
        assert dst.next_event() is NEED_DATA or dst.state == "raw"
        assert src.state == dst.state

    def play(self, path: list[tuple[Role, str]]) -> None:
        for sender, type_ in path:
            self.say(sender, SAMPLES[type_])

    @property
    def state(self) -> str:
        states = {c.state for c in self.ends.values()}
        assert len(states) == 1, states
        (state,) = states
        return state


def test_samples_cover_every_type() -> None:
    """The state tests have one sample of every message type, so none escapes the table check."""
    assert set(SAMPLES) == set(wire.MESSAGE_TYPES)
    assert all(type(m) is wire.MESSAGE_TYPES[t] for t, m in SAMPLES.items())


@pytest.mark.parametrize(
    ("channel", "state"),
    [(ch, st) for ch in Channel for st in paths(ch)],
    ids=lambda v: v.value if isinstance(v, Channel) else v,
)
def test_table_matches_spec(channel: Channel, state: str) -> None:
    """In each state, exactly the SPEC's messages are allowed (both peers agree on the next
    state) and every other one is LocalProtocolError to send and RemoteProtocolError to receive."""
    route = paths(channel)[state]
    for sender in PEERS[channel]:
        for type_, msg in SAMPLES.items():
            pair = Pair(channel)
            pair.play(route)
            assert pair.state == state
            expected = SPEC[channel].get((state, sender, type_))
            if expected is not None:
                pair.say(sender, msg)
                assert pair.state == expected, (state, sender, type_)
                continue
            src = pair.ends[sender]
            with pytest.raises(LocalProtocolError, match=f"{sender.value} may not send"):
                src.send(msg)
            assert src.state == "error"
            dst = pair.ends[pair.other(sender)]
            frame = encode_frame(encode_message(msg))
            dst.receive_data(frame)
            if state == "raw":
                # In RAW the codec no longer reads frames: the bytes are the next protocol's.
                assert dst.next_event() is NEED_DATA
                assert dst.trailing_data == frame
                continue
            with pytest.raises(RemoteProtocolError, match=f"{sender.value} may not send"):
                dst.next_event()
            assert dst.state == "error"


@pytest.mark.parametrize(
    ("request_type", "reply_type"),
    [
        ("submit", "submit_reply"),
        ("query", "job_list"),
        ("act", "act_reply"),
        ("ssh_allow", "act_reply"),
        ("session_query", "session_list"),
        ("status", "status_reply"),
        ("output", "output_reply"),
        ("cluster_query", "cluster_list"),
    ],
)
def test_control_requests_repeat(request_type: str, reply_type: str) -> None:
    """On the control channel a client may make request after request on one connection."""
    pair = Pair(Channel.CONTROL)
    for _ in range(3):
        pair.say(C, SAMPLES[request_type])
        assert pair.state == request_type
        pair.say(B, SAMPLES[reply_type])
        assert pair.state == "start"
    pair.say(C, SAMPLES[request_type])
    pair.say(B, SAMPLES["error"])
    assert pair.state == "start"


def test_ssh_grant_ends_the_control_conversation() -> None:
    """After ssh_grant nothing more may be said by either side; a refused request may be retried."""
    pair = Pair(Channel.CONTROL)
    pair.say(C, SAMPLES["ssh_request"])
    pair.say(B, SAMPLES["error"])
    pair.say(C, SAMPLES["ssh_request"])
    pair.say(B, SAMPLES["ssh_grant"])
    assert pair.state == "closed"
    with pytest.raises(LocalProtocolError):
        pair.ends[C].send(wire.Status())


def test_job_list_paging() -> None:
    """job_list pages with last=false keep the query open; the last=true page closes it."""
    pair = Pair(Channel.CONTROL)
    info = wire.JobInfo(
        id="1.0", owner="a", owner_uid=1, state="idle", executable="x", args=(), submitted=1.0
    )
    pair.say(C, wire.Query())
    for _ in range(3):
        pair.say(B, wire.JobList(jobs=(info,), last=False))
        assert pair.state == "query"
    pair.say(B, wire.JobList(jobs=(), last=True))
    assert pair.state == "start"
    with pytest.raises(LocalProtocolError):
        pair.ends[B].send(wire.JobList(jobs=(), last=False))


def test_job_table_paging() -> None:
    """A query may be answered in job_table pages instead: last=false keeps it open."""
    pair = Pair(Channel.CONTROL)
    pair.say(C, wire.Query(table=True))
    for _ in range(3):
        pair.say(B, wire.JobTable(columns=wire.JOB_COLUMNS, rows="[]", last=False))
        assert pair.state == "query"
    pair.say(B, wire.JobTable(columns=wire.JOB_COLUMNS, rows="[]", last=True))
    assert pair.state == "start"


def test_cluster_list_paging() -> None:
    """cluster_list pages with last=false keep the cluster query open, as job_list's do."""
    pair = Pair(Channel.CONTROL)
    info = wire.ClusterInfo(
        cluster=1, owner="a", owner_uid=1, submitted=1.0, executable="x", args=(), idle=3
    )
    pair.say(C, wire.ClusterQuery())
    for _ in range(3):
        pair.say(B, wire.ClusterList(clusters=(info,), last=False))
        assert pair.state == "cluster_query"
    pair.say(B, wire.ClusterList(clusters=(), last=True))
    assert pair.state == "start"
    with pytest.raises(LocalProtocolError):
        pair.ends[B].send(wire.ClusterList(clusters=(), last=False))


def test_starter_handshake_then_free_traffic() -> None:
    """Over TLS the starter channel runs hello then welcome; then both sides talk freely."""
    pair = Pair(Channel.STARTER)
    for sender, type_, state in [
        (S, "starter_hello", "hello"),
        (B, "welcome", "ready"),
        (S, "starter_sync", "ready"),
        (B, "run_job", "ready"),
        (S, "job_update", "ready"),
        (B, "ack", "ready"),
        (B, "open_session", "ready"),
        (S, "session_failed", "ready"),
        (B, "fetch_output", "ready"),
        (S, "output_data", "ready"),
        (B, "ping", "ready"),
        (S, "ping", "ready"),
        (B, "signal_job", "ready"),
        (S, "error", "closed"),
    ]:
        pair.say(sender, SAMPLES[type_])
        assert pair.state == state


@pytest.mark.parametrize("state", ["start", "hello"])
def test_broker_may_refuse_a_starter(state: str) -> None:
    """The broker may refuse a starter before or after its hello with an error; it ends the
    channel."""
    pair = Pair(Channel.STARTER)
    pair.play(paths(Channel.STARTER)[state])
    pair.say(B, SAMPLES["error"])
    assert pair.state == "closed"


def test_attach_goes_raw_with_trailing_data() -> None:
    """session_attach and the broker's session_cert turn the connection RAW; bytes behind the
    certificate are left for the next protocol."""
    starter = Connection(Channel.ATTACH, S, B)
    broker = Connection(Channel.ATTACH, B, S)
    broker.receive_data(starter.send(SAMPLES["session_attach"]))
    assert broker.next_event() == SAMPLES["session_attach"]
    assert broker.state == starter.state == "attached"
    data = broker.send(SAMPLES["session_cert"])
    assert broker.state == "raw"
    behind = encode_frame(encode_message(SAMPLES["session_open"]))
    starter.receive_data(data + behind)
    assert starter.next_event() == SAMPLES["session_cert"]
    assert starter.state == "raw"
    assert starter.next_event() is NEED_DATA
    assert starter.trailing_data == behind
    with pytest.raises(LocalProtocolError):
        starter.send(SAMPLES["error"])


@pytest.mark.parametrize("chunk", [None, 1])
def test_session_goes_raw_with_trailing_data(chunk: int | None) -> None:
    """After session_ready the codec yields nothing more; the SSH banner stays in trailing_data."""
    client = Connection(Channel.SESSION, C, S)
    starter = Connection(Channel.SESSION, S, C)
    starter.receive_data(client.send(SAMPLES["session_open"]))
    assert starter.next_event() == SAMPLES["session_open"]
    assert client.trailing_data == b""
    banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
    stream = starter.send(SAMPLES["session_ready"]) + banner
    got = []
    step = chunk or len(stream)
    for i in range(0, len(stream), step):
        client.receive_data(stream[i : i + step])
        while isinstance(ev := client.next_event(), Message):
            got.append(ev)
    assert got == [SAMPLES["session_ready"]]
    assert client.state == starter.state == "raw"
    assert client.trailing_data == banner
    with pytest.raises(LocalProtocolError, match="in state 'raw'"):
        client.send(wire.Ping())


def test_session_refused() -> None:
    """A starter that refuses the capability answers error and the session channel is closed."""
    pair = Pair(Channel.SESSION)
    pair.say(C, SAMPLES["session_open"])
    pair.say(S, SAMPLES["error"])
    assert pair.state == "closed"
    assert pair.ends[C].trailing_data == b""


def test_error_state_is_final_after_local_error() -> None:
    """After we send out of turn, every later send and receive is refused, even valid ones."""
    conn = Connection(Channel.CONTROL, C, B)
    with pytest.raises(LocalProtocolError):
        conn.send(SAMPLES["ssh_grant"])
    assert conn.state == "error"
    with pytest.raises(LocalProtocolError, match="already in the error state"):
        conn.send(SAMPLES["status"])
    assert conn.state == "error"
    conn.receive_data(encode_frame(encode_message(SAMPLES["error"])))
    with pytest.raises(RemoteProtocolError, match="already in the error state"):
        conn.next_event()
    assert conn.state == "error"


def test_error_state_is_final_after_remote_error() -> None:
    """After a malformed frame, the connection refuses everything and never asks for more data."""
    conn = Connection(Channel.CONTROL, B, C)
    conn.receive_data(encode_frame(b"not json"))
    with pytest.raises(RemoteProtocolError, match="not valid"):
        conn.next_event()
    assert conn.state == "error"
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="already in the error state"):
            conn.next_event()
    conn.receive_data(encode_frame(encode_message(SAMPLES["status"])))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(SAMPLES["error"])
    assert conn.state == "error"


def test_oversize_frame_via_connection() -> None:
    """A connection's frame limit refuses a big header as the peer's error, a big send as ours."""
    conn = Connection(Channel.STARTER, B, S, max_frame=64)
    conn.receive_data(b"\x00\x00\x00\x41")
    with pytest.raises(RemoteProtocolError, match="65-byte frame; the limit is 64"):
        conn.next_event()
    assert conn.state == "error"
    starter = Connection(Channel.STARTER, S, B, max_frame=64)
    with pytest.raises(LocalProtocolError, match="exceeds the 64-byte limit"):
        starter.send(wire.StarterHello(starter_id="x" * 64, starter_key=b"", slots=1))
    assert starter.state == "error"


def test_clean_eof_and_eof_mid_frame() -> None:
    """EOF between messages gives CLOSED; EOF inside one is the peer's error."""
    conn = Connection(Channel.CONTROL, B, C)
    conn.receive_data(encode_frame(encode_message(SAMPLES["status"])) + b"")
    conn.receive_data(b"")
    assert conn.next_event() == SAMPLES["status"]
    assert conn.next_event() is CLOSED
    half = Connection(Channel.CONTROL, B, C)
    half.receive_data(encode_frame(encode_message(SAMPLES["status"]))[:-1])
    assert half.next_event() is NEED_DATA
    half.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        half.next_event()
    assert half.state == "error"


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_handshake_stream_in_any_chunks(chunk: int) -> None:
    """The broker's side of a handshake gives the same events fed at once or in small pieces."""
    starter = Connection(Channel.STARTER, S, B)
    script = [SAMPLES[t] for t in ("starter_hello", "starter_sync", "ping")]
    stream = b""
    for msg in script:
        stream += starter.send(msg)
        if msg.TYPE == "starter_hello":
            starter.receive_data(encode_frame(encode_message(SAMPLES["welcome"])))
            assert starter.next_event() == SAMPLES["welcome"]
    broker = Connection(Channel.STARTER, B, S)
    step = chunk or len(stream)
    got: list[Message] = []
    for i in range(0, len(stream), step):
        broker.receive_data(stream[i : i + step])
        while True:
            ev = broker.next_event()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, Message)
            got.append(ev)
            if ev.TYPE == "starter_hello":
                broker.send(SAMPLES["welcome"])
    assert got == script
    assert broker.state == starter.state == "ready"
    broker.receive_data(b"")
    assert broker.next_event() is CLOSED
