"""The starter daemon: dials out to the broker, runs jobs as their owners, serves sessions.

It opens no port. Its one control connection to the broker is TLS 1.3, authenticated both ways
by certificates of the pool CA (``<state>/pki``, from enrolment with a join token, or issued
directly from the broker's CA when both share a state directory, as in ``stj pool``). Jobs live in
the starter's own nursery, not the connection's: when the broker goes away, jobs keep running,
the starter redials with backoff, and reports what happened meanwhile (exit codes included)
until the broker acknowledges each report.

Jobs also outlive the starter itself: each job's first process is a small reaper
(``stj-reaper``) that writes the job's exit status to a file, and each job has a durable record
(``_jobs.Records``). A restarted starter takes back the jobs it recorded (same processes, same
cgroups), reports those that ended while it was down, and kills only what it has no record
of. One starter owns a state directory at a time (``starter.lock``).

Must never: block the event loop (no ``time.sleep``); run two starters on one state dir; report
a job twice as finished to a broker that has acknowledged it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ssh_to_job import common, preload, transport, wire
from ssh_to_job.transport import FramedStream, Outbox, PeerGone

from . import _exits, _pkiwork, _procs
from ._jobs import (
    UNSTARTED,
    CannotStart,
    Job,
    JobPlan,
    Recorded,
    Records,
    duration,
    parse_exec,
    parse_report,
    plan_job,
    process_start_time,
    scratch_dir,
    status_word,
)
from ._session import cleanup_session_dirs, remove_owned_tree, run_session, wait_gone
from ._spare import Spares

log = logging.getLogger("stj.starter")

PING_INTERVAL = 15.0
"""Seconds between the starter's pings on its control channel. The broker drops a starter it
has not heard from for a few intervals, and pings back; the starter gives up on a channel that
has been silent for ``SILENCE`` and redials."""

SILENCE = PING_INTERVAL * 4
"""A control channel this long without any message from the broker is dead."""

BACKOFF_MIN = 0.1
"""The first reconnect delay, and the delay again after every successful connection."""

#: Seconds between redials of a starter the broker said is revoked.
REVOKED_REDIAL = 60.0

TAIL = 65536
REAPER = pathlib.Path(__file__).resolve().parent / "stj-reaper"


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


class Backoff:
    """Reconnect delays: doubling from ``first`` up to ``most``, back to ``first`` on reset."""

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = max(first, most)
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.most)
        return delay

    def reset(self) -> None:
        self._next = self.first


@attrs.define(eq=False)
class PkiFiles:
    """This starter's enrolled identity (checked by ``_pkiwork``) and its files."""

    directory: pathlib.Path
    pool_id: str
    name: str
    ca_file: pathlib.Path
    cert_file: pathlib.Path
    key_file: pathlib.Path
    #: The certificate's validity, epoch seconds: when to ask for a renewal.
    not_before: float
    not_after: float


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
        self.records = Records(state_dir / "jobs")
        self.replay = wire.ReplayCache()
        self.jobs: dict[str, Job] = {}
        self.unacked: dict[str, wire.JobReport] = {}
        self._outbox: Outbox | None = None
        self.stopping = False
        #: Stopping with keep_jobs_on_stop: leave every job running for the next starter.
        self.leaving = False
        self.shim = preload.check_shim() if cfg.use_shim else None
        #: The exit statuses of session commands, for their records.
        self.exits = _exits.ExitWatch()
        self.cgroup_base: pathlib.Path | None = None
        self.broker_addr = ("", 0)
        #: The key that signs capabilities: the broker sends it in ``welcome``.
        self.broker_key = b""
        self.tls: ssl.SSLContext | None = None
        self.pool_id = ""
        self.pki: PkiFiles | None = None
        #: The key (PKCS#8 PEM) of a renewal asked for and not yet answered.
        self._renew_key: str | None = None
        self.backoff = Backoff(BACKOFF_MIN, cfg.reconnect_max)
        #: Slurm mode: how sessions are tracked here, for ``stj status`` (docs/slurm.md).
        self.tracking = ""
        self._lock_fd = -1
        #: Attach connections dialled ahead of sessions (``[starter] spare_attach``).
        self.spares = Spares(self)

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        cfg = self.config.starter
        self._lock()
        for d, mode in ((self.execute_dir, 0o755), (self.sessions_dir, 0o711)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        common.private_dir(self.spool_dir)
        self.records.prepare()
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
        if cfg.backend == "slurm":
            from ._slurm import check_node, node_tracking

            check_node(cfg.slurm_conf)
            self.tracking = node_tracking(cfg.slurm_conf)
        if not os.access(REAPER, os.X_OK):
            raise SystemExit(f"starter: {REAPER} is missing; reinstall ssh-to-job")
        if cfg.use_cgroups and os.getuid() == 0:
            root = _procs.find_cgroup_root()
            if root is not None:
                # One base per starter identity, not per name: every personal pool on a host
                # has the host's name, and a starter cleans up what it has no record of in its
                # base at start.
                self.cgroup_base = root / f"ssh-to-job-{self.public_key.hex()[:16]}"
                self.cgroup_base.mkdir(exist_ok=True)
        self.broker_addr = self._broker_address()
        self._load_pki()

    def _load_pki(self) -> None:
        """This starter's certificate and the pool CA; issued here from the broker's CA when the
        broker shares our state directory (a personal pool: nothing to set up).

        The certificate work runs in a child (``_pkiwork``): ``cryptography`` would stay in
        this daemon's memory for good."""
        cfg, bc = self.config.starter, self.config.broker
        pki_dir = pathlib.Path(cfg.pki_dir) if cfg.pki_dir else self.state_dir / "pki"
        ca_dir = pathlib.Path(bc.pki_dir) if bc.pki_dir else self.state_dir / "pki"
        try:
            reply = _pkiwork.call(
                {
                    "op": "load",
                    "pki_dir": str(pki_dir),
                    "ca_dir": str(ca_dir),
                    "want_name": cfg.name,
                    "name": self.name,
                    "cert_days": bc.cert_days,
                }
            )
        except _pkiwork.PkiWorkError as exc:
            raise SystemExit(f"starter: {exc}") from None
        for level, message in reply.get("logs", ()):
            log.log(logging.WARNING if level == "warning" else logging.INFO, "%s", message)
        if "error" in reply:
            raise SystemExit(str(reply["error"]))
        pki = PkiFiles(
            pathlib.Path(reply["directory"]),
            reply["pool_id"],
            reply["name"],
            pathlib.Path(reply["ca_file"]),
            pathlib.Path(reply["cert_file"]),
            pathlib.Path(reply["key_file"]),
            float(reply["not_before"]),
            float(reply["not_after"]),
        )
        self.name = pki.name
        self.pool_id = pki.pool_id
        self.pki = pki
        self.tls = transport.client_context(
            pki.ca_file, pki.cert_file, pki.key_file, check_hostname=cfg.check_hostname
        )

    def _ask_renewal(self) -> None:
        """Past two thirds of its certificate's life, ask the broker for a new one."""
        pki = self.pki
        if pki is None or not _pkiwork.due(pki.not_before, pki.not_after, time.time()):
            return
        try:
            reply = _pkiwork.call({"op": "new_key"})
        except _pkiwork.PkiWorkError as exc:
            log.warning("cannot make a key for this starter's renewal: %s", exc)
            return
        self._renew_key = reply["key_pem"]
        log.info("asking the broker to renew this starter's certificate")
        self.post(wire.CertRenew(public_key=reply["public_pem"]))

    def _renewed(self, msg: wire.CertRenewed) -> None:
        """Check and store the renewed certificate; the next connection presents it."""
        pki, key = self.pki, self._renew_key
        if pki is None or key is None:
            return
        try:
            reply = _pkiwork.call(
                {
                    "op": "renewed",
                    "directory": str(pki.directory),
                    "pool_id": self.pool_id,
                    "name": self.name,
                    "certificate": msg.certificate,
                    "key_pem": key,
                }
            )
        except _pkiwork.PkiWorkError as exc:
            log.error("cannot check the renewed certificate: %s", exc)
            return
        if "error" in reply:
            log.error("refusing the renewed certificate: %s", reply["error"])
            return
        self._renew_key = None
        pki.not_before, pki.not_after = float(reply["not_before"]), float(reply["not_after"])
        self.tls = transport.client_context(
            pki.ca_file,
            pki.cert_file,
            pki.key_file,
            check_hostname=self.config.starter.check_hostname,
        )
        log.info("stored this starter's renewed certificate (serial %x)", reply["serial"])

    def _lock(self) -> None:
        """Own the state directory: a second starter on it would kill and rerun our jobs."""
        path = self.state_dir / "starter.lock"
        # O_CLOEXEC: a job (or sshd) that inherited the lock would keep it after we die.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(
                f"starter: another starter (pid {holder}) is running on {self.state_dir}; "
                "stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd != -1:
            os.close(self._lock_fd)
            self._lock_fd = -1

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

    def audit(self, what: str, job: str, detail: str) -> None:
        log.info("audit: %s job=%s %s", what, job, detail)

    def post(self, msg: wire.Message) -> None:
        if self._outbox is not None and not self.stopping:
            self._outbox.post(msg)

    # ------------------------------------------------------------------ main loop

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.prepare()
        try:
            async with trio.open_nursery() as jobs_nursery:
                self.jobs_nursery = jobs_nursery
                await self._recover()
                jobs_nursery.start_soon(self._stop_on_signal, jobs_nursery.cancel_scope)
                if self.exits.probe():
                    jobs_nursery.start_soon(self._guard, self.exits.run)
                task_status.started()
                await self._dial_forever()
        finally:
            self._unlock()

    async def _dial_forever(self) -> None:
        while True:
            revoked = False
            # except*: the connection's reader runs in a nursery body, which wraps what it
            # raises; a broker going away must never take the starter (and its jobs) along.
            try:
                await self._connect_once()
            except* (OSError, PeerGone, trio.TooSlowError, wire.ProtocolError) as group:
                log.info("broker connection: %s", group.exceptions[0])
            except* _Refused as group:
                refused = group.exceptions[0]
                log.error("broker refused this starter: %s", refused)
                revoked = isinstance(refused, _Refused) and refused.code == "revoked"
                if revoked and self.jobs:
                    # Cut off from the pool: nothing may go on here in its name.
                    log.error("this starter was revoked: ending its %d job(s)", len(self.jobs))
                    terminate_all(self)
            except* Exception:
                log.exception("internal error on the broker connection; reconnecting")
            delay = self.backoff.next()
            if revoked:
                # Only an admin can undo it (a new join): no point knocking every few seconds.
                delay = max(delay, REVOKED_REDIAL)
            log.info("redialing the broker in %.1f s", delay)
            await trio.sleep(delay)

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        """SIGTERM/SIGINT: end every job as a whole, then stop (a personal pool stopped with
        Ctrl-C runs nothing), unless ``keep_jobs_on_stop`` leaves them to the next starter."""
        # The receiver stays open until the stop is over: a second SIGTERM (stj pool's own
        # stop follows the process group's) must not kill the starter half-way through ending
        # its jobs, which would leave them running with no starter.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
            await self._stop(scope)

    async def _stop(self, scope: trio.CancelScope) -> None:
        self.stopping = True
        if self.config.starter.keep_jobs_on_stop:
            log.info("starter stopping: leaving %d job(s) to the next starter", len(self.jobs))
            self.leaving = True
            if self.cgroup_base is not None and not self.jobs:
                with contextlib.suppress(OSError):
                    self.cgroup_base.rmdir()
            scope.cancel()
            return
        log.info("starter stopping: ending %d job(s)", len(self.jobs))
        # No final reports: the broker puts these jobs back to idle when the starter returns.
        terminate_all(self)
        with trio.move_on_after(10):
            for job in list(self.jobs.values()):
                await job.done.wait()
        if self.cgroup_base is not None:
            with contextlib.suppress(OSError):
                self.cgroup_base.rmdir()
        scope.cancel()

    async def connect_broker(self) -> trio.SSLStream[trio.SocketStream]:
        """A new TLS connection to the broker (its certificate checked: this pool, the broker)."""
        assert self.tls is not None
        stream, _ident = await transport.connect_tls(
            *self.broker_addr,
            self.tls,
            pool_id=self.pool_id,
            handshake_timeout=self.config.starter.handshake_timeout,
        )
        return stream

    async def _connect_once(self) -> None:
        if not self.config.starter.broker:
            # A restarted personal broker may listen on a new port: follow broker.addr.
            try:
                host, _, port = (self.state_dir / "broker.addr").read_text().strip().rpartition(":")
                self.broker_addr = (host, int(port))
            except (OSError, ValueError) as exc:
                log.info("cannot read broker.addr (%s); trying the last address", exc)
        stream = FramedStream(
            await self.connect_broker(),
            wire.Connection(wire.Channel.STARTER, wire.Role.STARTER, wire.Role.BROKER),
        )
        outbox = Outbox(stream)
        try:
            await self._handshake(stream)
            reports = [j.report() for j in self.jobs.values() if j.pid]
            reports += list(self.unacked.values())
            await stream.send(wire.StarterSync(jobs=tuple(reports)))
            self._outbox = outbox
            self.backoff.reset()
            self._ask_renewal()
            log.info("connected to broker %s:%d as %s", *self.broker_addr, self.name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.run)
                nursery.start_soon(self._pinger)
                if self.spares.size:
                    nursery.start_soon(self.spares.run)
                while True:
                    msg = await stream.receive(within=SILENCE)
                    if isinstance(msg, wire.Error):
                        raise _Refused(msg.code, msg.message)
                    self._dispatch(msg)
        finally:
            self._outbox = None
            outbox.close()
            await stream.aclose()

    async def _handshake(self, stream: FramedStream) -> None:
        """Say who we are; the broker's ``welcome`` (with its capability key) is its consent.

        With TLS 1.3 the broker judges our certificate after our handshake has finished: a
        refusal (revoked, another pool) arrives here as its error frame or a closed stream.
        """
        hello = wire.StarterHello(
            starter_id=self.name,
            starter_key=self.public_key,
            slots=self.config.starter.slots,
            tracking=self.tracking,
        )
        await stream.send(hello)
        msg = await stream.receive(within=self.config.starter.handshake_timeout)
        if isinstance(msg, wire.Error):
            raise _Refused(msg.code, msg.message)
        assert isinstance(msg, wire.Welcome)  # the transition table allows nothing else
        self.broker_key = msg.broker_key

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            self.post(wire.Ping())

    def _dispatch(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.RunJob):
            if msg.job.id in self.jobs or msg.job.id in self.unacked:
                return
            if self.config.starter.backend == "slurm":
                self._could_not_start(msg.job, "this starter enters Slurm jobs and runs none")
                return
            try:
                plan = plan_job(
                    msg.job,
                    execute_dir=self.execute_dir,
                    spool_dir=self.spool_dir,
                    cgroup_base=self.cgroup_base,
                    starter_name=self.name,
                )
            except CannotStart as exc:
                self._could_not_start(msg.job, str(exc))
                return
            job = Job(plan, self.post)
            self.jobs[job.id] = job
            self.jobs_nursery.start_soon(self._guard, self._run_job, job)
        elif isinstance(msg, wire.SignalJob):
            target = self.jobs.get(msg.id)
            if target is not None:
                self._signal(target, msg.action, msg.reason)
        elif isinstance(msg, wire.OpenSession) and msg.job.startswith("slurm:"):
            from ._slurm import serve_session

            self.jobs_nursery.start_soon(self._guard, serve_session, self, msg.job, msg.session_id)
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
            self.jobs_nursery.start_soon(self._guard, run_session, self, target, msg.session_id)
        elif isinstance(msg, wire.FetchOutput):
            target = self.jobs.get(msg.id)
            path = (
                None
                if target is None
                else (
                    target.plan.stdout_path if msg.stream == "stdout" else target.plan.stderr_path
                )
            )
            data = _tail(path, msg.max_bytes) if path is not None else b""
            self.post(wire.OutputData(request=msg.request, data=data, found=target is not None))
        elif isinstance(msg, wire.CertRenewed):
            self._renewed(msg)
        elif isinstance(msg, wire.Ack):
            for jid in msg.ids:
                if self.unacked.pop(jid, None) is not None:
                    self.records.forget(jid)
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

    # ------------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Take back the jobs an earlier starter recorded; clean up everything else it left."""
        recorded = self.records.load()
        known: set[str] = set()
        for rec in recorded:
            if rec.final is not None:
                self.unacked[rec.final.id] = rec.final
                known.add(rec.final.id)
            elif rec.plan is not None:
                if await self._never_started(rec.plan.id):
                    # Its starter died between the record and the go: the job never ran, so
                    # nothing is reported and the broker gives it to a starter again.
                    log.info("job %s was never started; leaving it to the broker", rec.plan.id)
                    self.records.forget(rec.plan.id)
                    continue
                known.add(rec.plan.id)
                await self._adopt(rec, rec.plan)
        # Sessions of a dead starter: their keys and sshd processes go.
        cleanup_session_dirs(self.sessions_dir)
        if self.cgroup_base is not None:
            for cg in self.cgroup_base.glob("job-*"):
                if cg.name[len("job-") :] not in known:
                    log.warning("killing processes left in %s by an earlier starter", cg)
                    await _end_cgroup(cg)
        for d in self.execute_dir.glob("job_*"):
            if not any(d == scratch_dir(self.execute_dir, jid) for jid in known):
                remove_owned_tree(d)

    async def _never_started(self, job_id: str) -> bool:
        """Whether the recorded job's reaper gave up before exec (see stj-reaper.c).

        A reaper still waiting for its go byte gets end of file as soon as the old starter is
        gone, so an undecided status settles within moments; we wait for it a little.
        """
        for _ in range(40):
            word = status_word(self.records.status_text(job_id))
            if word:
                return word == UNSTARTED
            await trio.sleep(0.05)
        return False

    async def _adopt(self, rec: Recorded, plan: JobPlan) -> None:
        job = Job(plan, self.post, pid=rec.pid, reaper_pid=rec.reaper_pid, started=rec.started)
        job.group = _procs.JobGroup(plan.cgroup)
        if plan.cgroup is not None:
            for sub in plan.cgroup.glob("session-*"):
                await _end_cgroup(sub)
        pidfd = _open_reaper(rec)
        self.jobs[job.id] = job
        if pidfd is None:
            log.warning("job %s ended while no starter was watching it", job.id)
        else:
            log.info("job %s (pid %d) taken back from an earlier starter", job.id, job.pid)
            job.group.leaders.append(rec.reaper_pid)
        job.group.session, job.group.uid = rec.reaper_pid, plan.run.uid
        self.jobs_nursery.start_soon(
            self._guard, self._supervise, job, _wait_pidfd(pidfd, self.records, job.id)
        )
        if pidfd is not None:
            self.jobs_nursery.start_soon(self._guard, self._watch_time_limit, job)

    # ------------------------------------------------------------------ jobs

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """A bug in one job's or session's task must not take the starter down."""
        try:
            await fn(*args)
        except Exception:
            log.exception("internal error in %s", getattr(fn, "__name__", fn))

    def _could_not_start(self, run: wire.JobRun, why: str) -> None:
        """Report a job that never ran; the broker holds it with the reason and frees its slot."""
        reason = f"could not start: {why}"
        log.warning("job %s: %s", run.id, reason)
        report = wire.JobReport(id=run.id, running=False, reason=reason, finished=time.time())
        self.records.write_final(report)
        self.unacked[run.id] = report
        self.post(wire.JobUpdate(report=report, sessions=0))

    async def _spawn(self, job: Job, record: Callable[[int], None]) -> trio.Process:
        """Start the job's reaper, ``record`` the job durably, and only then let it exec the job.

        The reaper reports the job's pid as soon as it has forked; ``record(reaper_pid)`` then
        writes the job's record, and one byte on the go pipe lets the job exec. Should this
        starter die before that byte, the job never runs (see stj-reaper.c).
        """
        plan = job.plan
        run = plan.run
        remove_owned_tree(plan.scratch)
        common.private_dir(plan.scratch, run.uid, run.gid)
        job.group = _procs.JobGroup(plan.cgroup)
        fds: list[int] = []
        try:
            fds.append(
                out := os.open(plan.stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            )
            fds.append(
                err := os.open(plan.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            )
            fds.append(status := self.records.open_status(run.id))
            report_r, report_w = os.pipe()
            fds.append(report_w)
            go_r, go_w = os.pipe()
            fds.append(go_r)
            try:
                proc = await trio.lowlevel.open_process(
                    [str(REAPER), str(status), str(report_w), str(go_r), *plan.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=dict(plan.env),
                    cwd=str(plan.scratch),
                    preexec_fn=_procs.make_preexec(
                        run.uid, run.gid, list(plan.groups), plan.cgroup
                    ),
                    pass_fds=(status, report_w, go_r),
                )
            except BaseException:
                os.close(report_r)
                os.close(go_w)
                raise
        finally:
            for fd in fds:
                os.close(fd)
        job.reaper_pid = proc.pid
        job.group.leaders.append(proc.pid)
        job.group.session = proc.pid  # the reaper leads the job's session (setsid)
        job.group.uid = run.uid
        # No deadline: the reaper answers at once, and its pipe ends if it dies.
        try:
            async with trio.lowlevel.FdStream(report_r) as report:
                lines = _Lines(report)
                job.pid = parse_report(await lines.next())
                record(proc.pid)
                os.write(go_w, b"g")
                os.close(go_w)
                go_w = -1
                parse_exec(await lines.next())
        except OSError:
            with trio.CancelScope(shield=True):
                await proc.wait()
            raise
        finally:
            if go_w != -1:
                os.close(go_w)
        return proc

    async def _run_job(self, job: Job) -> None:
        plan = job.plan

        def record(reaper_pid: int) -> None:
            # Durable before the job runs: a starter restarted from here on takes it back.
            job.started = time.time()
            self.records.write_running(job, process_start_time(reaper_pid))

        try:
            proc = await self._spawn(job, record)
        except Exception as exc:
            # Whatever it was, the job must not sit "running" with no pid, holding its slot.
            if not isinstance(exc, OSError | subprocess.SubprocessError | ValueError):
                log.exception("job %s: unexpected failure to start", job.id)
            with trio.CancelScope(shield=True):
                await _end_group(job.group)
            remove_owned_tree(plan.scratch)
            self.records.forget(job.id)
            self.jobs.pop(job.id, None)
            self._could_not_start(plan.run, f"{plan.run.spec.executable}: {exc}")
            job.done.set()
            return
        log.info("job %s started as pid %d (uid %d)", job.id, job.pid, plan.run.uid)
        self.post(wire.JobUpdate(report=job.report(), sessions=0))
        self.jobs_nursery.start_soon(self._guard, self._watch_time_limit, job)

        async def main_exit() -> tuple[int | None, int | None]:
            rc = await proc.wait()
            status = self.records.read_status(job.id)
            if status is not None:
                return status
            # The reaper itself was killed (job group killed, or by its owner).
            return (rc, None) if rc >= 0 else (None, -rc)

        try:
            await self._supervise(job, main_exit())
        finally:
            if proc.returncode is None and not self.leaving:
                with trio.CancelScope(shield=True):
                    proc.kill()  # the group is dead by now; this only covers a cgroup-less race
                    await proc.wait()

    async def _supervise(
        self, job: Job, main_exit: Awaitable[tuple[int | None, int | None] | None]
    ) -> None:
        """From the job's main exit to its final report: debug hold, session grace, clean-up."""
        spec = job.plan.run.spec
        exit_code: int | None = None
        exit_signal: int | None = None
        reason = ""
        try:
            status = await main_exit
            if status is not None:
                exit_code, exit_signal = status
            elif job.killed:
                # Killed as a group (rm, hold) while its reaper was not our child: the reaper
                # died with the job before it could write the status.
                exit_signal = signal.SIGKILL
            else:
                reason = "its exit status was lost while no starter was watching it"
            job.main_exited = True
            job.group.release(job.reaper_pid)  # reaped: without cgroups its pid may be reused
            job.exit_code, job.exit_signal = exit_code, exit_signal
            how = "signal" if exit_signal is not None else "exit"
            failed = exit_code != 0 or exit_signal is not None
            if job.debug_hold:
                # Kept past its time limit, and then it ended by itself: the hold goes on.
                await job.killed_event.wait()
            elif failed and not job.killed and spec.debugs(how):
                what = f"exit status {exit_code}" if how == "exit" else f"signal {exit_signal}"
                await self._debug_hold(job, f"the job failed with {what}")
            # HTCondor semantics: open sessions keep the job alive until they close.
            with trio.move_on_after(self.config.starter.session_grace):
                while job.sessions and not job.killed:
                    await job.sessions_changed.wait()
            reason = job.killed or reason
        finally:
            with trio.CancelScope(shield=True):
                if not self.leaving:
                    job.group.kill()
                    with trio.move_on_after(10):
                        while job.sessions:
                            await job.sessions_changed.wait()
                    await _end_group(job.group)
                    remove_owned_tree(job.plan.scratch)
                    self._finish(job, exit_code, exit_signal, reason)

    async def _debug_hold(self, job: Job, why: str) -> None:
        """Keep a job (its processes, scratch dir, environment) for debugging.

        The broker shows it as held and lets its owner ssh in; it ends with ``stj rm``,
        ``stj release`` (the job then runs again) or after its TTL: the job's
        ``debug_hold_ttl``, at most the pool's ``debug_hold_time``.
        """
        cfg = self.config.starter
        ttl = min(job.plan.run.spec.debug_hold_ttl or cfg.debug_hold_time, cfg.debug_hold_time)
        job.debug_hold = True
        job.debug_until = time.time() + ttl
        job.hold_reason = (
            f"debug hold: {why}; ssh-to-job {job.id} to look, then stj rm or stj release"
        )
        log.info("job %s: %s", job.id, job.hold_reason)
        self.post(wire.JobUpdate(report=job.report(), sessions=len(job.sessions)))
        with trio.move_on_after(ttl):
            await job.killed_event.wait()
        if not job.killed:
            job.kill(f"debug hold expired after {duration(ttl)} ({why}); its files are gone")
        job.debug_hold = False
        job.debug_until = 0.0

    async def _watch_time_limit(self, job: Job) -> None:
        """End (or keep for debugging, with ``debug_on`` "timeout") a job at its time limit."""
        spec = job.plan.run.spec
        if not spec.time_limit:
            return
        left = job.started + spec.time_limit - time.time()
        with trio.move_on_after(max(0.0, left)):
            await job.done.wait()
            return
        if job.main_exited or job.killed or job.debug_hold:
            return
        what = f"time limit of {duration(spec.time_limit)}"
        if spec.debugs("timeout"):
            await self._debug_hold(job, f"the job ran past its {what}")
        else:
            log.info("job %s: %s exceeded; ending it", job.id, what)
            # "time limit ...": the broker holds a job whose report says so (broker/_jobs.py).
            job.kill(f"{what} exceeded")

    def _finish(self, job: Job, code: int | None, sig: int | None, reason: str) -> None:
        report = wire.JobReport(
            id=job.id,
            running=False,
            pid=job.pid,
            scratch=str(job.plan.scratch),
            exit_code=code,
            exit_signal=sig,
            stdout_tail=_tail(job.plan.stdout_path),
            stderr_tail=_tail(job.plan.stderr_path),
            reason=reason,
            started=job.started,
            finished=time.time(),
        )
        self.jobs.pop(job.id, None)
        if self.stopping:
            # Ended by our own shutdown: no report; the broker requeues the job.
            self.records.forget(job.id)
        else:
            self.records.write_final(report)
            self.unacked[job.id] = report
        log.info("job %s finished: code=%s signal=%s %s", job.id, code, sig, reason)
        self.post(wire.JobUpdate(report=report, sessions=0))
        job.done.set()


class _Refused(Exception):
    """The broker refused this starter; ``code`` is its error code (``revoked``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


def terminate_all(starter: Starter) -> None:
    """On SIGTERM of the starter: end every job (and its sessions)."""
    for job in list(starter.jobs.values()):
        job.kill("starter shut down")  # also ends a debug hold


class _Lines:
    """Short lines, one at a time, from a pipe (what is read past a line is kept)."""

    def __init__(self, stream: trio.lowlevel.FdStream, limit: int = 64) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = b""

    async def next(self) -> bytes:
        while b"\n" not in self._buf and len(self._buf) < self._limit:
            chunk = await self._stream.receive_some(self._limit)
            if not chunk:
                break
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


async def _end_group(group: _procs.JobGroup) -> None:
    group.kill()
    await wait_gone(group.all_pids, 5)
    group.remove()


async def _end_cgroup(path: pathlib.Path) -> None:
    _procs.kill_cgroup(path)
    await wait_gone(lambda: _procs.cgroup_pids(path), 5)
    _procs.remove_cgroup_tree(path)


def _open_reaper(rec: Recorded) -> int | None:
    """A pidfd for the recorded reaper if it is still that very process, else None."""
    try:
        fd = os.pidfd_open(rec.reaper_pid)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EINVAL):
            log.warning("pidfd_open(%d): %s", rec.reaper_pid, exc)
        return None
    try:
        # Checked after opening the pidfd, so the pidfd names the process we checked.
        same = process_start_time(rec.reaper_pid) == rec.reaper_start
    except (OSError, ValueError, IndexError):
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


async def _wait_pidfd(
    fd: int | None, records: Records, job_id: str
) -> tuple[int | None, int | None] | None:
    """Wait for a reaper that is not our child (its pidfd is readable once it has ended), then
    read the status it wrote; None if it wrote none."""
    if fd is not None:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
    return records.read_status(job_id)
