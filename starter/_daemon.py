"""The starter daemon: dials out to the broker, runs jobs as their owners, serves sessions.

It opens no port. Its one control connection to the broker is authenticated both ways (it
knows the broker's public key; the broker has the starter's in its trusted set). Jobs live in
the starter's own nursery, not the connection's: when the broker goes away, jobs keep running,
the starter redials with backoff, and reports what happened meanwhile (exit codes included)
until the broker acknowledges each report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ssh_to_job import common, preload, wire
from ssh_to_job.transport import FramedStream, PeerGone, set_nodelay

from . import _procs
from ._session import run_session

log = logging.getLogger("stj.starter")

PING_INTERVAL = 15.0
TAIL = 65536


def _tail(path: pathlib.Path, n: int = TAIL) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read()
    except OSError:
        return b""


def _traversable(path: pathlib.Path) -> str | None:
    """Why other uids cannot reach ``path``, or None if they can."""
    for p in [path, *path.parents]:
        try:
            mode = p.stat().st_mode
        except OSError:
            return f"{p} does not exist"
        if not mode & 0o001:
            return f"{p} is not searchable by other users (mode {oct(mode & 0o777)})"
    return None


class Job:
    def __init__(self, starter: Starter, run: wire.JobRun) -> None:
        self.starter = starter
        self.run = run
        self.id = run.id
        self.pid = 0
        self.scratch = ""
        self.env: dict[str, str] = {}
        self.groups: list[int] = [run.gid]
        self.group = _procs.JobGroup(None)
        self.started = 0.0
        self.sessions: dict[str, trio.Process] = {}
        self.main_exited = False
        self.killed = ""
        self.suspended = False
        self.done = trio.Event()
        self.killed_event = trio.Event()
        self.debug_hold = False
        self.hold_reason = ""
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.sessions_changed = trio.Event()
        spool = starter.spool_dir
        self.stdout_path = spool / f"{run.id}.stdout"
        self.stderr_path = spool / f"{run.id}.stderr"

    def accepts_sessions(self) -> bool:
        alive = not self.main_exited or self.debug_hold
        return self.pid != 0 and alive and not self.killed and not self.suspended

    def report(self) -> wire.JobReport:
        return wire.JobReport(
            id=self.id,
            running=True,
            pid=self.pid,
            scratch=self.scratch,
            started=self.started,
            debug_hold=self.debug_hold,
            reason=self.hold_reason,
            exit_code=self.exit_code,
            exit_signal=self.exit_signal,
        )

    def kill(self, reason: str) -> None:
        self.killed = reason
        self.group.kill()
        self.killed_event.set()

    def report_sessions(self) -> None:
        self.sessions_changed.set()
        self.sessions_changed = trio.Event()
        self.starter.post(wire.JobUpdate(report=self.report(), sessions=len(self.sessions)))


class Starter:
    def __init__(
        self, state_dir: pathlib.Path, config: common.PoolConfig, debug: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.config = config
        self.debug = debug
        cfg = config.starter
        self.name = cfg.name or socket.gethostname()
        self.identity = common.load_or_create_key(state_dir / "keys" / "starter.key")
        self.public_key = wire.public_key_of(self.identity)
        self.execute_dir = pathlib.Path(cfg.execute_dir or state_dir / "execute")
        self.spool_dir = state_dir / "spool"
        self.sessions_dir = self.execute_dir / ".sessions"
        self.replay = wire.ReplayCache()
        self.jobs: dict[str, Job] = {}
        self.unacked: dict[str, wire.JobReport] = {}
        self._outbox: trio.MemorySendChannel[wire.Message] | None = None
        self.stopping = False
        self.shim = preload.check_shim() if cfg.use_shim else None
        self.cgroup_base: pathlib.Path | None = None
        self.broker_addr = ("", 0)
        self.broker_key = b""

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        cfg = self.config.starter
        for d, mode in ((self.execute_dir, 0o755), (self.sessions_dir, 0o711)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        common.private_dir(self.spool_dir)
        if " " in str(self.sessions_dir) or '"' in str(self.sessions_dir):
            raise SystemExit(
                f"starter: execute_dir {self.execute_dir} must not contain spaces "
                "or quotes (sshd config paths)"
            )
        if os.getuid() == 0:
            why = _traversable(self.sessions_dir)
            if why:
                raise SystemExit(
                    f"starter: job users cannot reach {self.sessions_dir}: {why}; "
                    "set [starter] execute_dir to a path they can traverse"
                )
            pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if not os.access(cfg.sshd, os.X_OK):
            raise SystemExit(f"starter: {cfg.sshd} not found; install openssh-server")
        if cfg.use_cgroups and os.getuid() == 0:
            root = _procs.find_cgroup_root()
            if root is not None:
                # One base per starter identity, not per name: every personal pool on a host
                # has the host's name, and a starter kills the leftovers in its base at start.
                self.cgroup_base = root / f"ssh-to-job-{self.public_key.hex()[:16]}"
                self.cgroup_base.mkdir(exist_ok=True)
                self._kill_leftovers()
        self.broker_addr = self._broker_address()
        self.broker_key = self._broker_key()

    def _kill_leftovers(self) -> None:
        assert self.cgroup_base is not None
        for cg in self.cgroup_base.glob("job-*"):
            log.warning("killing processes left in %s by an earlier starter", cg)
            group = _procs.JobGroup(cg)
            group.kill()
            for _ in range(50):
                if not group.all_pids():
                    break
                time.sleep(0.02)
            group.remove()

    def _broker_address(self) -> tuple[str, int]:
        text = self.config.starter.broker
        if not text:
            try:
                text = (self.state_dir / "broker.addr").read_text().strip()
            except OSError:
                raise SystemExit(
                    "starter: no broker address: set [starter] broker or run "
                    "next to a broker's state directory"
                ) from None
        host, _, port = text.rpartition(":")
        return host, int(port)

    def _broker_key(self) -> bytes:
        if self.config.starter.broker_key:
            return bytes.fromhex(self.config.starter.broker_key)
        return common.read_public_key(self.state_dir / "broker.pub")

    def audit(self, what: str, job: str, detail: str) -> None:
        log.info("audit: %s job=%s %s", what, job, detail)

    def post(self, msg: wire.Message) -> None:
        if self._outbox is not None and not self.stopping:
            try:
                self._outbox.send_nowait(msg)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    # ------------------------------------------------------------------ main loop

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.prepare()
        delay = 0.1
        async with trio.open_nursery() as jobs_nursery:
            self.jobs_nursery = jobs_nursery
            jobs_nursery.start_soon(self._stop_on_signal, jobs_nursery.cancel_scope)
            task_status.started()
            while True:
                # except*: the connection's reader runs in a nursery body, which wraps what it
                # raises; a broker going away must never take the starter (and its jobs) along.
                try:
                    await self._connect_once()
                    delay = 0.1
                except* (OSError, PeerGone, trio.TooSlowError, wire.ProtocolError) as group:
                    log.info(
                        "broker connection: %s; retrying in %.1f s", group.exceptions[0], delay
                    )
                except* _Refused as group:
                    log.error("broker refused this starter: %s", group.exceptions[0])
                except* Exception:
                    log.exception("internal error on the broker connection; reconnecting")
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.starter.reconnect_max)

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        """SIGTERM/SIGINT: end every job as a whole, then stop; no job outlives its starter."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        log.info("starter stopping: ending %d job(s)", len(self.jobs))
        # No final reports: the broker puts these jobs back to idle when the starter returns.
        self.stopping = True
        terminate_all(self)
        with trio.move_on_after(10):
            for job in list(self.jobs.values()):
                await job.done.wait()
        if self.cgroup_base is not None:
            with contextlib.suppress(OSError):
                self.cgroup_base.rmdir()
        scope.cancel()

    async def _connect_once(self) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        set_nodelay(sock)
        if not self.config.starter.broker:
            # A restarted personal broker may listen on a new port: follow broker.addr.
            try:
                host, _, port = (self.state_dir / "broker.addr").read_text().strip().rpartition(":")
                self.broker_addr = (host, int(port))
            except (OSError, ValueError) as exc:
                log.info("cannot read broker.addr (%s); trying the last address", exc)
        with trio.fail_after(10):
            await sock.connect(self.broker_addr)
        stream = FramedStream(
            trio.SocketStream(sock),
            wire.Connection(wire.Channel.STARTER, wire.Role.STARTER, wire.Role.BROKER),
        )
        try:
            await self._handshake(stream)
            send, recv = trio.open_memory_channel[wire.Message](math.inf)
            reports = [j.report() for j in self.jobs.values() if j.pid]
            reports += list(self.unacked.values())
            await stream.send(wire.StarterSync(jobs=tuple(reports)))
            self._outbox = send
            log.info("connected to broker %s:%d as %s", *self.broker_addr, self.name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, recv)
                nursery.start_soon(self._pinger)
                while True:
                    msg = await stream.receive(within=PING_INTERVAL * 4)
                    self._dispatch(msg)
        finally:
            self._outbox = None
            await stream.aclose()

    async def _handshake(self, stream: FramedStream) -> None:
        hs = wire.StarterHandshake(
            self.name, self.identity, self.broker_key, self.config.starter.slots
        )
        try:
            await stream.send(hs.hello())
            await stream.send(hs.on_broker_hello(await stream.receive(within=10)))
            keys = hs.on_welcome(await stream.receive(within=10))
        except wire.HandshakeError as exc:
            raise _Refused(exc.message) from None
        stream.conn.start_encryption(send_key=keys.send, receive_key=keys.receive)

    async def _writer(
        self, stream: FramedStream, recv: trio.MemoryReceiveChannel[wire.Message]
    ) -> None:
        async for msg in recv:
            await stream.send(msg)

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            self.post(wire.Ping())

    def _dispatch(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.RunJob):
            if msg.job.id in self.jobs:
                return
            job = Job(self, msg.job)
            self.jobs[job.id] = job
            self.jobs_nursery.start_soon(self._guard, self._run_job, job)
        elif isinstance(msg, wire.SignalJob):
            target = self.jobs.get(msg.id)
            if target is not None:
                self._signal(target, msg.action, msg.reason)
        elif isinstance(msg, wire.OpenSession):
            target = self.jobs.get(msg.job)
            if target is None or not target.accepts_sessions():
                self.post(
                    wire.SessionFailed(
                        session_id=msg.session_id,
                        message=f"job {msg.job} is not running on this starter",
                    )
                )
                return
            self.jobs_nursery.start_soon(
                self._guard, run_session, self, target, msg.session_id, msg.nonce
            )
        elif isinstance(msg, wire.FetchOutput):
            target = self.jobs.get(msg.id)
            path = (
                None
                if target is None
                else (target.stdout_path if msg.stream == "stdout" else target.stderr_path)
            )
            data = _tail(path, msg.max_bytes) if path is not None else b""
            self.post(wire.OutputData(request=msg.request, data=data, found=target is not None))
        elif isinstance(msg, wire.Ack):
            for jid in msg.ids:
                if self.unacked.pop(jid, None) is not None:
                    for p in (self.spool_dir / f"{jid}.stdout", self.spool_dir / f"{jid}.stderr"):
                        p.unlink(missing_ok=True)

    def _signal(self, job: Job, action: str, reason: str) -> None:
        log.info("job %s: %s (%s)", job.id, action, reason)
        if action in ("kill", "evict"):
            job.kill(reason or action)
        elif action == "suspend":
            job.suspended = True
            job.group.freeze(True)
        elif action == "continue":
            job.suspended = False
            job.group.freeze(False)

    # ------------------------------------------------------------------ jobs

    def _job_env(self, job: Job) -> dict[str, str]:
        run = job.run
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        try:
            pw = pwd.getpwuid(run.uid)
            env.update(USER=pw.pw_name, LOGNAME=pw.pw_name)
            if os.path.isdir(pw.pw_dir):
                env["HOME"] = pw.pw_dir
        except KeyError:
            pass
        env.setdefault("HOME", job.scratch)
        env.update(run.spec.env)
        env.update(
            {
                "SSH_TO_JOB_ID": run.id,
                "SSH_TO_JOB_SCRATCH_DIR": job.scratch,
                "SSH_TO_JOB_IWD": run.spec.initialdir,
                "SSH_TO_JOB_STARTER": self.name,
            }
        )
        return env

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """A bug in one job's or session's task must not take the starter down."""
        try:
            await fn(*args)
        except Exception:
            log.exception("internal error in %s", getattr(fn, "__name__", fn))

    async def _run_job(self, job: Job) -> None:
        run = job.run
        exit_code: int | None = None
        exit_signal: int | None = None
        reason = ""
        scratch = self.execute_dir / f"job_{run.id.replace('.', '_')}"
        try:
            if run.uid == 0:
                raise PermissionError("jobs never run as root")
            try:
                job.groups = os.getgrouplist(pwd.getpwuid(run.uid).pw_name, run.gid)
            except KeyError:
                job.groups = [run.gid]
            shutil.rmtree(scratch, ignore_errors=True)
            common.private_dir(scratch, run.uid, run.gid)
            job.scratch = str(scratch)
            job.env = self._job_env(job)
            cg = self.cgroup_base / f"job-{run.id}" if self.cgroup_base is not None else None
            job.group = _procs.JobGroup(cg)
            out = os.open(job.stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(job.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                proc = await trio.lowlevel.open_process(
                    [run.spec.executable, *run.spec.args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=job.env,
                    cwd=str(scratch),
                    preexec_fn=_procs.make_preexec(run.uid, run.gid, job.groups, cg),
                )
            finally:
                os.close(out)
                os.close(err)
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"could not start {run.spec.executable}: {exc}"
            log.warning("job %s: %s", job.id, reason)
            self._finish(job, None, None, reason)
            shutil.rmtree(scratch, ignore_errors=True)
            return
        job.pid = proc.pid
        job.group.leaders.append(proc.pid)
        job.started = time.time()
        log.info("job %s started as pid %d (uid %d)", job.id, proc.pid, run.uid)
        self.post(wire.JobUpdate(report=job.report(), sessions=0))
        try:
            rc = await proc.wait()
            job.main_exited = True
            job.group.release(proc.pid)  # reaped: without cgroups its pid may be reused
            if rc < 0:
                exit_signal = -rc
            else:
                exit_code = rc
            job.exit_code, job.exit_signal = exit_code, exit_signal
            if rc != 0 and not job.killed and run.spec.hold_on_failure:
                await self._debug_hold(job)
            # HTCondor semantics: open sessions keep the job alive until they close.
            with trio.move_on_after(self.config.starter.session_grace):
                while job.sessions and not job.killed:
                    await job.sessions_changed.wait()
            reason = job.killed
        finally:
            with trio.CancelScope(shield=True):
                job.group.kill()
                for _ in range(100):
                    if not job.group.all_pids() and not job.sessions:
                        break
                    await trio.sleep(0.02)
                job.group.remove()
                shutil.rmtree(scratch, ignore_errors=True)
                self._finish(job, exit_code, exit_signal, reason)

    async def _debug_hold(self, job: Job) -> None:
        """Keep a failed job (its leftover processes, scratch dir, environment) for debugging.

        The broker shows it as held and lets its owner ssh in; it ends with ``stj rm``,
        ``stj release`` (the job then runs again) or after ``debug_hold_time``.
        """
        what = (
            f"exit status {job.exit_code}"
            if job.exit_code is not None
            else f"signal {job.exit_signal}"
        )
        job.debug_hold = True
        job.hold_reason = (
            f"debug hold: the job failed with {what}; ssh-to-job {job.id} to "
            "look, then stj rm or stj release"
        )
        log.info("job %s: %s", job.id, job.hold_reason)
        self.post(wire.JobUpdate(report=job.report(), sessions=len(job.sessions)))
        with trio.move_on_after(self.config.starter.debug_hold_time):
            await job.killed_event.wait()
        if not job.killed:
            job.kill("debug hold expired")
        job.debug_hold = False

    def _finish(self, job: Job, code: int | None, sig: int | None, reason: str) -> None:
        report = wire.JobReport(
            id=job.id,
            running=False,
            pid=job.pid,
            scratch=job.scratch,
            exit_code=code,
            exit_signal=sig,
            stdout_tail=_tail(job.stdout_path),
            stderr_tail=_tail(job.stderr_path),
            reason=reason,
            started=job.started,
            finished=time.time(),
        )
        self.jobs.pop(job.id, None)
        self.unacked[job.id] = report
        log.info("job %s finished: code=%s signal=%s %s", job.id, code, sig, reason)
        self.post(wire.JobUpdate(report=report, sessions=0))
        job.done.set()


class _Refused(Exception):
    pass


def terminate_all(starter: Starter) -> None:
    """On SIGTERM of the starter: end every job (and its sessions)."""
    for job in list(starter.jobs.values()):
        job.kill("starter shut down")  # also ends a debug hold
