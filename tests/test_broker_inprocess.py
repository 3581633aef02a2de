"""The broker in-process (pytest-trio, real unix socket and loopback TCP): its timeouts on trio's
autojump clock, the rendezvous, pings, and the lifecycle applied to the queue."""

from __future__ import annotations

import array
import contextlib
import pathlib
import secrets
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import attrs
import pytest
import trio
import trio.testing

from ssh_to_job import common, transport, wire
from ssh_to_job.broker import Broker
from ssh_to_job.broker import _connections as conns
from ssh_to_job.transport import FramedStream, PeerGone

EPOCH = 1_800_000_000.0
SPEC = wire.JobSpec(executable="/bin/sleep", args=("600",))


@pytest.fixture
def state_dir() -> Iterator[pathlib.Path]:
    d = pathlib.Path("/tmp") / f"stjt-inproc-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_broker(state: pathlib.Path, **broker: object) -> Broker:
    broker.setdefault("port", 0)
    config = common.PoolConfig(broker=common.BrokerConfig(**broker))  # type: ignore[arg-type]
    # Stored timestamps and capabilities follow trio's (mock) clock, from a fixed epoch.
    return Broker(state, config, clock=lambda: EPOCH + trio.current_time())


@pytest.fixture
async def broker(state_dir: pathlib.Path) -> AsyncIterator[Broker]:
    b = make_broker(state_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve)
        yield b
        nursery.cancel_scope.cancel()


async def unix_client(b: Broker) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(b.socket_path))
    return sock


async def read_until_closed(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while chunk := await sock.recv(65536):
        data += chunk
    return data


async def request(b: Broker, msg: wire.Message) -> tuple[wire.Message, list[int]]:
    """One request over the unix socket (as root): the reply and any fds passed with it."""
    with await unix_client(b) as sock:
        conn = wire.Connection(wire.Channel.CONTROL, wire.Role.CLIENT, wire.Role.BROKER)
        await sock.send(conn.send(msg))
        fds: list[int] = []
        while True:
            event = conn.next_event()
            if isinstance(event, wire.Message):
                return event, fds
            data, anc, _flags, _addr = await sock.recvmsg(65536, socket.CMSG_SPACE(4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            conn.receive_data(data)


@attrs.define
class FakeStarter:
    """The starter's side of the control channel, driven by the test."""

    name: str
    identity: bytes
    #: Its TLS context: a certificate the broker's pool CA issued to ``name``.
    tls: ssl.SSLContext
    stream: FramedStream | None = None
    #: Every stream it opened, closed at the end of the test.
    streams: list[trio.abc.Stream] = attrs.field(factory=list)
    #: Messages that arrived before the sync's Ack.
    early: list[wire.Message] = attrs.field(factory=list)

    async def dial(self, b: Broker) -> trio.SSLStream[trio.SocketStream]:
        tls, _ = await transport.connect_tls(
            "127.0.0.1", b.tcp_port, self.tls, pool_id=b.pki.pool_id
        )
        self.streams.append(tls)
        return tls

    async def connect(self, b: Broker, reports: tuple[wire.JobReport, ...] = ()) -> None:
        stream = FramedStream(
            await self.dial(b),
            wire.Connection(wire.Channel.STARTER, wire.Role.STARTER, wire.Role.BROKER),
        )
        hello = wire.StarterHello(
            starter_id=self.name, starter_key=wire.public_key_of(self.identity), slots=2
        )
        await stream.send(hello)
        welcome = await stream.receive()
        assert welcome == wire.Welcome(broker_key=b.public_key), welcome
        await stream.send(wire.StarterSync(jobs=reports))
        # The sync is answered by its Ack; what its reports caused comes first.
        while not isinstance(msg := await stream.receive(), wire.Ack):
            self.early.append(msg)
        self.stream = stream

    async def receive(self, *skip: type[wire.Message]) -> wire.Message:
        assert self.stream is not None
        while True:
            msg = self.early.pop(0) if self.early else await self.stream.receive()
            if not isinstance(msg, (wire.Ack, wire.Ping, *skip)):
                return msg

    async def attach(self, b: Broker, open_msg: wire.OpenSession) -> trio.socket.SocketType:
        """A session connection: the attach frame over TLS, then the bare socket."""
        tls = await self.dial(b)
        attach = wire.SessionAttach(session_id=open_msg.session_id, starter_id=self.name)
        c = wire.Connection(wire.Channel.ATTACH, wire.Role.STARTER, wire.Role.BROKER)
        await tls.send_all(c.send(attach))
        # The broker answers with the session's host certificate (none asked for here).
        while not isinstance(reply := c.next_event(), wire.Message):
            c.receive_data(bytes(await tls.receive_some(65536)))
        assert reply == wire.SessionCert(certificate="")
        raw, extra = await tls.unwrap()
        assert extra == b""
        assert isinstance(raw, trio.SocketStream)
        self.streams.append(raw)
        return raw.socket

    async def close(self) -> None:
        assert self.stream is not None
        await self.stream.aclose()


def certified(b: Broker, name: str, where: pathlib.Path) -> ssl.SSLContext:
    """A client TLS context with a certificate of ``b``'s pool CA for starter ``name``."""
    key = common.new_private_key()
    cert = b.pki.issue(wire.ROLE_STARTER, name, key.public_key())
    common.write_leaf(where, common.STARTER_KEY, common.STARTER_CERT, key, cert)
    return transport.client_context(
        b.pki.ca_file, where / common.STARTER_CERT, where / common.STARTER_KEY
    )


@pytest.fixture
async def st(broker: Broker) -> AsyncIterator[FakeStarter]:
    """A fake starter "st1" with a certificate of the broker's pool."""
    tls = certified(broker, "st1", broker.state_dir / "st1-pki")
    starter = FakeStarter("st1", wire.new_signing_key(), tls)
    yield starter
    for stream in starter.streams:
        await trio.aclose_forcefully(stream)


async def running_job(b: Broker, st: FakeStarter) -> str:
    """Submit a job (as uid 1000) and let the fake starter report it running."""
    cluster = b.queue.submit(SPEC, 1, "ann", 1000, 1000)
    b.jobs.schedule()
    run = await st.receive()
    assert isinstance(run, wire.RunJob)
    assert run.job.id == f"{cluster}.0"
    assert st.stream is not None
    report = wire.JobReport(id=run.job.id, running=True, pid=4242)
    await st.stream.send(wire.JobUpdate(report=report))
    with trio.fail_after(5):
        while not b.queue.get(run.job.id).pid:
            await trio.sleep(0.01)
    return run.job.id


# ---------------------------------------------------------------------------- timeouts


async def test_idle_client_is_dropped_after_client_idle(
    broker: Broker, autojump_clock: trio.testing.MockClock
) -> None:
    """A local client that connects and sends nothing is closed CLIENT_IDLE seconds later."""
    with await unix_client(broker) as sock:
        start = trio.current_time()
        assert await read_until_closed(sock) == b""
    assert conns.CLIENT_IDLE <= trio.current_time() - start < conns.CLIENT_IDLE + 1


async def test_half_sent_frame_on_unix_socket_has_frame_timeout(
    broker: Broker, autojump_clock: trio.testing.MockClock
) -> None:
    """A frame started but not finished on the unix socket is dropped after frame_timeout (10 s),
    not held for the idle timeout."""
    with await unix_client(broker) as sock:
        start = trio.current_time()
        await sock.send(wire.FRAME_HEADER.pack(100) + b'{"type": "sub')
        assert await read_until_closed(sock) == b""
    timeout = broker.bc.frame_timeout
    assert timeout <= trio.current_time() - start < timeout + 1


async def test_slow_sender_on_unix_socket_is_cut_at_frame_timeout(
    broker: Broker, autojump_clock: trio.testing.MockClock
) -> None:
    """One byte a second does not extend a frame's deadline."""
    start = trio.current_time()
    frame = wire.encode_frame(b'{"type": "status"}' + b" " * 100)
    sent = 0
    with await unix_client(broker) as sock, contextlib.suppress(OSError):
        # The broker hangs up mid-send.
        for i in range(len(frame)):
            await sock.send(frame[i : i + 1])
            sent += 1
            await trio.sleep(1)
    assert sent < len(frame)
    timeout = broker.bc.frame_timeout
    assert trio.current_time() - start < timeout + 3


async def test_half_sent_frame_on_tls_has_frame_timeout(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """On the TLS port, a certified starter's first frame that does not complete is dropped
    after frame_timeout with an error."""
    tls = await st.dial(broker)
    start = trio.current_time()
    await tls.send_all(wire.FRAME_HEADER.pack(100) + b"{")
    data = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await tls.receive_some(65536):
            data += chunk
    timeout = broker.bc.frame_timeout
    assert timeout <= trio.current_time() - start < timeout + 2
    assert b"no complete frame" in data


async def test_stalled_tls_handshake_is_cut_at_handshake_timeout(
    broker: Broker, autojump_clock: trio.testing.MockClock
) -> None:
    """A TCP peer that never starts its TLS handshake is closed after handshake_timeout, and
    the unix socket answers meanwhile."""
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", broker.tcp_port))
        start = trio.current_time()
        reply, _ = await request(broker, wire.Status())
        assert isinstance(reply, wire.StatusReply)
        assert trio.current_time() - start < 1
        assert await read_until_closed(sock) == b""
    timeout = broker.bc.handshake_timeout
    assert timeout <= trio.current_time() - start < timeout + 1


async def test_stalled_handshakes_are_capped_per_address(
    state_dir: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Past max_connections_per_uid handshakes in progress from one address, a new TCP
    connection is closed at once; once those end (handshake_timeout), that address gets in
    again, and a local client is answered throughout."""
    b = make_broker(state_dir, max_connections_per_uid=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve)
        held = [trio.socket.socket() for _ in range(2)]
        for sock in held:
            await sock.connect(("127.0.0.1", b.tcp_port))
        await trio.sleep(0.5)  # let the broker count them
        start = trio.current_time()
        with trio.socket.socket() as extra:
            await extra.connect(("127.0.0.1", b.tcp_port))
            assert await read_until_closed(extra) == b""
        assert trio.current_time() - start < 1
        reply, _ = await request(b, wire.Status())
        assert isinstance(reply, wire.StatusReply)
        for sock in held:
            assert await read_until_closed(sock) == b""
            sock.close()
        assert trio.current_time() - start >= b.bc.handshake_timeout - 1
        with trio.socket.socket() as later:
            await later.connect(("127.0.0.1", b.tcp_port))
            await trio.sleep(0.5)
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(1):
                    await later.recv(1)  # in its handshake, not refused
        nursery.cancel_scope.cancel()


async def test_broker_pings_starters_and_drops_a_silent_one(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """The broker pings every PING_INTERVAL s, and a starter silent for STARTER_SILENCE s is
    dropped (and no longer listed)."""
    await st.connect(broker)
    assert st.stream is not None
    start = trio.current_time()
    pings = []
    with pytest.raises(PeerGone):  # noqa: PT012
        while True:
            msg = await st.stream.receive()
            if isinstance(msg, wire.Ping):
                pings.append(trio.current_time() - start)
    gone = trio.current_time() - start
    assert conns.STARTER_SILENCE <= gone < conns.STARTER_SILENCE + 1
    interval = conns.PING_INTERVAL
    assert pings[:2] == pytest.approx([interval, 2 * interval], abs=0.5)
    assert "st1" not in broker.jobs.starters


async def test_session_rendezvous_times_out(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """A starter that never dials the session connection: the client is told after
    session_timeout, and nothing is left pending."""
    await st.connect(broker)
    job = await running_job(broker, st)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(st.receive)  # the OpenSession, ignored
        reply, fds = await request(
            broker, wire.SshRequest(job=job, client_key="ssh-ed25519 AAAA test")
        )
    assert isinstance(reply, wire.Error)
    assert reply.code == "session_failed"
    assert "did not open the session in time" in reply.message
    assert fds == []
    timeout = broker.bc.session_timeout
    assert timeout <= trio.current_time() - start < timeout + 1
    assert broker.rendezvous.sessions == {}


async def test_session_socket_is_passed_with_a_capability_of_the_configured_lifetime(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """The starter's attached socket reaches the client (SCM_RIGHTS), byte-exact, with a
    capability valid for capability_lifetime s on the broker's clock and not after."""
    await st.connect(broker)
    job = await running_job(broker, st)
    attached: list[trio.socket.SocketType] = []

    async def starter_side() -> None:
        msg = await st.receive()
        assert isinstance(msg, wire.OpenSession)
        attached.append(await st.attach(broker, msg))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(starter_side)
        reply, fds = await request(
            broker, wire.SshRequest(job=job, client_key="ssh-ed25519 AAAA test")
        )
    assert isinstance(reply, wire.SshGrant), reply
    (fd,) = fds
    with socket.socket(fileno=fd) as session:
        await attached[0].send(b"hello through the broker")
        assert session.recv(100) == b"hello through the broker"
    cap = wire.verify_capability(reply.capability, broker.public_key, EPOCH + trio.current_time())
    assert cap.expires_at - cap.issued_at == broker.bc.capability_lifetime
    assert cap.job == job
    wire.verify_capability(reply.capability, broker.public_key, cap.expires_at)
    late = cap.expires_at + wire.CLOCK_SKEW + 1
    with pytest.raises(wire.CapabilityError, match="expired"):
        wire.verify_capability(reply.capability, broker.public_key, late)


async def test_ssh_waits_briefly_for_a_reconnecting_starter(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """A job's starter that is away for 2 s is waited for (starter_wait, 5 s); one that stays
    away gets "not connected" once starter_wait has passed."""
    await st.connect(broker)
    job = await running_job(broker, st)
    await st.close()
    with trio.fail_after(1):
        while "st1" in broker.jobs.starters:
            await trio.sleep(0.01)

    async def come_back() -> None:
        await trio.sleep(2)
        await st.connect(broker, (wire.JobReport(id=job, running=True, pid=4242),))
        msg = await st.receive()
        assert isinstance(msg, wire.OpenSession)
        await st.attach(broker, msg)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(come_back)
        reply, fds = await request(
            broker, wire.SshRequest(job=job, client_key="ssh-ed25519 AAAA test")
        )
    assert isinstance(reply, wire.SshGrant), reply
    for fd in fds:
        socket.socket(fileno=fd).close()

    await st.close()
    with trio.fail_after(1):
        while "st1" in broker.jobs.starters:
            await trio.sleep(0.01)
    start = trio.current_time()
    reply, _ = await request(broker, wire.SshRequest(job=job, client_key="ssh-ed25519 AAAA"))
    assert isinstance(reply, wire.Error)
    assert "is not connected" in reply.message
    wait = broker.bc.starter_wait
    assert wait <= trio.current_time() - start < wait + 1


async def test_suspend_waits_briefly_for_a_reconnecting_starter(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """stj suspend while the job's starter redials (2 s away) waits for it and succeeds."""
    await st.connect(broker)
    job = await running_job(broker, st)
    await st.close()
    with trio.fail_after(1):
        while "st1" in broker.jobs.starters:
            await trio.sleep(0.01)

    async def come_back() -> None:
        await trio.sleep(2)
        await st.connect(broker, (wire.JobReport(id=job, running=True, pid=4242),))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(come_back)
        reply, _ = await request(broker, wire.Act(action="suspend", ids=(job,)))
    assert isinstance(reply, wire.ActReply)
    assert reply.results == (wire.ActResult(job, True, f"job {job}: suspend done"),)
    assert await st.receive() == wire.SignalJob(id=job, action="suspend", reason="")


# ---------------------------------------------------------------------------- lifecycle applied


async def test_could_not_start_holds_the_job_frees_the_slot_and_is_not_resent(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """A starter's "could not start" report holds the job with the reason and frees its slot;
    the held job is not sent again when the starter reconnects."""
    await st.connect(broker)
    job = await running_job(broker, st)
    assert st.stream is not None
    bad = wire.JobReport(id=job, running=False, reason="could not start: bad environment")
    await st.stream.send(wire.JobUpdate(report=bad))
    with trio.fail_after(5):
        while broker.queue.get(job).state != "held":
            await trio.sleep(0.01)
    row = broker.queue.get(job)
    assert row.hold_reason == "could not start: bad environment"
    assert not row.placed
    assert broker.jobs.starters["st1"].jobs == set()
    await st.close()
    await st.connect(broker)
    with trio.move_on_after(30):
        msg = await st.receive()
        raise AssertionError(f"the starter was sent {msg}")
    assert broker.queue.get(job).state == "held"


async def test_release_of_a_job_still_on_its_starter_waits_for_its_end(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """hold then release of a running job: it is "releasing" (not idle, so not run twice) until
    the starter reports it gone, then idle and matched again."""
    await st.connect(broker)
    job = await running_job(broker, st)
    reply, _ = await request(broker, wire.Act(action="hold", ids=(job,)))
    assert isinstance(reply, wire.ActReply)
    evict = await st.receive()
    assert evict == wire.SignalJob(id=job, action="evict", reason="held by root")
    reply, _ = await request(broker, wire.Act(action="release", ids=(job,)))
    assert isinstance(reply, wire.ActReply)
    assert reply.results[0].message == f"job {job}: release done (once evicted)"
    assert broker.queue.get(job).state == "releasing"
    assert st.stream is not None
    await st.stream.send(wire.JobUpdate(report=wire.JobReport(id=job, running=False)))
    run = await st.receive()
    assert isinstance(run, wire.RunJob)
    assert run.job.id == job


def test_gate_caps_per_key_and_in_total() -> None:
    """The connection gate admits per_key connections per key and total in all, and frees a
    place when one leaves."""
    gate = conns.Gate(total=3, per_key=2)
    assert gate.enter(1) is None
    assert gate.enter(1) is None
    assert "2 connections" in (gate.enter(1) or "")
    assert gate.enter(2) is None
    assert "limit" in (gate.enter(3) or "")
    gate.leave(1)
    assert gate.enter(3) is None
    assert gate.count == 3


async def test_a_connected_starter_gets_a_renewed_certificate_in_its_name(
    broker: Broker, st: FakeStarter
) -> None:
    """cert_renew on an authenticated control channel gets a certificate of the pool for the
    new key, in the name of the connection's certificate, recorded as issued."""
    await st.connect(broker)
    assert st.stream is not None
    key = common.new_private_key()
    await st.stream.send(wire.CertRenew(public_key=common.public_key_pem(key.public_key())))
    reply = await st.receive()
    assert isinstance(reply, wire.CertRenewed), reply
    cert = common.parse_cert(reply.certificate)
    ident = common.verify_leaf(
        cert, [broker.pki.ca.cert], pool_id=broker.pki.pool_id, role=wire.ROLE_STARTER, name="st1"
    )
    assert ident.name == "st1"
    assert common.public_key_pem(cert.public_key()) == common.public_key_pem(key.public_key())  # type: ignore[arg-type]
    assert cert.serial_number in {c.serial for c in broker.pki.issued()}


async def test_a_stale_copy_on_another_starter_is_killed(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """A second starter reporting a job that the queue has on the first is told to kill its
    copy, and the queue keeps the job where it was."""
    await st.connect(broker)
    job = await running_job(broker, st)
    other = FakeStarter(
        "st2", wire.new_signing_key(), certified(broker, "st2", broker.state_dir / "st2-pki")
    )
    try:
        stale = wire.JobReport(id=job, running=True, pid=999)
        await other.connect(broker, (stale,))
        kill = await other.receive()
        assert kill == wire.SignalJob(id=job, action="kill", reason="runs on st1")
        row = broker.queue.get(job)
        assert (row.state, row.starter, row.pid) == ("running", "st1", 4242)
    finally:
        for stream in other.streams:
            await trio.aclose_forcefully(stream)


async def test_a_started_frame_on_a_starter_channel_has_frame_timeout(
    broker: Broker, st: FakeStarter, autojump_clock: trio.testing.MockClock
) -> None:
    """On an authenticated starter's control channel, a frame begun but not finished costs
    the channel after frame_timeout, long before the silence limit."""
    await st.connect(broker)
    assert st.stream is not None
    start = trio.current_time()
    await st.stream.stream.send_all(wire.FRAME_HEADER.pack(100) + b"{")
    with pytest.raises(PeerGone):  # noqa: PT012
        while True:
            await st.stream.receive()
    gone = trio.current_time() - start
    assert broker.bc.frame_timeout <= gone < broker.bc.frame_timeout + 1
    assert gone < conns.STARTER_SILENCE
