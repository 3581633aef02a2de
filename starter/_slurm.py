"""Sessions into Slurm jobs: the starter on a compute node, in Slurm mode (``backend = "slurm"``).

Slurm runs the jobs; this starter runs none. For a session the broker has authorized into
``slurm:JOBID`` on this node (the capability names this starter, which is named as the Slurm
node), it finds the job here with ``scontrol listpids JOBID NODE`` (the job's processes on this
node, step by step), takes the environment of the batch step's first task from
``/proc/PID/environ`` (``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST`` and the rest, as the batch
script sees them), the working directory and owner from ``scontrol show job -o``, and checks
that the processes belong to the job's owner. The session's sshd is then **adopted into the
job** the way ``pam_slurm_adopt`` adopts into the extern step (``PrologFlags=Contain``): the
extern step's slurmstepd is asked to adopt its pid (starter/_stepd.py), which puts it into the
step's container and Slurm's accounting; where slurmstepd cannot be asked (no libslurm, no
answer), the starter writes the pid into every cgroup the extern step process lives in itself.
With ``proctrack/cgroup`` either way is the container Slurm signals, counts and lists, so the
session shows in ``scontrol listpids`` and dies with the job. With ``proctrack/linuxproc`` there is
no container to join: the starter itself watches the job and kills the session's processes
when it ends. Either way the starter watches the job (a pidfd on its extern or batch process)
and ends every session into it when the job ends on this node.

Must never: open a session into a job that has no process on this node, or whose processes
belong to another uid than the capability names; write a pid into a cgroup that is not the
job's; block the event loop (Slurm's commands run in subprocesses through trio).
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import pwd
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from ssh_to_job import wire

from . import _procs, _stepd
from ._jobs import Job, JobPlan
from ._session import run_session

if TYPE_CHECKING:
    from ._daemon import Starter

log = logging.getLogger("stj.starter")

PREFIX = "slurm:"
#: Slurm's step ids for the extern and batch steps, as ``scontrol listpids`` prints them.
EXTERN, BATCH = "extern", "batch"
#: Seconds one ``scontrol`` call may take.
SCONTROL_TIMEOUT = 20.0
#: Environment variables a session must not inherit from the batch step: they describe the
#: batch step's own terminal and process, not the session's.
_NOT_PASSED = frozenset({"SLURM_TASK_PID", "SLURMD_NODENAME_UNUSED", "TERM", "SHLVL", "_", "PWD"})


class NotHere(Exception):
    """The Slurm job cannot be entered on this node; the message says why."""


def job_number(job: str) -> tuple[int, str | None]:
    """The numeric Slurm job id and the step in ``slurm:N`` or ``slurm:N.STEP`` (the broker
    resolves array tasks and nodes before it signs)."""
    try:
        t = wire.parse_slurm_id(job)
    except ValueError:
        t = None
    if t is None or not job.startswith(PREFIX) or t.task is not None or t.node:
        raise NotHere(f"{job!r} is not a Slurm job id the broker would send (slurm:N[.STEP])")
    return t.job, t.step


def parse_show_job(text: str) -> dict[str, str]:
    """One line of ``scontrol show job -o``: ``Key=value`` words (values may hold spaces)."""
    out: dict[str, str] = {}
    # A new field starts at a space followed by Key=; a value with spaces runs until then.
    for part in re.split(r" (?=[A-Za-z][A-Za-z0-9/:_]*=)", text.strip()):
        key, sep, value = part.partition("=")
        if sep:
            out[key] = value
    return out


def parse_listpids(text: str) -> list[tuple[int, str, str]]:
    """(pid, step, local task id) rows of ``scontrol listpids``; pids > 0 only."""
    rows = []
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) < 4 or not words[0].lstrip("-").isdigit():
            continue
        pid = int(words[0])
        if pid > 0:
            rows.append((pid, words[2], words[3]))
    return rows


@attrs.frozen
class SlurmJob:
    """A Slurm job as this node sees it, for one session."""

    job_id: int
    uid: int
    gid: int
    workdir: str
    env: Mapping[str, str] = attrs.field(hash=False)
    pids: tuple[int, ...]
    #: The process that lives as long as the job does on this node (extern step, else batch).
    anchor: int
    #: The cgroup directories (one per hierarchy) of the job's extern step, where sessions go.
    cgroups: tuple[pathlib.Path, ...]
    #: This node's slurmd spool directory (where the extern step's slurmstepd listens), or "".
    spool: str = ""
    #: The node (its Slurm NodeName) this starter serves.
    node: str = ""
    #: Whether the job has an extern step on this node (``PrologFlags=Contain``).
    extern: bool = False


def _slurm_env(slurm_conf: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
    conf = slurm_conf or os.environ.get("SLURM_CONF", "")
    if conf:
        env["SLURM_CONF"] = conf
    return env


async def scontrol(args: list[str], slurm_conf: str) -> str:
    """Run ``scontrol`` without blocking the loop; its stdout, or ``NotHere`` with stderr."""
    try:
        with trio.fail_after(SCONTROL_TIMEOUT):
            r = await trio.run_process(
                ["scontrol", *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=_slurm_env(slurm_conf),
            )
    except (OSError, trio.TooSlowError) as exc:
        raise NotHere(f"scontrol {' '.join(args)}: {exc}") from None
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().removeprefix("scontrol: error: ")
        raise NotHere(err or f"scontrol {' '.join(args)} failed ({r.returncode})")
    return r.stdout.decode(errors="replace")


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _job_cgroups(pid: int, job_id: int) -> tuple[pathlib.Path, ...]:
    """The cgroup directories ``pid`` (an extern step process) is in, in every hierarchy
    where that directory is Slurm's for this job (its path names ``job_<id>``)."""
    try:
        lines = pathlib.Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        mounts = pathlib.Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ()
    v1: dict[str, str] = {}
    v2 = ""
    for m in mounts:
        f = m.split()
        if len(f) < 4:
            continue
        if f[2] == "cgroup2":
            v2 = v2 or f[1]
        elif f[2] == "cgroup":
            for opt in f[3].split(","):
                v1[opt] = f[1]
    out = []
    marker = f"/job_{job_id}/"
    for line in lines:
        _num, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if marker not in path + "/":
            continue
        if controllers == "":
            mount = v2
        else:
            first = controllers.split(",")[0]
            mount = v1.get(first, "") or v1.get(controllers, "")
        if mount:
            d = pathlib.Path(mount) / path.lstrip("/")
            if (d / "cgroup.procs").exists():
                out.append(d)
    return tuple(out)


async def locate(job: str, node: str, slurm_conf: str) -> SlurmJob:
    """The Slurm job ``slurm:N`` on this node, or ``NotHere``."""
    job_id, step = job_number(job)
    shown = [
        parse_show_job(line)
        for line in (await scontrol(["show", "job", "-o", str(job_id)], slurm_conf)).splitlines()
        if line.strip()
    ]
    info = next((s for s in shown if s.get("JobId") == str(job_id)), None)
    if info is None:
        raise NotHere(f"Slurm does not know job {job_id}")
    state = info.get("JobState", "")
    if state != "RUNNING":
        raise NotHere(f"Slurm job {job_id} is {state.lower() or 'not running'}")
    m = re.match(r".*\((\d+)\)$", info.get("UserId", ""))
    g = re.match(r".*\((\d+)\)$", info.get("GroupId", ""))
    if not m or not g:
        raise NotHere(f"cannot tell who owns Slurm job {job_id}")
    uid, gid = int(m.group(1)), int(g.group(1))
    rows = parse_listpids(await scontrol(["listpids", str(job_id), node], slurm_conf))
    if not rows:
        raise NotHere(f"Slurm job {job_id} has no processes on node {node}")
    extern = [p for p, s, _ in rows if s == EXTERN]
    if step is not None:
        # A step: its own first task here, its processes, its directory. The session still
        # goes into the job's extern step (as pam_slurm_adopt adopts): it outlives the step.
        rows = [r for r in rows if r[1] == step]
        if not rows:
            raise NotHere(f"Slurm job {job_id} has no step {step} running on node {node}")
    batch = [p for p, s, task in rows if s == BATCH and task == "0"]
    firsts = [p for p, s, task in rows if s not in (EXTERN, BATCH) and task == "0"]
    source = (batch or firsts or [0])[0]
    env: dict[str, str] = {}
    if source:
        try:
            if os.stat(f"/proc/{source}").st_uid != uid:
                raise NotHere(f"the processes of Slurm job {job_id} here are not its owner's")
            env = _environ(source)
        except FileNotFoundError:
            raise NotHere(f"Slurm job {job_id} ended on {node}") from None
    for k in _NOT_PASSED:
        env.pop(k, None)
    env.setdefault("SLURM_JOB_ID", str(job_id))
    env.setdefault("SLURM_JOBID", str(job_id))
    env.setdefault("SLURM_JOB_NODELIST", info.get("NodeList", ""))
    env.setdefault("SLURM_JOB_USER", info.get("UserId", "").partition("(")[0])
    env.setdefault("SLURM_JOB_UID", str(uid))
    env.setdefault("SLURMD_NODENAME", node)
    workdir = info.get("WorkDir", "") or "/"
    if step is not None and source:
        try:
            workdir = os.readlink(f"/proc/{source}/cwd")
        except OSError:
            raise NotHere(f"step {job_id}.{step} ended on {node}") from None
    anchor = (extern or [source])[0]
    cgroups = _job_cgroups(extern[0], job_id) if extern else ()
    template = await spool_template(slurm_conf)
    return SlurmJob(
        job_id=job_id,
        uid=uid,
        gid=gid,
        workdir=workdir,
        env=env,
        pids=tuple(sorted({p for p, _, _ in rows})),
        anchor=anchor,
        cgroups=cgroups,
        spool=_stepd.spool_dir(template, node) if template else "",
        node=node,
        extern=bool(extern),
    )


class SlurmGroup(_procs.JobGroup):
    """A Slurm job's sessions on this node: their sshd processes and what those start.

    The job's own processes are Slurm's: this group never signals them. Sessions are tracked
    by descent from their sshd (as without cgroups), and each sshd is also adopted into the
    job's extern step (by its slurmstepd, else by writing its cgroups), so Slurm counts, lists
    and kills it with the job.
    """

    def __init__(self, slurm: SlurmJob) -> None:
        super().__init__(None)
        self.slurm = slurm
        self.uid = slurm.uid
        #: How the last sshd was adopted, for the session's log line: "slurmstepd",
        #: "cgroup write (why slurmstepd could not)" or "" (not adopted: no extern step).
        self.adopted_by = ""

    async def settle(self, pid: int) -> None:
        """Adopt the session's sshd into the extern step before it runs on (the shim holds it
        until then): through slurmstepd where it answers, else by writing its cgroups."""
        s = self.slurm
        why = "the job has no extern step here (PrologFlags=Contain)"
        if s.extern and s.spool:
            try:
                await _stepd.adopt(s.spool, s.node, s.job_id, pid)
            except _stepd.StepdError as exc:
                why = str(exc)
            else:
                self.adopted_by = "slurmstepd"
                log.info("Slurm job %d: sshd %d adopted by slurmstepd", s.job_id, pid)
                return
        elif s.extern:
            why = "slurmd's spool directory is unknown"
        self._write_cgroups(pid)
        if s.cgroups:
            self.adopted_by = f"cgroup write ({why})"
            log.info("Slurm job %d: sshd %d adopted by cgroup write (%s)", s.job_id, pid, why)
        else:
            log.info("Slurm job %d: sshd %d tracked by the starter alone (%s)", s.job_id, pid, why)

    def _write_cgroups(self, pid: int) -> None:
        for d in self.slurm.cgroups:
            try:
                fd = os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("cannot adopt pid %d into %s: %s", pid, d, exc)
                continue
            try:
                os.write(fd, str(pid).encode())
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    log.warning("cannot adopt pid %d into %s: %s", pid, d, exc)
            finally:
                os.close(fd)

    def own_pids(self, main_pid: int, hidden: Iterable[int] = ()) -> list[int]:
        return list(self.slurm.pids)

    def all_pids(self) -> set[int]:
        # Only the sessions': the job's own processes are Slurm's to end.
        return _procs._descendants(self.leaders) | {p for p in self.leaders if _procs._alive(p)}

    def freeze(self, frozen: bool) -> None:
        return None


def tracking(cgroups: tuple[pathlib.Path, ...]) -> str:
    """How this node tracks session processes, for logs and ``stj status``."""
    if cgroups:
        return "slurm-cgroup"
    return "process-tree"


def make_job(slurm: SlurmJob, job: str, node: str) -> Job:
    """A ``Job`` for ``run_session``: the Slurm job's owner, environment and directory."""
    env = dict(slurm.env)
    env.update(
        {
            "SSH_TO_JOB_ID": job,
            "SSH_TO_JOB_IWD": slurm.workdir,
            "SSH_TO_JOB_SCRATCH_DIR": slurm.workdir,
            "SSH_TO_JOB_STARTER": node,
        }
    )
    try:
        pw = pwd.getpwuid(slurm.uid)
        groups = tuple(os.getgrouplist(pw.pw_name, slurm.gid))
        owner = pw.pw_name
    except KeyError:
        groups, owner = (slurm.gid,), str(slurm.uid)
    run = wire.JobRun(
        id=job,
        uid=slurm.uid,
        gid=slurm.gid,
        owner=owner,
        spec=wire.JobSpec(executable="(slurm)", initialdir=slurm.workdir),
    )
    workdir = pathlib.Path(slurm.workdir)
    plan = JobPlan(
        run=run,
        groups=groups,
        env=env,
        scratch=workdir,
        stdout_path=pathlib.Path("/dev/null"),
        stderr_path=pathlib.Path("/dev/null"),
        cgroup=None,
    )
    # Job updates belong to our own queue's jobs: the broker learns nothing from them here.
    j = Job(plan, lambda _msg: None, pid=slurm.anchor)
    j.group = SlurmGroup(slurm)
    return j


async def watch(job: Job, slurm: SlurmJob) -> None:
    """Until the Slurm job ends on this node (its anchor process is gone); then end every
    session into it. Runs as long as the job has sessions here."""
    try:
        fd = os.pidfd_open(slurm.anchor)
    except OSError:
        fd = -1
    try:
        if fd != -1:
            await trio.lowlevel.wait_readable(fd)
    finally:
        if fd != -1:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
    if not job.killed:
        log.info("Slurm job %s ended on this node: ending its sessions", slurm.job_id)
        job.kill("the Slurm job ended")


def check_node(slurm_conf: str) -> None:
    """At start in Slurm mode: Slurm's commands are here."""
    import shutil

    if shutil.which("scontrol", path=_slurm_env(slurm_conf)["PATH"]) is None:
        raise SystemExit("starter: backend = slurm needs Slurm's scontrol (slurm-client)")


#: slurmd's spool directory as slurm.conf spells it (``%n`` unexpanded), per slurm.conf path.
_spool_templates: dict[str, str] = {}


async def spool_template(slurm_conf: str) -> str:
    """``SlurmdSpoolDir`` (read once; ``node_tracking`` reads it at start), "" if unknown."""
    if slurm_conf not in _spool_templates:
        try:
            text = await scontrol(["show", "config"], slurm_conf)
        except NotHere:
            return ""
        _spool_templates[slurm_conf] = _config(text).get("SlurmdSpoolDir", "")
    return _spool_templates[slurm_conf]


def _config(text: str) -> dict[str, str]:
    conf = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    return conf


def node_tracking(slurm_conf: str) -> str:
    """At start in Slurm mode: how this node's sessions will be tracked, from Slurm's
    configuration (``scontrol show config``, once): "slurm-cgroup" where Slurm gives each job
    an extern step in a cgroup container (``proctrack/cgroup`` with ``PrologFlags=Contain``),
    else "process-tree" (the starter's own tracking); " via slurmstepd" is added where
    libslurm loads, so that sessions are adopted by the extern step's slurmstepd (and counted
    by Slurm's accounting). Each session's log line says what it really got."""
    import subprocess

    try:
        r = subprocess.run(
            ["scontrol", "show", "config"],
            capture_output=True,
            text=True,
            env=_slurm_env(slurm_conf),
            timeout=SCONTROL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("scontrol show config: %s; assuming process-tree tracking", exc)
        return "process-tree"
    conf = _config(r.stdout)
    if r.returncode == 0:
        _spool_templates[slurm_conf] = conf.get("SlurmdSpoolDir", "")
    contain = "contain" in conf.get("PrologFlags", "").lower().split(",")
    kind = "process-tree"
    if conf.get("ProctrackType") == "proctrack/cgroup" and contain:
        kind = "slurm-cgroup"
    if not contain:
        return kind
    # Loading libslurm here, once, also keeps cffi's start-up off the first session's path.
    if _stepd.available():
        return f"{kind} via slurmstepd"
    log.warning("sessions are adopted by writing cgroups: %s", _why_stepd())
    return kind


def _why_stepd() -> str:
    try:
        _stepd.load()
    except _stepd.StepdError as exc:
        return str(exc)
    return ""


async def serve_session(starter: Starter, job: str, session_id: str) -> None:
    """One session into the Slurm job ``job`` on this node; never raises."""
    cfg = starter.config.starter
    try:
        if cfg.backend != "slurm":
            raise NotHere(f"starter {starter.name} does not serve Slurm jobs ([starter] backend)")
        slurm = await locate(job, starter.name, cfg.slurm_conf)
    except NotHere as exc:
        log.info("session %s into %s refused: %s", session_id[:8], job, exc)
        starter.post(wire.SessionFailed(session_id=session_id, message=str(exc)))
        return
    target = make_job(slurm, job, starter.name)
    log.info(
        "session %s into Slurm job %d (uid %d), tracked by %s",
        session_id[:8],
        slurm.job_id,
        slurm.uid,
        tracking(slurm.cgroups),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, target, slurm)
        await run_session(starter, target, session_id)
        nursery.cancel_scope.cancel()
