"""Debug hold: a failed job submitted with --hold-on-failure stays for ssh-to-job to inspect."""

from __future__ import annotations

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
