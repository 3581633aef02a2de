"""One job on the starter: what it is (frozen), what is happening to it (small and mutable),
and the durable record that lets a restarted starter take it back.

A ``JobPlan`` is worked out once, before anything is spawned, from the broker's ``JobRun``:
the owner's groups, the environment, the scratch, spool and cgroup paths. Anything that cannot
be planned (a NUL byte in an argument, ``=`` in an environment name, a root job) fails here as
``CannotStart``, so the job is reported "could not start" before it takes a slot. A ``Job`` is
the runtime record the daemon and its sessions share; it reaches the broker only through the
``post`` callback it was given, never through the starter.

The record (``<state>/jobs/<id>.json``, 0600 in a 0700 directory) is written before the job is
reported running and removed when the broker has acknowledged its final report. Beside it,
``<id>.status`` receives the job's exit status from its reaper (``stj-reaper``), the job's
first process, so a starter that is not the job's parent any more still learns how it ended.
Must never: trust a recorded pid without checking that it is still the same process.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pwd
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import trio

from ssh_to_job import common, wire

from . import _procs, _spawn

log = logging.getLogger("stj.starter")

#: The status file holds one short line ("exit N", "signal N", "error ERRNO").
STATUS_MAX = 64


class CannotStart(Exception):
    """The job cannot be started here; the message is the reason given to the broker."""


def _frozen_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class JobPlan:
    """Everything about a job that is fixed before it starts."""

    run: wire.JobRun
    groups: tuple[int, ...]
    env: Mapping[str, str] = attrs.field(converter=_frozen_env, hash=False)
    scratch: pathlib.Path
    stdout_path: pathlib.Path
    stderr_path: pathlib.Path
    cgroup: pathlib.Path | None

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def argv(self) -> list[str]:
        return [self.run.spec.executable, *self.run.spec.args]


def scratch_dir(execute_dir: pathlib.Path, job_id: str) -> pathlib.Path:
    return execute_dir / f"job_{job_id.replace('.', '_')}"


def _check_text(what: str, value: str) -> None:
    if "\0" in value:
        raise CannotStart(f"{what} contains a NUL byte")


def plan_job(
    run: wire.JobRun,
    *,
    execute_dir: pathlib.Path,
    spool_dir: pathlib.Path,
    cgroup_base: pathlib.Path | None,
    starter_name: str,
) -> JobPlan:
    """Work out the job's fixed description; ``CannotStart`` if it can never run here."""
    spec = run.spec
    if not run.id or "/" in run.id or run.id.startswith(".") or "\0" in run.id:
        # It names files and cgroups of ours.
        raise CannotStart(f"bad job id {run.id!r}")
    if run.uid == 0:
        raise CannotStart("jobs never run as root")
    if not spec.executable:
        raise CannotStart("no executable given")
    _check_text("the executable", spec.executable)
    for arg in spec.args:
        _check_text("an argument", arg)
    _check_text("the initial directory", spec.initialdir)
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key:
            raise CannotStart(f"bad environment variable name {key!r}")
        _check_text(f"environment variable {key}", value)
    try:
        groups = tuple(os.getgrouplist(pwd.getpwuid(run.uid).pw_name, run.gid))
    except KeyError:
        groups = (run.gid,)
    scratch = scratch_dir(execute_dir, run.id)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    try:
        pw = pwd.getpwuid(run.uid)
        env.update(USER=pw.pw_name, LOGNAME=pw.pw_name)
        if os.path.isdir(pw.pw_dir):
            env["HOME"] = pw.pw_dir
    except KeyError:
        pass
    env.setdefault("HOME", str(scratch))
    env.update(spec.env)
    env.update(
        {
            "SSH_TO_JOB_ID": run.id,
            "SSH_TO_JOB_SCRATCH_DIR": str(scratch),
            "SSH_TO_JOB_IWD": spec.initialdir,
            "SSH_TO_JOB_STARTER": starter_name,
        }
    )
    return JobPlan(
        run=run,
        groups=groups,
        env=env,
        scratch=scratch,
        stdout_path=spool_dir / f"{run.id}.stdout",
        stderr_path=spool_dir / f"{run.id}.stderr",
        cgroup=cgroup_base / f"job-{run.id}" if cgroup_base is not None else None,
    )


@attrs.define(eq=False)
class Job:
    """What is happening to one job now. Shared by the job's task and its sessions' tasks."""

    plan: JobPlan
    post: Callable[[wire.Message], None] = attrs.field(repr=False)
    group: _procs.JobGroup = attrs.field(factory=lambda: _procs.JobGroup(None))
    pid: int = 0
    reaper_pid: int = 0
    started: float = 0.0
    sessions: dict[str, trio.Process | _spawn.Process] = attrs.field(factory=dict)
    main_exited: bool = False
    killed: str = ""
    suspended: bool = False
    debug_hold: bool = False
    #: When the debug hold ends (Unix time); 0 when not held.
    debug_until: float = 0.0
    hold_reason: str = ""
    exit_code: int | None = None
    exit_signal: int | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    killed_event: trio.Event = attrs.field(factory=trio.Event)
    sessions_changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def id(self) -> str:
        return self.plan.id

    def accepts_sessions(self) -> bool:
        alive = not self.main_exited or self.debug_hold
        return self.pid != 0 and alive and not self.killed and not self.suspended

    def report(self) -> wire.JobReport:
        return wire.JobReport(
            id=self.id,
            running=True,
            pid=self.pid,
            scratch=str(self.plan.scratch),
            started=self.started,
            debug_hold=self.debug_hold,
            debug_until=self.debug_until,
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
        self.post(wire.JobUpdate(report=self.report(), sessions=len(self.sessions)))


# --------------------------------------------------------------------------- durable records


class Records:
    """The starter's durable account of its jobs: one 0600 JSON file per job, 0700 dir."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.dir = directory

    def prepare(self) -> None:
        common.private_dir(self.dir)

    def path(self, job_id: str) -> pathlib.Path:
        return self.dir / f"{job_id}.json"

    def status_path(self, job_id: str) -> pathlib.Path:
        return self.dir / f"{job_id}.status"

    def open_status(self, job_id: str) -> int:
        """A fresh status file for the reaper to write through (an inherited descriptor)."""
        path = self.status_path(job_id)
        path.unlink(missing_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)

    def status_text(self, job_id: str) -> str:
        """What the reaper wrote so far ("" if nothing, or no file)."""
        try:
            fd = os.open(self.status_path(job_id), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return ""
        try:
            return os.read(fd, STATUS_MAX).decode("ascii", "replace")
        finally:
            os.close(fd)

    def read_status(self, job_id: str) -> tuple[int | None, int | None] | None:
        """(exit code, signal) the reaper wrote, or None if it wrote nothing usable."""
        return parse_status(self.status_text(job_id))

    def write_running(self, job: Job, reaper_start: int) -> None:
        body = {
            "run": _encoded(wire.RunJob(job=job.plan.run)),
            "groups": list(job.plan.groups),
            "env": dict(job.plan.env),
            "scratch": str(job.plan.scratch),
            "stdout": str(job.plan.stdout_path),
            "stderr": str(job.plan.stderr_path),
            "cgroup": str(job.plan.cgroup) if job.plan.cgroup is not None else None,
            "pid": job.pid,
            "reaper_pid": job.reaper_pid,
            "reaper_start": reaper_start,
            "started": job.started,
        }
        common.write_private(self.path(job.id), json.dumps(body).encode())

    def write_final(self, report: wire.JobReport) -> None:
        """The job is over; keep its report until the broker has it."""
        body = {"final": _encoded(wire.JobUpdate(report=report))}
        common.write_private(self.path(report.id), json.dumps(body).encode())
        self.status_path(report.id).unlink(missing_ok=True)

    def forget(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)
        self.status_path(job_id).unlink(missing_ok=True)

    def load(self) -> list[Recorded]:
        out: list[Recorded] = []
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(_decode_record(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError, wire.ProtocolError) as exc:
                log.error("unreadable job record %s (%s); removing it", path, exc)
                path.unlink(missing_ok=True)
        return out


@attrs.frozen
class Recorded:
    """A record as read back: a running job (``plan`` and its pids) or a final report."""

    plan: JobPlan | None = None
    pid: int = 0
    reaper_pid: int = 0
    reaper_start: int = 0
    started: float = 0.0
    final: wire.JobReport | None = None


def _encoded(msg: wire.Message) -> Any:
    return json.loads(wire.encode_message(msg))


def _decoded(body: Any) -> wire.Message:
    return wire.decode_message(json.dumps(body).encode())


def _decode_record(body: dict[str, Any]) -> Recorded:
    if "final" in body:
        update = _decoded(body["final"])
        if not isinstance(update, wire.JobUpdate):
            raise ValueError("final report is not a job_update")
        return Recorded(final=update.report)
    run = _decoded(body["run"])
    if not isinstance(run, wire.RunJob):
        raise ValueError("run is not a run_job")
    plan = JobPlan(
        run=run.job,
        groups=tuple(int(g) for g in body["groups"]),
        env={str(k): str(v) for k, v in body["env"].items()},
        scratch=pathlib.Path(body["scratch"]),
        stdout_path=pathlib.Path(body["stdout"]),
        stderr_path=pathlib.Path(body["stderr"]),
        cgroup=pathlib.Path(body["cgroup"]) if body["cgroup"] else None,
    )
    return Recorded(
        plan=plan,
        pid=int(body["pid"]),
        reaper_pid=int(body["reaper_pid"]),
        reaper_start=int(body["reaper_start"]),
        started=float(body["started"]),
    )


#: The reaper's status lines that are not an ending (see stj-reaper.c): the job was exec'd,
#: or it never was because its starter died before recording it.
RUNNING = "running"
UNSTARTED = "unstarted"


def status_word(text: str) -> str:
    """The reaper's last status line ("" if none): RUNNING, UNSTARTED or an ending."""
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def duration(seconds: float) -> str:
    """``90 s``, ``10m``, ``1h30m``: how long, for a person."""
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m"


def parse_status(text: str) -> tuple[int | None, int | None] | None:
    """The reaper's ending as (exit code, signal); None while running or for anything else."""
    word, _, number = status_word(text).partition(" ")
    if not number.isdigit() or len(number) > 5:
        return None
    n = int(number)
    if word == "exit" and n <= 255:
        return n, None
    if word == "signal" and 0 < n < 128:
        return None, n
    if word == "error":
        return 127, None
    return None


def parse_exec(line: bytes) -> None:
    """The reaper's second line: "ok" once the job was exec'd; OSError if the exec failed."""
    word, _, number = line.decode("ascii", "replace").strip().partition(" ")
    if word == "ok" and not number:
        return
    if word == "error" and number.isdigit() and len(number) <= 5 and int(number) > 0:
        err = int(number)
        raise OSError(err, os.strerror(err))
    raise OSError(f"the job's reaper did not say whether the job started ({line[:40]!r})")


def parse_report(line: bytes) -> int:
    """The job's pid from the reaper's first line; OSError if the exec failed."""
    word, _, number = line.decode("ascii", "replace").strip().partition(" ")
    if not number.isdigit() or len(number) > 10:
        raise OSError(f"the job's reaper did not report its pid ({line[:40]!r})")
    if word == "error":
        err = int(number)
        raise OSError(err, os.strerror(err))
    if word != "pid" or int(number) <= 0:
        raise OSError(f"the job's reaper did not report its pid ({line[:40]!r})")
    return int(number)


def process_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat):
    with the pid, it names one process, even after the pid has been reused."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])
