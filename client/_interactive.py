"""``stj submit -i``: submit a job and step into it, as ``condor_submit -interactive`` does.

The job is a placeholder that only keeps a slot (``sleep``) in the job's uid, directory and
environment; the session is a real ``ssh-to-job`` session into it (a login shell, or the
given command). While the job waits for a slot, one status line says so; Ctrl-C there
removes it. When the session ends the job is removed, unless ``--keep`` (then it stays
running for later ``ssh-to-job`` sessions until ``stj rm``).
"""

from __future__ import annotations

import pathlib
import shlex
import signal
import subprocess
import sys
import time

from ssh_to_job import wire

from ._broker import BrokerClient, BrokerRefused, die, printable

#: The placeholder's command: it must outlive any session, so it sleeps "for ever" (68 years).
HOLDER = ("/bin/sleep", "2147483647")
POLL = 0.5


def _state(sock: pathlib.Path, job: str) -> wire.JobInfo | None:
    with BrokerClient(sock) as bc:
        got = bc.jobs(wire.Query(ids=(job,)))
    if isinstance(got, wire.Error):
        raise BrokerRefused(got)
    return got[0] if got else None


def _remove(sock: pathlib.Path, job: str, why: str) -> None:
    try:
        with BrokerClient(sock, timeout=10) as bc:
            bc.request(wire.Act(action="rm", ids=(job,), reason=why))
    except (OSError, ConnectionError, wire.ProtocolError):
        print(f"stj: could not remove job {job}; remove it with: stj rm {job}", file=sys.stderr)


def wait_running(sock: pathlib.Path, job: str) -> str | None:
    """Wait with a live status line until ``job`` runs; None when it does, else why not."""
    t0 = time.monotonic()
    tty = sys.stderr.isatty()
    shown = False
    try:
        while True:
            info = _state(sock, job)
            if info is None:
                return f"job {job} left the queue before it started"
            if info.state == "running" and info.pids:
                return None
            if info.state not in ("idle", "running"):
                reason = f" ({info.hold_reason})" if info.hold_reason else ""
                return f"job {job} is {info.state}{printable(reason)}"
            line = f"stj: job {job} is {info.state}; waited {int(time.monotonic() - t0)} s"
            if tty:
                print(f"\r{line} (Ctrl-C removes it)", end="", file=sys.stderr, flush=True)
                shown = True
            elif not shown:
                print(line, file=sys.stderr, flush=True)
                shown = True
            time.sleep(POLL)
    finally:
        if shown and tty:
            print(file=sys.stderr, flush=True)


def enter(
    sock: pathlib.Path, cluster: int, command: list[str], keep: bool, ssh_args: list[str]
) -> int:
    """Wait for job ``cluster``.0 to run, open a session into it, and clean up afterwards."""
    job = f"{cluster}.0"
    try:
        why = wait_running(sock, job)
    except KeyboardInterrupt:
        _remove(sock, job, "stj submit -i: interrupted while waiting")
        return die(f"interrupted; job {job} removed", 130)
    if why is not None:
        if not keep:
            _remove(sock, job, "stj submit -i: it did not start")
        return die(why)
    argv = [sys.executable, "-P", "-m", "ssh_to_job.client.ssh_to_job", "-name", str(sock)]
    # The command is an argv, as for a submitted job: quote it for the remote shell.
    argv += [*ssh_args, job, *([shlex.join(command)] if command else [])]
    # The session owns the terminal: our Ctrl-C goes to it, not to us.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = subprocess.call(argv, preexec_fn=_default_sigint)
    finally:
        signal.signal(signal.SIGINT, old)
    if keep:
        print(f"stj: job {job} keeps running (--keep); end it with: stj rm {job}", file=sys.stderr)
    else:
        _remove(sock, job, "stj submit -i: the session ended")
    return rc


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def holder_spec(spec: wire.JobSpec) -> wire.JobSpec:
    """The placeholder job for -i, keeping the user's environment and directory."""
    import attrs

    return attrs.evolve(spec, executable=HOLDER[0], args=HOLDER[1:])
