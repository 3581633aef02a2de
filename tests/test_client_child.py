"""ssh-to-job starts ssh with os.posix_spawnp (client.ssh_to_job.Child), not subprocess: the
child must see what a subprocess.Popen child saw (descriptors, ignored signals, environment,
exit status)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from types import FrameType

import pytest

from ssh_to_job.client.ssh_to_job import Child

#: What the child reports: its open descriptors, its ignored-signal mask, one variable.
PROBE = (
    'ls /proc/self/fd | sort -n | tr "\\n" " "; grep SigIgn /proc/self/status; echo "$PROBE_VAR"'
)


def test_child_sees_what_a_popen_child_saw(tmp_path: pathlib.Path) -> None:
    """Same descriptors (an inheritable one of ours is closed, as close_fds did), the same
    ignored signals (SIGPIPE is the default again, as restore_signals did), the given env."""
    r, w = os.pipe()
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    out = tmp_path / "out"
    try:
        env = {**os.environ, "PROBE_VAR": "given"}
        with open(out, "wb") as f:
            popen = subprocess.run(["sh", "-c", PROBE], stdout=f, env=env, check=True)
        assert popen.returncode == 0
        want = out.read_text()
        saved = os.dup(1)
        try:
            fd = os.open(out, os.O_WRONLY | os.O_TRUNC)
            os.dup2(fd, 1)
            os.close(fd)
            child = Child(["sh", "-c", PROBE], env)
            assert child.wait() == 0
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        got = out.read_text()
    finally:
        for fd in (r, w, inherited):
            os.close(fd)
    fds, got_ignored, var = parse(got)
    assert (fds, var) == parse(want)[::2]
    assert var == "given"
    # glibc's posix_spawn leaves its two internal signals (32, 33: thread cancellation and
    # setxid, which no program can catch or send by number) ignored; glibc in the new
    # program installs its handlers for them when it needs them. Every other one as Popen's.
    assert got_ignored & ~GLIBC_INTERNAL == parse(want)[1] & ~GLIBC_INTERNAL
    assert not got_ignored & (1 << (signal.SIGPIPE - 1))


#: The ignored-signal bits of glibc's internal signals 32 and 33.
GLIBC_INTERNAL = (1 << 31) | (1 << 32)


def parse(report: str) -> tuple[str, int, str]:
    fds, rest = report.split("SigIgn:")
    mask, var = rest.split()
    return fds.strip(), int(mask, 16), var


def test_child_exit_status_and_signals() -> None:
    """wait() and poll() give Popen's returncode: the exit status, or minus the signal."""
    assert Child(["sh", "-c", "exit 3"]).wait() == 3
    child = Child(["sleep", "30"])
    assert child.poll() is None
    child.send_signal(signal.SIGTERM)
    assert child.wait() == -signal.SIGTERM
    child.send_signal(signal.SIGTERM)  # already reaped: nothing to signal, no error


def test_missing_program_raises_oserror() -> None:
    """A program that does not exist is an OSError at start, as with Popen (die says so)."""
    with pytest.raises(FileNotFoundError):
        Child(["/nonexistent/ssh-to-job-test-program"])


def test_python_ignores_sigpipe_here() -> None:
    """The premise of the restore: this interpreter ignores SIGPIPE (so would ssh, unrestored)."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN, sys.version


def test_exit_now_flushes_and_exits_with_the_code() -> None:
    """exit_now(code) ends the process with that status after what was printed is out."""
    code = (
        "import sys; from ssh_to_job.client.ssh_to_job import exit_now; "
        "print('out', end=''); print('err', end='', file=sys.stderr); exit_now(3)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")


def test_the_entry_point_ends_without_the_interpreters_teardown() -> None:
    """ssh-to-job-py's main (client._mux.main) leaves through exit_now: its output and status
    arrive, and the teardown (here an atexit hook standing for it) never runs."""
    code = (
        "import atexit, sys; atexit.register(print, 'teardown ran'); "
        "from ssh_to_job.client._mux import main; "
        "sys.argv = ['ssh-to-job-py', '-version']; sys.exit(main())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r
    assert r.stdout.startswith("ssh-to-job "), r
    assert "teardown ran" not in r.stdout + r.stderr


def test_wait_survives_a_signal_handler_that_reaped_the_child(tmp_path: pathlib.Path) -> None:
    """A signal handler that polls the child (as -remove-on-interrupt's Ctrl-C does, to pass the
    signal on) can reap it while wait() blocks in waitpid; wait() then returns the status the
    handler read instead of failing with "No child processes", and no signal is sent to the
    reaped pid."""
    child: Child | None = None
    sent: list[int] = []
    frames: list[str] = []
    go = tmp_path / "go"

    def handler(_sig: int, frame: FrameType | None) -> None:
        assert child is not None
        frames.append(frame.f_code.co_name if frame is not None else "")
        go.touch()  # lets the child exit, now that wait() is blocked
        # Until the child is a zombie, so that this poll reaps it, not the retried waitpid.
        for _ in range(2000):
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.001)
        child.send_signal(signal.SIGTERM)
        sent.append(child.returncode if child.returncode is not None else -999)

    # The child signals only once its parent sleeps in waitpid (wchan do_wait), and exits only
    # after the handler began, so the handler always runs inside wait() with the child alive.
    script = (
        'i=0; while [ $i -lt 2000 ] && [ "$(cat /proc/$PPID/wchan)" != do_wait ]; do'
        ' i=$((i+1)); sleep 0.005; done; kill -USR1 "$PPID"; i=0;'
        ' while [ $i -lt 2000 ] && [ ! -e "$1" ]; do i=$((i+1)); sleep 0.005; done; exit 3'
    )
    old = signal.signal(signal.SIGUSR1, handler)
    try:
        child = Child(["sh", "-c", script, "sh", str(go)])
        assert child.wait() == 3
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert frames == ["wait"]
    assert sent == [3]
