"""Debug hold: a failed job submitted with --hold-on-failure stays for ssh-to-job to inspect."""

from __future__ import annotations

import pathlib
import time

from conftest import Pool, User

FAILING = "echo partial > result.txt; sleep 1000 & exit 3"


def _wait_reason(pool: Pool, job: str, text: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    info: dict[str, object] = {}
    while time.monotonic() < deadline:
        info = pool.job(job)
        if text in str(info.get("hold_reason", "")):
            return info
        time.sleep(0.1)
    raise AssertionError(f"job {job} never showed {text!r}: {info}\n{pool.log_text()}")


def test_failed_job_is_kept_and_can_be_entered(pool: Pool, users: dict[str, User]) -> None:
    """The failed job's files and leftover processes are there to inspect over ssh-to-job,
    and stj rm ends the hold, recording the job's exit code."""
    a = users["a"]
    (job,) = pool.submit(a, "--hold-on-failure", "/bin/sh", "-c", FAILING)
    info = _wait_reason(pool, job, "debug hold")
    assert info["state"] == "held"
    assert "exit status 3" in str(info["hold_reason"])
    r = pool.ssh(a, job, 'cat result.txt; echo "$SSH_TO_JOB_PIDS"; ps -o args= -p $SSH_TO_JOB_PIDS')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "partial"
    assert "sleep 1000" in r.stdout  # the failed job's leftover child, still there
    assert pool.stj(a, "rm", job).returncode == 0
    done = pool.wait_state(job, "removed")
    assert done["exit_code"] == 3
    r = pool.ssh(a, job, "true")
    assert r.returncode == 1
    assert "removed" in r.stderr


def test_release_ends_the_hold_and_reruns(pool: Pool, users: dict[str, User]) -> None:
    """stj release of a job in debug hold cleans it up and runs it again from the start."""
    a = users["a"]
    (job,) = pool.submit(a, "--hold-on-failure", "/bin/sh", "-c", FAILING)
    first = _wait_reason(pool, job, "debug hold")
    r = pool.stj(a, "release", job)
    assert "debug hold ended" in r.stdout
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = pool.job(job)
        if info["state"] == "held" and info["pids"] and info["pids"] != first["pids"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"job {job} did not run again: {pool.job(job)}")
    assert "debug hold" in str(info["hold_reason"])
    pool.stj(a, "rm", job)
    pool.wait_state(job, "removed")


def test_without_the_flag_a_failed_job_completes(pool: Pool, users: dict[str, User]) -> None:
    """Debug hold is opt-in: a plain failing job completes with its exit code."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sh", "-c", "exit 3")
    info = pool.wait_state(job, "completed")
    assert info["exit_code"] == 3
    r = pool.ssh(a, job, "true")
    assert r.returncode == 1
    assert "completed" in r.stderr


def test_release_right_after_hold_requeues_once_evicted(pool: Pool, users: dict[str, User]) -> None:
    """stj release straight after stj hold is accepted and the job runs again once evicted."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    first = pool.wait_state(job, "running")
    pool.stj(a, "hold", job)
    r = pool.stj(a, "release", job)
    assert "release done" in r.stdout
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = pool.job(job)
        if info["state"] == "running" and info["pids"] and info["pids"] != first["pids"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"job {job} did not run again: {pool.job(job)}")
    pool.stj(a, "rm", job)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _q_lines(pool: Pool, user: User, job: str) -> list[str]:
    lines = pool.stj(user, "q", "--nobatch", job).stdout.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith(job + " "))
    return [x.strip() for x in lines[at + 1 : -2]]


def test_debug_hold_ttl_time_left_and_expiry(pool: Pool, users: dict[str, User]) -> None:
    """--debug-on exit with a TTL: stj q shows the reason, the time left and the command to
    connect; after the TTL the hold reason says it expired and ssh-to-job refuses."""
    a = users["a"]
    (job,) = pool.submit(
        a, "--debug-on", "exit", "--debug-hold-ttl", "4s", "/bin/sh", "-c", FAILING
    )
    _wait_reason(pool, job, "debug hold")
    under = _q_lines(pool, a, job)
    assert under[0].startswith("hold reason: debug hold: the job failed with exit status 3")
    assert under[1].startswith("debug hold: "), under
    assert under[1].endswith(f"s left; connect: ssh-to-job {job}"), under
    assert pool.ssh(a, job, "cat result.txt").stdout == "partial\n"
    info = _wait_reason(pool, job, "debug hold expired after 4 s", timeout=30)
    assert info["state"] == "held"
    assert _q_lines(pool, a, job) == [f"hold reason: {info['hold_reason']}"]
    r = pool.ssh(a, job, "true")
    assert r.returncode == 1
    pool.stj(a, "rm", job)


def test_time_limit_ends_and_holds_the_job(pool: Pool, users: dict[str, User]) -> None:
    """--time-limit: a job still running at its limit is ended and held with the reason."""
    a = users["a"]
    (job,) = pool.submit(a, "--time-limit", "2s", "/bin/sleep", "1000")
    (pid,) = pool.wait_state(job, "running")["pids"]
    info = _wait_reason(pool, job, "time limit of 2 s exceeded", timeout=30)
    assert info["state"] == "held"
    assert not _alive(pid)
    pool.stj(a, "rm", job)


def test_debug_on_timeout_keeps_the_running_job(pool: Pool, users: dict[str, User]) -> None:
    """--debug-on timeout: at its limit the job is held with its processes still running,
    for ssh-to-job to look at (py-spy, gdb); stj rm ends it."""
    a = users["a"]
    (job,) = pool.submit(
        a, "--time-limit", "2s", "--debug-on", "timeout", "/bin/sh", "-c", "exec sleep 1000"
    )
    (pid,) = pool.wait_state(job, "running")["pids"]
    info = _wait_reason(pool, job, "ran past its time limit of 2 s", timeout=30)
    assert info["state"] == "held"
    assert _alive(pid)
    r = pool.ssh(a, job, 'echo "$SSH_TO_JOB_PIDS"')
    assert (r.returncode, r.stdout.split()) == (0, [str(pid)]), r
    pool.stj(a, "rm", job)
    pool.wait_state(job, "removed")
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_debug_on_chooses_which_failures_are_kept(pool: Pool, users: dict[str, User]) -> None:
    """--debug-on signal keeps a job killed by a signal, not one that exits non-zero."""
    a = users["a"]
    (exits,) = pool.submit(a, "--debug-on", "signal", "/bin/sh", "-c", "exit 3")
    (killed,) = pool.submit(a, "--debug-on", "signal", "/bin/sh", "-c", "kill -9 $$")
    done = pool.wait_state(exits, "completed")
    assert done["exit_code"] == 3
    info = _wait_reason(pool, killed, "debug hold: the job failed with signal 9")
    assert info["state"] == "held"
    pool.stj(a, "rm", killed)
    r = pool.stj(a, "submit", "--debug-on", "exit,bogus", "/bin/true", check=False)
    assert r.returncode == 2
    assert "debug_on takes exit, signal, timeout" in r.stderr
