"""Persistent terminals (``ssh-to-job --persist``): one tmux server per job, run as the job.

The server is started by the starter, not by a session's sshd: as the job's uid and groups, with
the job's environment and working directory, in the job's cgroup (or, without cgroups, counted
among the job's own processes: ``SSH_TO_JOB_PIDS`` lists it and killing the job kills it). So it
outlives the ssh session that asked for it (a session's processes are killed when it ends) and
dies with the job. Its socket is in a 0700 directory of the job's scratch dir, never the user's
shared ``/tmp/tmux-UID``; sessions find it in ``SSH_TO_JOB_TMUX``.

Must never: run tmux as root or in a session's cgroup; touch, as root, anything inside the
job's scratch dir (its uid owns it and may have put a symlink anywhere there: the directory is
made by the job's uid itself).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

import trio

from . import _procs

if TYPE_CHECKING:
    from ._daemon import Starter
    from ._jobs import Job

log = logging.getLogger("stj.starter")

#: tmux target names: no '.', ':' or '=' (tmux's target syntax), nothing a shell would expand.
NAME = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
#: Under the job's scratch dir, made 0700 by the job's uid.
SOCKET_DIR = ".ssh-to-job-tmux"
#: Seconds for the server to come up, and for one tmux command.
TIMEOUT = 10.0
_TMUX_PATH = "/usr/local/bin:/usr/bin:/bin"

#: The running server of each job (the starter's child until the job ends), and a lock per job
#: so two first sessions do not start two servers on one socket.
_servers: dict[Job, trio.Process] = {}
_locks: dict[Job, trio.Lock] = {}


class PersistError(Exception):
    """The persistent terminal cannot be had; the message goes to the client."""


def socket_path(job: Job) -> pathlib.Path:
    return job.plan.scratch / SOCKET_DIR / "server"


def _env(job: Job, shell: str, sock: pathlib.Path) -> dict[str, str]:
    env = dict(job.plan.env)
    env.pop("TMUX", None)
    # tmux's default-shell is $SHELL: the same shell a plain session of this job gets.
    env.update(SHELL=shell, SSH_TO_JOB_TMUX=str(sock))
    env.setdefault("TERM", "xterm-256color")
    return env


async def ensure(starter: Starter, job: Job, name: str, shell: str) -> pathlib.Path:
    """Have tmux session ``name`` exist in the job's server (starting it first if needed);
    the server's socket path."""
    if not NAME.match(name):
        raise PersistError(f"bad persistent terminal name {name!r} (letters, digits, _ and -)")
    tmux = shutil.which("tmux", path=_TMUX_PATH)
    if tmux is None:
        raise PersistError("tmux is not installed on this execute host")
    sock = socket_path(job)
    if len(os.fsencode(sock)) > 100:
        raise PersistError(
            f"the tmux socket path {sock} is too long for a unix socket; "
            "the pool admin can set a shorter [starter] execute_dir"
        )
    env = _env(job, shell, sock)
    lock = _locks.setdefault(job, trio.Lock())
    async with lock:
        if job.killed:
            raise PersistError(f"job {job.id} is being removed ({job.killed})")
        proc = _servers.get(job)
        # Not ours but answering: started for the job by an earlier starter process (the job
        # outlived its restart, and so did the server, in the job's cgroup).
        if (proc is None or proc.returncode is not None) and not await _tmux(
            job, env, [tmux, "-N", "-S", str(sock), "start-server"]
        ):
            await _start_server(starter, job, tmux, sock, env)
        # -N everywhere: a tmux client must never start a server of its own (outside the job).
        if await _tmux(job, env, [tmux, "-N", "-S", str(sock), "has-session", "-t", f"={name}"]):
            return sock
        # The new session's shell is the server's child: in the job, not in this session.
        new = [tmux, "-N", "-S", str(sock), "new-session", "-d", "-s", name]
        if not await _tmux(job, env, new):
            raise PersistError(f"tmux could not create session {name!r} in job {job.id}")
    log.info("job %s: persistent terminal %r created", job.id, name)
    return sock


async def _start_server(
    starter: Starter, job: Job, tmux: str, sock: pathlib.Path, env: dict[str, str]
) -> None:
    run = job.plan.run
    # The job's uid makes the directory (see the module docstring); then the same process
    # becomes the server (exec), so its pid is the one we count and reap.
    script = 'umask 077 && mkdir -p -- "$1" && chmod 0700 -- "$1" && exec "$2" -D -S "$3"'
    proc = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", script, "sh", str(sock.parent), tmux, str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=str(job.plan.scratch),
        preexec_fn=_procs.make_preexec(run.uid, run.gid, list(job.plan.groups), job.group.cgroup),
    )
    job.group.add_member(proc.pid)
    _servers[job] = proc
    starter.jobs_nursery.start_soon(_reap, job, proc)
    if job.killed:
        # The group kill that ends the job may have run just before this server joined it.
        proc.kill()
        raise PersistError(f"job {job.id} is being removed ({job.killed})")
    with trio.move_on_after(TIMEOUT):
        while proc.returncode is None:
            if await _tmux(job, env, [tmux, "-N", "-S", str(sock), "start-server"]):
                return
            await trio.sleep(0.02)
    raise PersistError(f"the tmux server of job {job.id} did not start")


async def _reap(job: Job, proc: trio.Process) -> None:
    try:
        await proc.wait()
    finally:
        # Reaped (or the starter is leaving): the pid may be anyone's from now on.
        job.group.release_member(proc.pid)
        if _servers.get(job) is proc:
            del _servers[job]
            _locks.pop(job, None)


async def _tmux(job: Job, env: dict[str, str], argv: list[str]) -> bool:
    """Run one tmux client command as the job's uid: whether it succeeded."""
    run = job.plan.run
    with trio.move_on_after(TIMEOUT):
        r = await trio.run_process(
            argv,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            cwd=str(job.plan.scratch),
            preexec_fn=_procs.make_preexec(run.uid, run.gid, list(job.plan.groups), None),
        )
        return r.returncode == 0
    raise PersistError(f"tmux did not answer within {TIMEOUT:.0f} s")
