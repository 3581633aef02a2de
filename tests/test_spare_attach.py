"""Spare attach connections (issue 12): the starter dials and authenticates a session's attach
connection ahead of the session, and the broker holds it (``attach_standby``) within bounds.

The broker's side runs in-process on trio's autojump clock over real TLS (as in
test_broker_inprocess.py); the starter's side in-process against tests/starterharness.py's
TinyBroker, and end to end in a real pool with real sshd.
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import shutil
import signal
import ssl
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from conftest import User, new_state_dir, wait_for
from starterharness import running_starter, starter_config
from test_broker_inprocess import FakeStarter, certified, make_broker, request, running_job

from ssh_to_job import wire
from ssh_to_job.broker import Broker
from ssh_to_job.starter._spare import Spare, Spares

# ---------------------------------------------------------------------------- the broker


@pytest.fixture
def state() -> Iterator[pathlib.Path]:
    d = pathlib.Path("/tmp") / f"stjt-spare-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def served(state: pathlib.Path) -> AsyncIterator[tuple[Broker, FakeStarter]]:
    """A broker (standby_per_starter 2, standby_lifetime 50 s) and a fake starter "st1"."""
    b = make_broker(state, standby_per_starter=2, standby_lifetime=50.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve)
        st = FakeStarter("st1", wire.new_signing_key(), certified(b, "st1", state / "st1-pki"))
        yield b, st
        for stream in st.streams:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


async def standby(
    b: Broker, st: FakeStarter, name: str = "st1"
) -> tuple[trio.SSLStream[trio.SocketStream], wire.Connection]:
    tls = await st.dial(b)
    conn = wire.Connection(wire.Channel.ATTACH, wire.Role.STARTER, wire.Role.BROKER)
    await tls.send_all(conn.send(wire.AttachStandby(starter_id=name)))
    return tls, conn


async def held(b: Broker, n: int) -> None:
    """Wait until the broker holds ``n`` standby connections of st1."""
    with trio.fail_after(5):
        while len(b.connections.standbys.get("st1", ())) != n:
            await trio.sleep(0.001)


async def until_closed(tls: trio.SSLStream[trio.SocketStream]) -> list[wire.Message]:
    """Everything the broker sends on a connection until it closes it."""
    decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME)
    with trio.fail_after(1000):
        while True:
            try:
                data = await tls.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            decoder.receive_data(bytes(data))
            if not data:
                break
    out = []
    while isinstance(payload := decoder.next_frame(), bytes):
        out.append(wire.decode_message(payload))
    return out


async def test_a_session_attaches_on_a_standby_connection(
    served: tuple[Broker, FakeStarter], autojump_clock: trio.testing.MockClock
) -> None:
    """A standby dialled before the session carries its session_attach: the broker answers
    with session_cert, leaves TLS and passes that very socket to the client."""
    b, st = served
    await st.connect(b)
    job = await running_job(b, st)
    tls, conn = await standby(b, st)
    await held(b, 1)
    attached: list[trio.socket.SocketType] = []

    async def starter_side() -> None:
        msg = await st.receive()
        assert isinstance(msg, wire.OpenSession)
        await tls.send_all(
            conn.send(wire.SessionAttach(session_id=msg.session_id, starter_id="st1"))
        )
        while not isinstance(reply := conn.next_event(), wire.Message):
            conn.receive_data(bytes(await tls.receive_some(65536)))
        assert reply == wire.SessionCert(certificate="")
        raw, extra = await tls.unwrap()
        assert extra == b""
        assert isinstance(raw, trio.SocketStream)
        st.streams.append(raw)
        attached.append(raw.socket)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(starter_side)
        reply, fds = await request(b, wire.SshRequest(job=job, client_key="ssh-ed25519 AAAA t"))
    assert isinstance(reply, wire.SshGrant), reply
    (fd,) = fds
    with os.fdopen(fd, "rb", buffering=0) as session:
        await attached[0].send(b"through the standby")
        assert session.read(100) == b"through the standby"
    await held(b, 0)


async def test_standbys_over_the_per_starter_limit_are_refused(
    served: tuple[Broker, FakeStarter], autojump_clock: trio.testing.MockClock
) -> None:
    """A starter holding standby_per_starter standbys gets an error frame for the next one,
    which is closed and not counted; its first ones stay held."""
    b, st = served
    for _ in range(2):
        await standby(b, st)
    await held(b, 2)
    tls, _conn = await standby(b, st)
    (error,) = await until_closed(tls)
    assert isinstance(error, wire.Error)
    assert error.code == "busy"
    assert "standby_per_starter" in error.message
    assert len(b.connections.standbys["st1"]) == 2


async def test_a_standby_in_another_starters_name_is_refused(
    served: tuple[Broker, FakeStarter], autojump_clock: trio.testing.MockClock
) -> None:
    """attach_standby must name the starter the certificate is for: any other name gets a
    bad_name error and the connection is closed, counted for no one."""
    b, st = served
    tls, _conn = await standby(b, st, name="st2")
    (error,) = await until_closed(tls)
    assert isinstance(error, wire.Error)
    assert error.code == "bad_name"
    assert b.connections.standbys == {}


async def test_an_unused_standby_is_closed_after_standby_lifetime(
    served: tuple[Broker, FakeStarter], autojump_clock: trio.testing.MockClock
) -> None:
    """A standby on which no session_attach comes is closed standby_lifetime s (trio's clock)
    after it was made, without a word."""
    b, st = served
    start = trio.current_time()
    tls, _conn = await standby(b, st)
    await held(b, 1)
    assert await until_closed(tls) == []
    assert 50.0 <= trio.current_time() - start < 51.0
    assert b.connections.standbys == {}


async def test_a_half_sent_attach_on_a_standby_has_frame_timeout(
    served: tuple[Broker, FakeStarter], autojump_clock: trio.testing.MockClock
) -> None:
    """Once the session_attach's first byte is in, the rest of it must follow within
    frame_timeout, not the standby's lifetime."""
    b, st = served
    tls, conn = await standby(b, st)
    await held(b, 1)
    await trio.sleep(20)
    frame = conn.send(wire.SessionAttach(session_id="s" * 32, starter_id="st1"))
    start = trio.current_time()
    await tls.send_all(frame[:5])
    assert await until_closed(tls) == []
    assert b.bc.frame_timeout <= trio.current_time() - start < b.bc.frame_timeout + 1


async def test_revoking_a_starter_drops_its_standbys(
    served: tuple[Broker, FakeStarter], autojump_clock: trio.testing.MockClock
) -> None:
    """stj starter revoke closes the starter's standbys at once, with its control channel
    (the one connection it reports cut: a standby carries no session)."""
    b, st = served
    await st.connect(b)
    a, _ = await standby(b, st)
    c, _ = await standby(b, st)
    await held(b, 2)
    start = trio.current_time()
    reply, _fds = await request(b, wire.StarterRevoke(name="st1"))
    assert isinstance(reply, wire.StarterRevoked)
    assert reply.cut == 1
    for tls in (a, c):
        assert await until_closed(tls) == []
    assert trio.current_time() - start < 1
    assert b.connections.standbys == {}


# ---------------------------------------------------------------------------- the starter


def _run(user: User, job_id: str) -> wire.RunJob:
    spec = wire.JobSpec(executable="/bin/sleep", args=("1000",))
    return wire.RunJob(
        job=wire.JobRun(
            id=job_id, uid=user.uid, gid=user.gid, owner=user.name or str(user.uid), spec=spec
        )
    )


async def test_a_session_uses_a_spare_and_the_spare_is_replaced(users: dict[str, User]) -> None:
    """With spare_attach 1 the starter holds a standby as soon as its control channel is up;
    a session's attach arrives on it, and a new standby is dialled right after."""
    state = new_state_dir()
    async with running_starter(state, starter_config(spare_attach=1)) as (starter, broker):
        with trio.fail_after(20):
            await broker.next(wire.StarterSync)
            while starter.spares.ready != 1:
                await trio.sleep(0.01)
            assert broker.standbys == 1
            await broker.send(_run(users["a"], "1.0"))
            await broker.next_report("1.0", running=True)
            for n in (1, 2):
                await broker.send(wire.OpenSession(session_id=secrets.token_hex(16), job="1.0"))
                _attach, sock = await broker.attaches.receive()
                sock.close()
                assert broker.on_standby == [True] * n
                while broker.standbys != n + 1 or starter.spares.ready != 1:
                    await trio.sleep(0.01)


async def test_a_spare_lost_under_the_session_falls_back_to_dialling(
    users: dict[str, User],
) -> None:
    """A spare that the broker closes as its session_attach arrives costs the session
    nothing: the starter dials a new connection and attaches on it."""
    state = new_state_dir()
    async with running_starter(state, starter_config(spare_attach=1)) as (starter, broker):
        broker.drop_standby_attach = True
        with trio.fail_after(20):
            await broker.next(wire.StarterSync)
            while starter.spares.ready != 1:
                await trio.sleep(0.01)
            await broker.send(_run(users["a"], "1.0"))
            await broker.next_report("1.0", running=True)
            session_id = secrets.token_hex(16)
            await broker.send(wire.OpenSession(session_id=session_id, job="1.0"))
            attach, sock = await broker.attaches.receive()
            sock.close()
        assert attach.session_id == session_id
        assert broker.on_standby == [True, False]


async def test_a_spare_the_broker_times_out_is_redialled_with_a_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker whose standby lifetime (40 s) is under the starter's spare_refresh (100 s)
    closes each spare first: the starter says its setting may be wrong and dials a new one."""
    state = new_state_dir()
    config = starter_config(spare_attach=1, spare_refresh=100.0)
    async with running_starter(state, config) as (_starter, broker):
        broker.standby_lifetime = 40.0
        await broker.next(wire.StarterSync)
        with trio.fail_after(100):
            while broker.standbys < 3:
                await trio.sleep(1)
    warned = [r for r in caplog.records if "spare_refresh (100 s)" in r.getMessage()]
    assert len(warned) >= 2
    assert "after 40 s" in warned[0].getMessage()


async def test_spare_attach_0_keeps_no_spare(users: dict[str, User]) -> None:
    """With spare_attach 0 the starter opens no standby: each session dials its own."""
    state = new_state_dir()
    async with running_starter(state, starter_config(spare_attach=0)) as (starter, broker):
        with trio.fail_after(20):
            await broker.next(wire.StarterSync)
            await broker.send(_run(users["a"], "1.0"))
            await broker.next_report("1.0", running=True)
            await broker.send(wire.OpenSession(session_id=secrets.token_hex(16), job="1.0"))
            _attach, sock = await broker.attaches.receive()
            sock.close()
        assert (broker.standbys, broker.on_standby, starter.spares.ready) == (0, [False], 0)


async def test_take_skips_a_spare_the_broker_has_closed() -> None:
    """take() never hands out a spare whose broker end has hung up (or sent an error): it
    closes it and gives the next live one, or None."""
    ctx = ssl.create_default_context()
    spares = Spares(SimpleNamespace(config=starter_config()))  # type: ignore[arg-type]
    ends = []
    for _ in range(2):
        ours, theirs = trio.socket.socketpair()
        ends.append(theirs)
        tls = trio.SSLStream(trio.SocketStream(ours), ctx, server_hostname="x")
        conn = wire.Connection(wire.Channel.ATTACH, wire.Role.STARTER, wire.Role.BROKER)
        spares._ready.append(Spare(tls, conn))
    live, dead = spares._ready
    ends[1].close()
    assert spares.take() is live
    assert dead.sock.fileno() == -1
    assert spares.take() is None
    live.close()
    ends[0].close()


# ---------------------------------------------------------------------------- a real pool

HOW = re.compile(r"session [0-9a-f]{8}: host key, (dial, TLS|spare)")
DIAL_LINE = "host key, dial, TLS and attach"
SPARE_LINE = "host key, spare and attach"


def _session(pool: Any, user: User, job: str) -> None:
    r = pool.ssh(user, job, "true")
    assert r.returncode == 0, r.stderr + pool.log_text()


def test_real_sessions_use_spares_across_a_broker_restart(
    make_pool: Any, users: dict[str, User]
) -> None:
    """In a real pool every session attaches on a spare (the starter's debug log says so),
    each replaced for the next; after the broker is killed and restarted, the spares it
    closed fail no session and new ones are made."""
    a = users["a"]
    pool = make_pool(debug=True)
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        _session(pool, a, job)
        _session(pool, a, job)
        text = pool.log.read_text()
        assert text.count(SPARE_LINE) == 2
        assert DIAL_LINE not in text
        (broker_pid,) = pool.pids("broker")
        os.kill(broker_pid, signal.SIGKILL)
        wait_for("a new broker", lambda: pool.pids("broker") not in ([], [broker_pid]))
        pool.wait_for_starter()
        _session(pool, a, job)
        _session(pool, a, job)
        ways = HOW.findall(pool.log.read_text())
        assert len(ways) == 4
        assert ways[-1] == "spare"
    finally:
        pool.stj(a, "rm", job)


def test_real_sessions_dial_with_spare_attach_0(make_pool: Any, users: dict[str, User]) -> None:
    """With [starter] spare_attach = 0 a real pool's sessions dial their own connection."""
    a = users["a"]
    pool = make_pool("[starter]\nspare_attach = 0\n", debug=True)
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        _session(pool, a, job)
        text = pool.log.read_text()
        assert DIAL_LINE in text
        assert SPARE_LINE not in text
    finally:
        pool.stj(a, "rm", job)
