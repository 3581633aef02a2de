"""The starter's timeouts and failure paths, run in-process on trio's mock clock.

A real ``Starter`` runs inside pytest-trio against a tiny broker end (tests/starterharness.py)
over real loopback sockets; jobs and sshd are real processes. Timeouts are checked on trio's
clock: the autojump clock where nothing real is in flight, and a frozen ``MockClock`` advanced
by hand where a real process must first reach a state (then time moves only when we say).
"""

from __future__ import annotations

import secrets
import shutil

import pytest
import trio
import trio.testing
from conftest import User, new_state_dir
from starterharness import FAR, real_wait, running_starter, starter_config

from ssh_to_job import wire
from ssh_to_job.starter._daemon import PING_INTERVAL, SILENCE

pytestmark = pytest.mark.usefixtures("users")


def _run(user: User, job_id: str, *argv: str, **spec: object) -> wire.RunJob:
    return wire.RunJob(
        job=wire.JobRun(
            id=job_id,
            uid=user.uid,
            gid=user.gid,
            owner=user.name or str(user.uid),
            spec=wire.JobSpec(executable=argv[0], args=tuple(argv[1:]), **spec),  # type: ignore[arg-type]
        )
    )


async def _advance(clock: trio.testing.MockClock, seconds: float, step: float = 5) -> None:
    """Move the frozen clock forward in steps, letting the starter and broker act (pings) at
    each, as they would if time passed smoothly."""
    while seconds > 0:
        clock.jump(min(step, seconds))
        seconds -= step
        await trio.testing.wait_all_tasks_blocked()


async def test_reconnect_backoff_doubles_then_resets_after_a_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Refused connections are retried after 0.1, 0.2, 0.4 s... up to reconnect_max; after a
    connection that got through the handshake the next retry waits the minimum again."""
    state = new_state_dir()
    async with running_starter(state, starter_config(reconnect_max=0.5)) as (_starter, broker):
        # Six connections dropped before the handshake, then every one gets through it (and
        # is dropped by the broker right after the starter's sync).
        broker.refuse = 6
        broker.close_after_sync = True
        with trio.fail_after(30):
            while len(broker.attempts) < 10:
                await trio.sleep(0.01)
        gaps = [b - a for a, b in zip(broker.attempts, broker.attempts[1:], strict=False)]
        expected = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1]
        assert gaps[:9] == pytest.approx(expected, abs=0.011)


async def test_capability_must_arrive_within_session_timeout(
    autojump_clock: trio.abc.Clock, users: dict[str, User]
) -> None:
    """A new session socket on which no capability arrives is closed after session_timeout."""
    state = new_state_dir()
    config = starter_config(session_timeout=7.0)
    async with running_starter(state, config) as (starter, broker):
        await broker.next(wire.StarterSync)
        await broker.send(_run(users["a"], "1.0", "/bin/sleep", "1000"))
        await broker.next_report("1.0", running=True)
        await broker.send(wire.OpenSession(session_id=secrets.token_hex(16), job="1.0"))
        _attach, sock = await broker.attaches.receive()
        opened = trio.current_time()
        with sock, trio.fail_after(FAR):
            assert await sock.recv(100) == b""  # the starter hung up
        assert trio.current_time() - opened == pytest.approx(7.0, abs=0.05)
        assert starter.jobs["1.0"].sessions == {}


async def test_debug_hold_expires_after_debug_hold_time(
    autojump_clock: trio.abc.Clock, users: dict[str, User]
) -> None:
    """A failed job kept for debugging is ended, with that reason, debug_hold_time after its
    hold began, not before."""
    state = new_state_dir()
    config = starter_config(debug_hold_time=500.0)
    async with running_starter(state, config) as (_starter, broker):
        await broker.next(wire.StarterSync)
        await broker.send(_run(users["a"], "2.0", "/bin/sh", "-c", "exit 3", hold_on_failure=True))
        with trio.fail_after(FAR):
            while True:
                held = await broker.next_report("2.0", running=True)
                assert isinstance(held.msg, wire.JobUpdate)
                if held.msg.report.debug_hold:
                    break
        assert held.msg.report.exit_code == 3
        assert held.msg.report.debug_until > 0
        done = await broker.next_report(
            "2.0",
            running=False,
        )
        assert isinstance(done.msg, wire.JobUpdate)
        assert done.msg.report.reason == (
            "debug hold expired after 8m (the job failed with exit status 3); its files are gone"
        )
        assert done.msg.report.exit_code == 3
        assert done.at - held.at == pytest.approx(500.0, abs=0.5)


async def test_sessions_keep_a_job_until_session_grace(
    mock_clock: trio.testing.MockClock, users: dict[str, User]
) -> None:
    """After the job's main process exits, an open session keeps the job for session_grace
    seconds (by trio's clock); then the job and its session are ended."""
    state = new_state_dir()
    go = state / "go"
    config = starter_config(session_grace=100.0)
    a = users["a"]
    script = f"while [ ! -e {go} ]; do sleep 0.02; done"
    async with running_starter(state, config) as (starter, broker):
        await broker.next(wire.StarterSync)
        await broker.send(_run(a, "3.0", "/bin/sh", "-c", script))
        await broker.next_report("3.0", running=True)
        job = starter.jobs["3.0"]
        session_id = secrets.token_hex(16)
        await broker.send(wire.OpenSession(session_id=session_id, job="3.0"))
        _attach, sock = await broker.attaches.receive()
        client = wire.Connection(wire.Channel.SESSION, wire.Role.CLIENT, wire.Role.STARTER)
        cap = broker.capability(starter, session_id, "3.0", a.uid)
        await sock.send(client.send(wire.SessionOpen(capability=cap)))
        await real_wait("the session's sshd", lambda: job.sessions)
        sshd = next(iter(job.sessions.values()))
        go.touch()
        await real_wait("the job's main exit", lambda: job.main_exited)
        await _advance(mock_clock, 99)
        assert "3.0" in starter.jobs
        assert sshd.returncode is None
        mock_clock.autojump_threshold = 0  # real processes end from here on
        done = await broker.next_report(
            "3.0",
            running=False,
        )
        assert isinstance(done.msg, wire.JobUpdate)
        assert done.msg.report.exit_code == 0
        await real_wait("sshd's end", lambda: sshd.returncode is not None)
        sock.close()


@pytest.mark.parametrize(
    ("argv", "env", "why"),
    [
        (("/bin/echo", "a\0b"), {}, "an argument contains a NUL byte"),
        (("/bin/true",), {"A=B": "1"}, "bad environment variable name 'A=B'"),
        (("/nonexistent/prog",), {}, "/nonexistent/prog: [Errno 2] No such file or directory"),
    ],
)
async def test_a_job_that_cannot_start_is_reported_and_leaves_nothing(
    autojump_clock: trio.abc.Clock,
    users: dict[str, User],
    argv: tuple[str, ...],
    env: dict[str, str],
    why: str,
) -> None:
    """A job that cannot be started is reported "could not start: <reason>" (so the broker
    holds it and frees its slot), and its scratch dir and cgroup are gone."""
    state = new_state_dir()
    async with running_starter(state, starter_config()) as (starter, broker):
        await broker.next(wire.StarterSync)
        await broker.send(_run(users["a"], "4.0", *argv, env=env))
        got = await broker.next_report("4.0", running=False)
        assert isinstance(got.msg, wire.JobUpdate)
        assert got.msg.report.reason == f"could not start: {why}"
        assert "4.0" not in starter.jobs
        assert not (starter.execute_dir / "job_4_0").exists()
        if starter.cgroup_base is not None:
            assert not (starter.cgroup_base / "job-4.0").exists()
        # The starter stays usable: the next job runs.
        await broker.send(_run(users["a"], "5.0", "/bin/true"))
        done = await broker.next_report("5.0", running=False)
        assert isinstance(done.msg, wire.JobUpdate)
        assert done.msg.report.exit_code == 0


async def test_a_channel_kept_alive_by_pings_stays_up_and_a_silent_one_is_redialed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The starter pings every PING_INTERVAL; while the broker answers, one connection lasts
    (here 1000 s); once the broker falls silent, the starter redials after SILENCE."""
    state = new_state_dir()
    async with running_starter(state, starter_config()) as (_starter, broker):
        first = await broker.next(wire.StarterSync)
        pings = 0
        with trio.move_on_after(1000):
            while True:
                await broker.next(wire.Ping)
                pings += 1
        assert len(broker.attempts) == 1
        assert pings == pytest.approx(1000 / PING_INTERVAL, abs=1)
        broker.pong = False
        quiet = trio.current_time()
        again = await broker.next(wire.StarterSync)
        assert len(broker.attempts) == 2
        # The last pong came at most one interval before the broker fell silent.
        assert SILENCE - PING_INTERVAL <= again.at - quiet <= SILENCE + 1
        assert first.at < quiet


def test_personal_starter_issues_its_certificate_and_follows_a_rename() -> None:
    """Next to its broker's CA (a personal pool) a starter issues its own certificate, and a
    new certificate when its name changes; without a CA or an enrolment it refuses to start,
    saying how to join."""
    from ssh_to_job import common
    from ssh_to_job.starter import Starter

    state = new_state_dir()
    try:
        common.BrokerPki.open(state / "pki")
        first = Starter(state, starter_config())
        first._load_pki()
        assert first.name == "inproc"
        renamed = Starter(state, starter_config(name="renamed"))
        renamed._load_pki()
        assert renamed.name == "renamed"
        issued = common.BrokerPki.open(state / "pki").issued()
        assert [(c.role, c.name) for c in issued][-2:] == [
            ("starter", "inproc"),
            ("starter", "renamed"),
        ]
        lone = new_state_dir()
        try:
            with pytest.raises(SystemExit, match="stj starter --join BROKER:PORT --token"):
                Starter(lone, starter_config())._load_pki()
        finally:
            shutil.rmtree(lone, ignore_errors=True)
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def test_starter_renews_its_certificate_past_two_thirds_of_its_life(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A starter whose certificate has less than a third of its life left asks for a new one
    on connecting, checks it and stores it (with its new key) for its next connections."""
    import datetime

    from ssh_to_job import common

    state = new_state_dir()
    pki = common.BrokerPki.open(state / "pki")
    old_key = common.new_private_key()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=80)
    old = pki.issue(wire.ROLE_STARTER, "inproc", old_key.public_key(), now=long_ago)
    common.write_leaf(state / "pki", common.STARTER_KEY, common.STARTER_CERT, old_key, old)
    assert common.needs_renewal(old)
    async with running_starter(state, starter_config()) as (_starter, broker):
        await broker.next(wire.CertRenew)

        def renewed() -> bool:
            cert = common.load_cert(state / "pki" / common.STARTER_CERT)
            return cert.serial_number != old.serial_number

        await real_wait("the renewed certificate", renewed)
        new = common.load_cert(state / "pki" / common.STARTER_CERT)
        assert not common.needs_renewal(new)
        assert common.StarterPki.load(state / "pki").name == "inproc"
        assert common.public_key_pem(
            common.load_private_key(state / "pki" / common.STARTER_KEY).public_key()
        ) != common.public_key_pem(old_key.public_key())
