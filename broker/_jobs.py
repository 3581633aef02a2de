"""The job lifecycle applied: ``_lifecycle``'s decisions written to the queue and told to starters.

Owns the connected starters' bookkeeping (slots, outboxes) and everything that changes a job:
submit (with its checks and quotas), user actions (in chunks, so a 100,000-job cluster never
stalls the broker), starter reports, the reconnect sync, and matching idle jobs to free slots.
It never reads a socket: the connection layer hands it messages and sends what it returns.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Callable

import attrs
import trio

from ssh_to_job import common, wire
from ssh_to_job.transport import FramedStream, Outbox

from . import _lifecycle as lc
from . import _queue
from ._queue import JobQueue, UnknownJob

log = logging.getLogger("stj.broker")

#: Up to this many jobs an action answers job by job; beyond, successes are one line per
#: cluster and failures are listed up to this many (a 100,000-job reply would pass no frame).
PER_JOB_RESULTS = 100
#: Rows changed per transaction in a bulk action, between which other requests are served.
CHUNK = 2000
_ALL_PROCS = (0, (1 << 62))
#: Jobs matched to one starter per scheduling round (well under the outbox's bound).
MATCH_BATCH = 512

_ACTION_EVENTS = {
    "rm": lc.Event.RM,
    "hold": lc.Event.HOLD,
    "release": lc.Event.RELEASE,
    "suspend": lc.Event.SUSPEND,
    "continue": lc.Event.CONTINUE,
}


def _uid_for(name: str) -> int | None:
    """A user name, or a number, as a uid (None if it names no one)."""
    if name.isascii() and name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _names_uid(names: tuple[str, ...], uid: int) -> bool:
    return any(_uid_for(n) == uid for n in names)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


@attrs.define(eq=False)
class StarterConn:
    name: str
    key: bytes
    slots: int
    stream: FramedStream
    address: str
    outbox: Outbox
    jobs: set[str] = attrs.field(factory=set)
    #: It has sent its sync: until then it gets no new job (the sync would call it lost).
    synced: bool = False
    pending_output: dict[int, trio.MemorySendChannel[wire.OutputData]] = attrs.field(factory=dict)
    #: A Slurm starter's session tracking, from its hello.
    tracking: str = ""

    def post(self, msg: wire.Message) -> None:
        """Queue ``msg`` for this starter (bounded: one that stops reading is dropped)."""
        self.outbox.post(msg)


def _job(row: _queue.Row, connected: bool) -> lc.Job:
    return lc.Job(
        state=lc.State(row.state),
        on_starter=bool(row.placed),
        connected=connected,
        debug_hold=bool(row.debug_hold),
    )


def check_spec(spec: wire.JobSpec) -> str | None:
    """Why ``spec`` can never run (a message for a person), or None."""
    if not spec.executable.startswith("/"):
        return "the executable must be an absolute path"
    if not spec.initialdir.startswith("/"):
        return "the initial directory must be an absolute path"
    # execve takes C strings: a NUL would cut them short (or, today, crash the start).
    if "\0" in spec.executable:
        return "the executable contains a NUL byte"
    if "\0" in spec.initialdir:
        return "the initial directory contains a NUL byte"
    for i, arg in enumerate(spec.args):
        if "\0" in arg:
            return f"argument {i + 1} contains a NUL byte"
    for name, value in spec.env.items():
        if not name or "=" in name or "\0" in name:
            return f"environment variable name {name!r} is empty or contains '=' or a NUL byte"
        if "\0" in value:
            return f"environment variable {name} contains a NUL byte"
    return None


class Jobs:
    def __init__(
        self,
        queue: JobQueue,
        config: common.BrokerConfig,
        is_superuser: Callable[[int], bool],
        clock: Callable[[], float],
    ) -> None:
        self.queue = queue
        self.bc = config
        self.is_superuser = is_superuser
        self.clock = clock
        self.starters: dict[str, StarterConn] = {}
        #: Set (and replaced) whenever a starter has synced: ssh requests wait on it briefly.
        self._starter_joined = trio.Event()

    # ------------------------------------------------------------------ starters come and go

    def starter_joined(self, conn: StarterConn) -> None:
        self.starters[conn.name] = conn

    def _ready(self, name: str) -> StarterConn | None:
        conn = self.starters.get(name)
        return conn if conn is not None and conn.synced else None

    def starter_left(self, conn: StarterConn) -> None:
        conn.outbox.close()
        if self.starters.get(conn.name) is conn:
            del self.starters[conn.name]
            log.info("starter %s disconnected", conn.name)

    async def wait_for_starter(self, name: str, within: float) -> StarterConn | None:
        """The connected starter ``name``, waiting up to ``within`` s for it to come back."""
        with trio.move_on_after(within):
            while self._ready(name) is None:
                await self._starter_joined.wait()
        return self._ready(name)

    # ------------------------------------------------------------------ submit

    def submit(self, msg: wire.Submit, uid: int, gid: int) -> wire.Message:
        spec = msg.spec
        if not 1 <= msg.count <= 100_000:
            return wire.Error("bad_request", "count must be between 1 and 100000")
        why = check_spec(spec)
        if why is not None:
            return wire.Error("bad_request", why)
        if uid == 0:
            return wire.Error("denied", "jobs may not run as root; submit as the job's user")
        me = os.geteuid()
        if me != 0 and uid != me:
            # A personal pool's starter runs as its owner and cannot switch to another uid.
            return wire.Error(
                "denied",
                f"this is {user_name(me)}'s personal pool: its jobs can only run as "
                f"{user_name(me)}; submit to your own pool (stj pool) or a shared one",
            )
        size = len(wire.encode_message(msg))
        if size > self.bc.max_submit_bytes:
            return wire.Error(
                "too_big",
                f"the job description is {size} bytes; the limit is {self.bc.max_submit_bytes}"
                " (broker.max_submit_bytes): pass big inputs as files",
            )
        queued = self.queue.queued(uid)
        if queued + msg.count > self.bc.max_jobs_per_user:
            return wire.Error(
                "quota",
                f"you have {queued} jobs in the queue; {msg.count} more would pass the limit of "
                f"{self.bc.max_jobs_per_user} (broker.max_jobs_per_user): wait for some to "
                "finish or remove some",
            )
        cluster = self.queue.submit(spec, msg.count, user_name(uid), uid, gid)
        self.queue.audit(uid, "submit", f"{cluster}", f"{msg.count} job(s)")
        self.schedule()
        return wire.SubmitReply(cluster=cluster, count=msg.count)

    # ------------------------------------------------------------------ ssh policy

    def ssh_refusal(self, row: _queue.Row, uid: int) -> wire.Error | None:
        """Whether ``uid`` may open a session into the job in ``row``, before its state counts.

        The pool's admin can turn ssh off for everyone (``allow_ssh``) or for some users
        (``ssh_denied_users``); a job submitted with ``--no-ssh`` admits no one; otherwise its
        owner, queue superusers and the collaborators its owner named get in.
        """
        if not self.bc.allow_ssh:
            return wire.Error("ssh_off", "ssh-to-job is turned off in this pool (broker.allow_ssh)")
        if _names_uid(self.bc.ssh_denied_users, uid):
            return wire.Error(
                "ssh_off",
                f"ssh-to-job is turned off for {user_name(uid)} in this pool "
                "(broker.ssh_denied_users)",
            )
        spec = row.job_spec()
        if not spec.ssh:
            return wire.Error("ssh_off", f"job {row.id} was submitted with --no-ssh")
        if row.owner_uid == uid or self.is_superuser(uid):
            return None
        if _names_uid(spec.ssh_users, uid) or uid in self.queue.ssh_allowed(row.id):
            return None
        return wire.Error(
            "denied",
            f"job {row.id} belongs to {row.owner}; only its owner, a queue superuser or a user "
            "it names (stj ssh-allow) may ssh into it",
        )

    def ssh_allow(self, msg: wire.SshAllow, uid: int) -> wire.Message:
        """``stj ssh-allow JOB USER...``: the owner (or a superuser) names collaborators."""
        try:
            jid = wire.parse_job_id(msg.id)
            row = self.queue.get(jid.one)
        except ValueError as exc:
            return wire.Error("bad_request", str(exc))
        except UnknownJob:
            return wire.Error("unknown_job", f"job {msg.id} is not in the queue")
        if not (row.owner_uid == uid or self.is_superuser(uid)):
            self.queue.audit(uid, "ssh-allow", row.id, "denied")
            return wire.Error(
                "denied",
                f"job {row.id} belongs to {row.owner}; only its owner or a queue superuser may "
                "let others in",
            )
        if not 1 <= len(msg.users) <= 64:
            return wire.Error("bad_request", "name between 1 and 64 users")
        uids: list[int] = []
        for name in msg.users:
            who = _uid_for(name)
            if who is None:
                return wire.Error("bad_request", f"no such user: {name!r}")
            uids.append(who)
        self.queue.allow_ssh(row.id, uids)
        names = ", ".join(user_name(u) for u in uids)
        self.queue.audit(uid, "ssh-allow", row.id, f"ok: {names}")
        return wire.ActReply(
            results=(wire.ActResult(row.id, True, f"job {row.id}: {names} may now ssh into it"),)
        )

    # ------------------------------------------------------------------ user actions

    def _actor(self, owner_uid: int, uid: int) -> lc.Actor:
        if owner_uid == uid:
            return lc.Actor.OWNER
        return lc.Actor.SUPERUSER if self.is_superuser(uid) else lc.Actor.OTHER_USER

    async def act(self, msg: wire.Act, uid: int) -> wire.Message:
        """rm, hold, release, suspend or continue the jobs ``msg`` names.

        A cluster is worked through CHUNK procs at a time, each chunk its own transactions,
        with a checkpoint between chunks: a 100,000-job cluster never holds up other requests
        for more than one chunk. The reply lists jobs one by one only up to PER_JOB_RESULTS."""
        event = _ACTION_EVENTS[msg.action]
        if event in (lc.Event.SUSPEND, lc.Event.CONTINUE):
            await self._wait_for_starters_of(msg.ids)
        out = _Results()
        for text in msg.ids:
            try:
                jid = wire.parse_job_id(text)
            except ValueError as exc:
                out.fail(text, str(exc))
                continue
            procs = (jid.proc, jid.proc) if jid.proc is not None else _ALL_PROCS
            total, first, last = self.queue.live_range(jid.cluster, procs)
            if not total:
                out.fail(str(jid), f"job {jid} is not in the queue")
                continue
            detailed = total <= PER_JOB_RESULTS
            lo = first
            while lo <= last:
                top = min(last, lo + CHUNK - 1)
                for state, placed, debug, count, g_lo, g_hi, _owner, owner_uid in self.queue.groups(
                    jid.cluster, (lo, top)
                ):
                    group = _Group(
                        jid.cluster, (g_lo, g_hi), (state, placed, debug), count, owner_uid
                    )
                    self._act_group(group, event, msg, uid, detailed, out)
                lo = top + 1
                if lo <= last:
                    await trio.lowlevel.checkpoint()
        self.schedule()
        return wire.ActReply(results=out.results())

    async def _wait_for_starters_of(self, ids: tuple[str, ...]) -> None:
        """Give the starters of these jobs up to starter_wait s to come back, if they are away
        (a dropped control channel being redialled): suspend and continue need them."""
        names: set[str] = set()
        for text in ids:
            try:
                jid = wire.parse_job_id(text)
            except ValueError:
                continue
            procs = (jid.proc, jid.proc) if jid.proc is not None else _ALL_PROCS
            names |= self.queue.placed_starters(jid.cluster, procs)
        with trio.move_on_after(self.bc.starter_wait):
            for name in sorted(names):
                await self.wait_for_starter(name, self.bc.starter_wait)

    def _act_group(
        self,
        group: _Group,
        event: lc.Event,
        msg: wire.Act,
        uid: int,
        detailed: bool,
        out: _Results,
    ) -> None:
        """``msg``'s action on one group of a chunk of a cluster's jobs (same state, placement
        and debug hold): one decision of the table for all of them."""
        cluster, procs, match, count = group.cluster, group.procs, group.match, group.count
        action = msg.action
        actor = self._actor(group.owner_uid, uid)
        state, placed, debug = match
        # suspend/continue depend on each job's starter being connected: decided job by job.
        d = lc.decide(lc.Job(lc.State(state), bool(placed), True, bool(debug)), event, actor)
        if d.refusal is not None:
            rows = self.queue.procs_in(cluster, procs, match, out.room())
            for row in rows:
                out.add(self._act_one(row, event, actor, msg, uid))
            out.unlisted(count - len(rows))
            return
        if placed:
            # Jobs on starters are few (at most the pool's slots): one by one, with signals.
            for row in self.queue.procs_in(cluster, procs, match, count):
                out.add(self._act_one(row, event, actor, msg, uid))
            return
        fields = self._action_fields(d, msg.reason, uid)
        shown = self.queue.procs_in(cluster, procs, match, PER_JOB_RESULTS) if detailed else []
        done = self.queue.update_group(cluster, procs, match, d.job.state.value, **fields)
        self.queue.audit(uid, action, f"{cluster}", f"ok: {done} {state} job(s) in {procs}")
        if detailed:
            for row in shown:
                out.ok(row.id, f"job {row.id}: {action} done")
        else:
            out.done(cluster, action, state, done)

    def _action_fields(self, d: lc.Decision, reason: str, uid: int) -> dict[str, object]:
        """The columns a user's action sets besides the state."""
        who = user_name(uid)
        after = d.job.state
        if after is lc.State.REMOVED:
            return {"finished": self.clock(), "hold_reason": reason or f"removed by {who}"}
        if after is lc.State.HELD:
            return {"hold_reason": reason or f"held by {who}"}
        if after is lc.State.IDLE:
            return {"hold_reason": "", "starter": "", "pid": 0}
        return {}

    def _act_one(
        self, row: _queue.Row, event: lc.Event, actor: lc.Actor, msg: wire.Act, uid: int
    ) -> wire.ActResult:
        jid, action = row.id, msg.action
        conn = self.starters.get(row.starter) if row.placed else None
        d = lc.decide(_job(row, conn is not None), event, actor)
        if actor is lc.Actor.OTHER_USER:
            self.queue.audit(uid, action, jid, "denied")
            return wire.ActResult(
                jid,
                False,
                f"job {jid} belongs to {row.owner}; only its owner or a queue superuser may "
                f"{action} it",
            )
        if d.refusal is not None:
            if d.refusal == "its starter is not connected":
                return wire.ActResult(jid, False, f"the starter of job {jid} is not connected")
            return wire.ActResult(jid, False, f"job {jid} {d.refusal}")
        fields = self._action_fields(d, msg.reason, uid)
        self.queue.set_state(jid, d.job.state.value, **fields)
        if d.signal is not None and conn is not None:
            if event is lc.Event.RELEASE:
                why = f"released by {user_name(uid)}"
            else:
                why = str(fields.get("hold_reason", ""))
            conn.post(wire.SignalJob(id=jid, action=d.signal.value, reason=why))
        self.queue.audit(uid, action, jid, "ok")
        if d.job.state is lc.State.RELEASING:
            done = (
                "debug hold ended; it will run again"
                if row.debug_hold
                else "release done (once evicted)"
            )
            return wire.ActResult(jid, True, f"job {jid}: {done}")
        return wire.ActResult(jid, True, f"job {jid}: {action} done")

    # ------------------------------------------------------------------ starter reports

    def sync(self, conn: StarterConn, reports: tuple[wire.JobReport, ...]) -> None:
        """Reconcile the queue with what a (re)connecting starter says it has."""
        known = {r.id for r in reports}
        for row in self.queue.on_starter(conn.name):
            if row.id in known:
                continue
            # The starter does not have it: it never got it, or lost it with a restart.
            d = lc.decide(_job(row, True), lc.Event.LOST, lc.Actor.BROKER)
            log.warning(
                "job %s is not on starter %s any more; now %s", row.id, conn.name, d.job.state
            )
            fields: dict[str, object] = {"starter": "", "pid": 0, "placed": 0, "debug_hold": 0}
            if row.debug_hold and d.job.state is lc.State.HELD:
                fields["hold_reason"] = row.hold_reason + " (its starter lost it)"
            if d.job.state is lc.State.IDLE:
                fields["hold_reason"] = ""
            self.queue.set_state(row.id, d.job.state.value, **fields)
        for report in reports:
            self.report(conn, report, 0)
        conn.post(wire.Ack(ids=tuple(sorted(known))))
        conn.synced = True
        self._starter_joined.set()
        self._starter_joined = trio.Event()
        self.schedule()

    def report(self, conn: StarterConn, r: wire.JobReport, sessions: int) -> None:
        try:
            row = self.queue.get(r.id)
        except UnknownJob:
            log.warning("starter %s reports unknown job %s; killing it", conn.name, r.id)
            if r.running:
                conn.post(wire.SignalJob(id=r.id, action="kill", reason="unknown to the broker"))
            conn.jobs.discard(r.id)
            return
        if r.running:
            event = lc.Event.REPORT_DEBUG_HOLD if r.debug_hold else lc.Event.REPORT_RUNNING
        elif r.reason.startswith("could not start"):
            event = lc.Event.REPORT_COULD_NOT_START
        elif r.reason.startswith(TIME_LIMIT) or _kept_for_debug(row.job_spec(), r):
            event = lc.Event.REPORT_FAILED_HOLD
        else:
            event = lc.Event.REPORT_EXITED
        actor = (
            lc.Actor.OTHER_STARTER if row.placed and row.starter != conn.name else lc.Actor.STARTER
        )
        d = lc.decide(_job(row, True), event, actor)
        if d.refusal is not None:
            log.warning("starter %s reports job %s which runs on %s", conn.name, r.id, row.starter)
            if r.running:
                # A stale copy (the queue placed the job elsewhere since): it must not run twice.
                conn.post(wire.SignalJob(id=r.id, action="kill", reason=f"runs on {row.starter}"))
            return
        if not r.running:
            conn.jobs.discard(r.id)
        if d.noop:
            return
        after = d.job
        if after.on_starter:
            conn.jobs.add(r.id)  # a job kept for debugging, or a copy on its way out, too
            fields: dict[str, object] = {
                "pid": r.pid,
                "scratch": r.scratch,
                "starter": conn.name,
                "placed": 1,
                "sessions": sessions,
            }
            if after.state in (lc.State.RUNNING, lc.State.SUSPENDED):
                fields["started"] = r.started or row.started
            if event is lc.Event.REPORT_DEBUG_HOLD and after.debug_hold:
                fields.update(
                    debug_hold=1,
                    debug_until=r.debug_until,
                    exit_code=r.exit_code,
                    exit_signal=r.exit_signal,
                )
                if after.state is lc.State.HELD and not row.debug_hold:
                    fields["hold_reason"] = r.reason
        else:
            fields = {
                "pid": 0,
                "sessions": 0,
                "debug_hold": 0,
                "debug_until": 0.0,
                "placed": 0,
                "exit_code": r.exit_code,
                "exit_signal": r.exit_signal,
                "stdout_tail": r.stdout_tail,
                "stderr_tail": r.stderr_tail,
            }
            if after.state is lc.State.IDLE:
                # Released (or an old copy gone): it runs again from the start.
                fields.update(hold_reason="", starter="", exit_code=None, exit_signal=None)
            elif row.debug_hold and after.state is lc.State.HELD and r.reason:
                # Its debug hold ended (expired): say so, instead of still inviting ssh-to-job.
                fields["hold_reason"] = r.reason
            elif row.state in ("running", "suspended") and after.state is lc.State.HELD:
                status = r.exit_code if r.exit_code is not None else f"signal {r.exit_signal}"
                fields["hold_reason"] = r.reason or f"exited with {status}"
                fields["finished"] = r.finished or self.clock()
            elif after.state in (lc.State.COMPLETED, lc.State.REMOVED):
                fields["finished"] = r.finished or row.finished or self.clock()
        self.queue.set_state(r.id, after.state.value, **fields)
        if d.signal is not None:
            conn.post(wire.SignalJob(id=r.id, action=d.signal.value, reason=row.hold_reason))

    # ------------------------------------------------------------------ matching

    def schedule(self) -> None:
        """Match idle jobs to free slots, oldest job first."""
        for conn in list(self.starters.values()):
            # At most MATCH_BATCH at a time: a starter with very many slots must not overflow
            # its outbox; every job start reported brings the next round.
            free = min(conn.slots - len(conn.jobs), MATCH_BATCH)
            if free <= 0 or not conn.synced:
                continue
            for row in self.queue.next_idle(free):
                d = lc.decide(_job(row, True), lc.Event.MATCH, lc.Actor.BROKER)
                if d.refusal is not None:  # pragma: no cover - next_idle picks only these
                    continue
                self.queue.set_state(
                    row.id, d.job.state.value, starter=conn.name, placed=1, started=self.clock()
                )
                conn.jobs.add(row.id)
                run = wire.JobRun(
                    id=row.id,
                    uid=row.owner_uid,
                    gid=row.owner_gid,
                    owner=row.owner,
                    spec=row.job_spec(),
                )
                conn.post(wire.RunJob(job=run))


#: How a starter's report of a job killed at its time limit begins.
TIME_LIMIT = "time limit"


def _kept_for_debug(spec: wire.JobSpec, r: wire.JobReport) -> bool:
    """A failed job whose spec asks to keep it held (``--debug-on`` / ``--hold-on-failure``)."""
    if r.exit_signal:
        return spec.debugs("signal")
    return bool(r.exit_code) and spec.debugs("exit")


@attrs.frozen
class _Group:
    cluster: int
    #: The lowest and highest proc of the group (other procs in between may be elsewhere).
    procs: tuple[int, int]
    #: (state, placed, debug_hold), as stored.
    match: tuple[str, int, int]
    count: int
    owner_uid: int


class _Results:
    """An action's results, bounded: failures listed up to PER_JOB_RESULTS, then counted;
    successes in bulk as one line per cluster and state."""

    def __init__(self) -> None:
        self._ok: list[wire.ActResult] = []
        self._failed: list[wire.ActResult] = []
        self._unlisted = 0
        self._done: dict[tuple[int, str, str], int] = {}

    def ok(self, jid: str, message: str) -> None:
        self._ok.append(wire.ActResult(jid, True, message))

    def done(self, cluster: int, action: str, state: str, n: int) -> None:
        key = (cluster, action, state)
        self._done[key] = self._done.get(key, 0) + n

    def room(self) -> int:
        return PER_JOB_RESULTS - len(self._failed)

    def fail(self, jid: str, message: str) -> None:
        if self.room() > 0:
            self._failed.append(wire.ActResult(jid, False, message))
        else:
            self._unlisted += 1

    def unlisted(self, n: int) -> None:
        self._unlisted += n

    def add(self, result: wire.ActResult) -> None:
        if result.ok:
            self._ok.append(result)
        else:
            self.fail(result.id, result.message)

    def results(self) -> tuple[wire.ActResult, ...]:
        bulk = [
            wire.ActResult(f"{c}", True, f"cluster {c}: {action} done for {n} {state} jobs")
            for (c, action, state), n in self._done.items()
            if n
        ]
        extra = []
        if self._unlisted:
            extra.append(
                wire.ActResult("", False, f"and {self._unlisted} more jobs refused (not listed)")
            )
        return (*self._ok, *bulk, *self._failed, *extra)
