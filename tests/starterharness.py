"""A tiny broker end for running a real ``Starter`` inside pytest-trio.

It listens on 127.0.0.1 (TLS 1.3 with its own pool CA in ``<state>/pki``, as a real broker does
for starters; the starter under test issues its certificate from that CA as in a personal
pool), welcomes the starter, answers pings, records every message the starter sends with the trio
time it arrived, and hands session-attach sockets to the test. No part of the starter is
mocked: the starter under test dials this over real sockets and runs real processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from ssh_to_job import common, transport, wire
from ssh_to_job.starter import Starter, _procs
from ssh_to_job.transport import FramedStream, PeerGone

#: A trio deadline that only a hang reaches: under the autojump clock, virtual time races ahead
#: while a real process (a job, sshd) takes its real time, so short virtual deadlines around
#: real work would fire early. Real hangs are caught by the watchdog in running_starter.
FAR = 1e7
REAL_LIMIT = 120.0


@attrs.define
class Got:
    at: float
    msg: wire.Message


class TinyBroker:
    def __init__(self, state: pathlib.Path) -> None:
        self.state = state
        self.key = wire.new_signing_key()
        self.pki = common.BrokerPki.open(state / "pki")
        #: trio times at which a starter connection arrived.
        self.attempts: list[float] = []
        #: Connections to drop before the handshake (counts down), or after it (flag).
        self.refuse = 0
        self.close_after_sync = False
        self.pong = True
        #: Spare attach connections (attach_standby) received, and how long each may wait.
        self.standbys = 0
        self.standby_lifetime = 300.0
        #: For each session_attach received: whether it came on a spare (standby) connection.
        self.on_standby: list[bool] = []
        #: Close a spare when its session_attach arrives, without an answer.
        self.drop_standby_attach = False
        self.stream: FramedStream | None = None
        self._msgs_send, self.msgs = trio.open_memory_channel[Got](1000)
        self._attach_send, self.attaches = trio.open_memory_channel[
            tuple[wire.SessionAttach, trio.socket.SocketType]
        ](10)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = transport.server_context(self.pki.cert_file, self.pki.key_file, self.pki.ca_file)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(
                    transport.serve_tls,
                    self._handle,
                    0,
                    ctx,
                    host="127.0.0.1",
                    pool_id=self.pki.pool_id,
                    roles={wire.ROLE_STARTER},
                )
            )
            port = listeners[0].socket.getsockname()[1]
            (self.state / "broker.addr").write_text(f"127.0.0.1:{port}\n")
            task_status.started()

    async def _handle(self, stream: trio.SSLStream[Any], _ident: object) -> None:
        with contextlib.suppress(
            PeerGone, trio.TooSlowError, wire.ProtocolError, OSError, trio.BrokenResourceError
        ):
            await self._serve_one(stream)
        await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.SSLStream[Any]) -> None:
        decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME)
        with trio.fail_after(10):
            while not isinstance(payload := decoder.next_frame(), bytes):
                if payload is wire.CLOSED:
                    return
                decoder.receive_data(bytes(await stream.receive_some(65536)))
        first = wire.decode_message(payload)
        if isinstance(first, wire.AttachStandby):
            # A spare attach connection (starter/_spare.py): its session_attach comes later.
            self.standbys += 1
            with trio.fail_after(self.standby_lifetime):
                while not isinstance(payload := decoder.next_frame(), bytes):
                    if payload is wire.CLOSED:
                        return
                    decoder.receive_data(bytes(await stream.receive_some(65536)))
            first = wire.decode_message(payload)
            self.on_standby.append(True)
            if self.drop_standby_attach:
                return  # as a broker that had just closed this spare
        elif isinstance(first, wire.SessionAttach):
            self.on_standby.append(False)
        if isinstance(first, wire.SessionAttach):
            # Out of TLS, as the real broker does; the test owns the bare socket from here (it
            # plays the client). serve_tls closes the stream afterwards: hand on a duplicate.
            await stream.send_all(wire.encode_frame(wire.encode_message(wire.SessionCert())))
            raw, _extra = await stream.unwrap()
            assert isinstance(raw, trio.SocketStream)
            dup = socket.socket(fileno=os.dup(raw.socket.fileno()))
            await self._attach_send.send((first, trio.socket.from_stdlib_socket(dup)))
            return
        self.attempts.append(trio.current_time())
        if self.refuse > 0:
            self.refuse -= 1
            return
        conn = wire.Connection(wire.Channel.STARTER, wire.Role.BROKER, wire.Role.STARTER)
        fs = FramedStream(stream, conn)
        conn.receive_data(wire.encode_frame(payload) + decoder.buffered)
        try:
            hello = await fs.receive(within=10)
            assert isinstance(hello, wire.StarterHello), hello
            await fs.send(wire.Welcome(broker_key=wire.public_key_of(self.key)))
            self.stream = fs
            while True:
                msg = await fs.receive()
                await self._msgs_send.send(Got(trio.current_time(), msg))
                if isinstance(msg, wire.StarterSync) and self.close_after_sync:
                    return
                if isinstance(msg, wire.Ping) and self.pong:
                    await fs.send(wire.Ping())
                if isinstance(msg, wire.JobUpdate):
                    await fs.send(wire.Ack(ids=(msg.report.id,)))
                if isinstance(msg, wire.CertRenew):
                    key = common.parse_public_key(msg.public_key)
                    cert = self.pki.issue(wire.ROLE_STARTER, hello.starter_id, key)
                    await fs.send(wire.CertRenewed(certificate=common.cert_pem(cert).decode()))
        finally:
            if self.stream is fs:
                self.stream = None
            await fs.aclose()

    async def send(self, msg: wire.Message) -> None:
        assert self.stream is not None, "no starter connected"
        await self.stream.send(msg)

    async def next(self, kind: type[Any], within: float = FAR) -> Got:
        """The next message of type ``kind`` (others are skipped)."""
        with trio.fail_after(within):
            async for got in self.msgs:
                if isinstance(got.msg, kind):
                    return got
        raise AssertionError("message channel closed")

    async def next_report(self, job_id: str, *, running: bool, within: float = FAR) -> Got:
        """The next report of ``job_id`` in the given state (from job_update or starter_sync)."""
        with trio.fail_after(within):
            async for got in self.msgs:
                reports: tuple[wire.JobReport, ...] = ()
                if isinstance(got.msg, wire.JobUpdate):
                    reports = (got.msg.report,)
                elif isinstance(got.msg, wire.StarterSync):
                    reports = got.msg.jobs
                for r in reports:
                    if r.id == job_id and r.running == running:
                        return got
        raise AssertionError("message channel closed")

    def capability(self, starter: Starter, session_id: str, job_id: str, uid: int) -> bytes:
        now = int(time.time())
        cap = wire.Capability(
            session_id=session_id,
            job=job_id,
            owner_uid=uid,
            requester_uid=uid,
            client_key=wire.ed25519_keypair()[1],
            starter_id=starter.name,
            starter_key=starter.public_key,
            issued_at=now,
            expires_at=now + 30,
        )
        return wire.sign_capability(cap, self.key)


def starter_config(**changes: Any) -> common.PoolConfig:
    # No spare attach connections unless a test asks: on the autojump clock a spare's refresh
    # deadline is always the next one, and virtual time would redial it over and over.
    changes.setdefault("spare_attach", 0)
    starter = attrs.evolve(common.StarterConfig(name="inproc", use_shim=False), **changes)
    return common.PoolConfig(starter=starter)


@contextlib.asynccontextmanager
async def running_starter(
    state: pathlib.Path, config: common.PoolConfig
) -> AsyncIterator[tuple[Starter, TinyBroker]]:
    """A TinyBroker and a real Starter on ``state``; both end (jobs killed) on exit."""
    broker = TinyBroker(state)
    starter = Starter(state, config)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            await nursery.start(starter.serve)
            nursery.start_soon(_watchdog, REAL_LIMIT)
            yield starter, broker
            nursery.cancel_scope.cancel()
    finally:
        base = starter.cgroup_base
        if base is not None:
            # On the autojump clock the starter's bounded wait for dying processes may end
            # before they do (virtual time races ahead); finish the clean-up in real time.
            for cg in base.glob("job-*"):
                _procs.kill_cgroup(cg)
                deadline = time.monotonic() + 10
                while _procs.cgroup_pids(cg) and time.monotonic() < deadline:
                    time.sleep(0.02)
                _procs.remove_cgroup_tree(cg)
            with contextlib.suppress(OSError):
                base.rmdir()
        shutil.rmtree(state, ignore_errors=True)


async def real_wait(what: str, probe: Any, timeout: float = 20) -> None:
    """Wait in real time (in a thread, so any trio clock may be frozen) until ``probe()``."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.to_thread.run_sync(time.sleep, 0.02)


async def _watchdog(seconds: float) -> None:
    """Fail a test that takes more than ``seconds`` of real time, whatever its trio clock does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await trio.to_thread.run_sync(time.sleep, 0.2)
    raise AssertionError(f"in-process starter test still running after {seconds:g} s")
