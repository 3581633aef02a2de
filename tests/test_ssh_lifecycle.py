"""Lifecycle promises of a session: its key files go with it however it ends, it ends with its
job (rm, hold, the grace after the main process), and it keeps a finished job alive until it
closes.

Real processes: pools of their own, real ``ssh-to-job``/ssh/sshd, real uids. Helpers and fixtures
(``Live`` sessions, deadlines) come from the security tests.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Pool, User, new_state_dir, session_entries
from test_ssh_security import (
    IO_TIMEOUT,
    Live,
    _close_sockets,
    _deadline,
    comm,
    descendants,
    run_job,
    sessions_dir,
    user_tmp,
)

# The fixtures pytest finds here by name: the autouse deadline and socket clean-up, the job
# and $TMPDIR helpers.
__all__ = ["_close_sockets", "_deadline", "run_job", "user_tmp"]


def assert_private(path: pathlib.Path, mode: int, uid: int) -> None:
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == mode, f"{path} is {oct(st.st_mode)}"
    assert st.st_uid == uid, f"{path} belongs to uid {st.st_uid}"


def wait_gone(path: pathlib.Path, timeout: float = 10) -> float:
    """Seconds until ``path`` no longer exists (fails after ``timeout``)."""
    start = time.monotonic()
    while path.exists():
        assert time.monotonic() - start < timeout, f"{path} still exists after {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def alive(pid: int) -> bool:
    """Running (an orphan's zombie counts as gone: nobody here may reap it)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] != b"Z"


def wait_pid_gone(pid: int, timeout: float = 15) -> float:
    """The monotonic time at which process ``pid`` was seen gone."""
    wait_gone(pathlib.Path(f"/proc/{pid}"), timeout)
    return time.monotonic()


def wait_sessions(pool: Pool, job: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pool.job(job)["sessions"] != count:
        assert time.monotonic() < deadline, (
            f"stj q never showed {count} session(s): {pool.job(job)}"
        )
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["exit", "SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"])
def test_no_key_file_outlives_its_session(
    pool: Pool,
    users: dict[str, User],
    run_job: Callable[..., str],
    user_tmp: Callable[[User], pathlib.Path],
    ending: str,
) -> None:
    """Session key files are 0600 in 0700 dirs on both sides, and gone however the client ends."""
    a = users["a"]
    job = run_job(a, "/bin/sleep", "300")
    tmp = user_tmp(a)
    # The command ends by itself where nothing else would end the session: a normal exit, and
    # SIGKILL of ssh-to-job, which leaves ssh (the session's owner) running on.
    seconds = {"exit": 1, "SIGKILL": 2}.get(ending, 30)
    live = Live(pool, a, job, tmp, f"echo ready; exec sleep {seconds}")
    try:
        base = tmp / f"ssh-to-job-{a.uid}"
        for d in (base, live.client_dir, live.starter_dir):
            assert_private(d, 0o700, a.uid)
        for name in ("id", "known_hosts", "config"):
            assert_private(live.client_dir / name, 0o600, a.uid)
        for name in ("host_key", "authorized_keys", "sshd_config"):
            assert_private(live.starter_dir / name, 0o600, a.uid)
        assert stat.S_IMODE(os.stat(sessions_dir(pool)).st_mode) == 0o711
        (ssh,) = [p for p in descendants({live.proc.pid}) if comm(p) == "ssh"]
        if ending == "SIGINT":
            # Ctrl-C at a terminal: the whole foreground group (ssh-to-job, ssh) gets it.
            os.killpg(live.proc.pid, signal.SIGINT)
        elif ending != "exit":
            # Sent to ssh-to-job alone (a closed terminal, kill, a crash).
            os.kill(live.proc.pid, getattr(signal, ending))
        rc = live.proc.wait(timeout=IO_TIMEOUT)
        if ending == "SIGKILL":
            assert alive(ssh), "ssh died with ssh-to-job: was a Python process in the data path?"
            deadline = time.monotonic() + IO_TIMEOUT
            while alive(ssh):
                assert time.monotonic() < deadline, "ssh did not end with its remote command"
                time.sleep(0.05)
        _out, err = live.proc.communicate(timeout=IO_TIMEOUT)
        assert (rc == 0) == (ending == "exit"), (rc, err)
        wait_gone(live.starter_dir)
        if ending == "SIGKILL":
            assert live.client_dir.exists(), "nothing was left to sweep?"
            # The next ssh-to-job run sweeps what a killed one left behind.
            r = pool.ssh(a, job, "true", env={"TMPDIR": str(tmp)}, timeout=IO_TIMEOUT)
            assert r.returncode == 0, r.stderr
        assert session_entries(base) == []
    finally:
        live.stop()
        if ending == "SIGKILL" and alive(ssh):
            os.kill(ssh, signal.SIGKILL)


@pytest.fixture(scope="module")
def pool_without_cgroups(users: dict[str, User]) -> Iterator[Pool]:
    """A pool whose starter tracks job processes through /proc instead of cgroups."""
    su = users["su"].name
    p = Pool(new_state_dir(), f'[broker]\nsuperusers = ["{su}"]\n[starter]\nuse_cgroups = false\n')
    p.start()
    yield p
    p.stop()
    shutil.rmtree(p.state, ignore_errors=True)


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "no-cgroups"])
@pytest.mark.parametrize(("action", "state"), [("rm", "removed"), ("hold", "held")])
def test_session_ends_with_its_job(
    request: pytest.FixtureRequest,
    users: dict[str, User],
    user_tmp: Callable[[User], pathlib.Path],
    action: str,
    state: str,
    cgroups: bool,
) -> None:
    """``stj rm`` and ``stj hold`` end the job's open session promptly; ssh exits non-zero."""
    a = users["a"]
    pool: Pool = request.getfixturevalue("pool" if cgroups else "pool_without_cgroups")
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    live = Live(pool, a, job, user_tmp(a), "echo ready; exec sleep 60")
    try:
        start = time.monotonic()
        pool.stj(a, action, job)
        _out, err = live.proc.communicate(timeout=IO_TIMEOUT)
        assert time.monotonic() - start < 5, "the session outlived its job by seconds"
        assert live.proc.returncode != 0, err
        wait_gone(live.starter_dir)
        assert not live.client_dir.exists()
        pool.wait_state(job, state)
    finally:
        live.stop()
        pool.stj(a, "rm", job, check=False)


def test_session_keeps_a_finished_job_until_it_closes(
    pool: Pool,
    users: dict[str, User],
    run_job: Callable[..., str],
    user_tmp: Callable[[User], pathlib.Path],
) -> None:
    """After the main process exits, the open session goes on; when it closes the job completes
    with the main process's exit code."""
    a = users["a"]
    job = run_job(a, "/bin/sh", "-c", "sleep 3; exit 7")
    main_pid = pool.job(job)["pids"][0]
    live = Live(pool, a, job, user_tmp(a), 'echo ready; read x; echo "bye $x"')
    try:
        wait_sessions(pool, job, 1)
        wait_pid_gone(main_pid)
        time.sleep(1.0)
        info = pool.job(job)
        assert (info["state"], info["sessions"]) == ("running", 1), info
        # The job takes no new sessions once its main process is gone.
        r = pool.ssh(a, job, "true", timeout=IO_TIMEOUT)
        assert r.returncode == 1, r.stderr
        assert "not running" in r.stderr
        out, err = live.proc.communicate(b"still here\n", timeout=IO_TIMEOUT)
        assert live.proc.returncode == 0, err
        assert out == b"bye still here\n"
        done = pool.wait_state(job, "completed")
        assert (done["exit_code"], done["exit_signal"]) == (7, None), done
    finally:
        live.stop()


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "no-cgroups"])
def test_session_grace_cuts_sessions_of_a_finished_job(
    make_pool: Callable[..., Pool],
    users: dict[str, User],
    user_tmp: Callable[[User], pathlib.Path],
    cgroups: bool,
) -> None:
    """With ``[starter] session_grace = 2``, a session outliving the main process is cut ~2 s
    after it exits, and the job completes with the main process's exit code."""
    a = users["a"]
    extra = "" if cgroups else "use_cgroups = false\n"
    grace_pool = make_pool("[starter]\nsession_grace = 2\n" + extra)
    (job,) = grace_pool.submit(a, "/bin/sh", "-c", "sleep 2; exit 3")
    main_pid = grace_pool.wait_state(job, "running")["pids"][0]
    live = Live(grace_pool, a, job, user_tmp(a), "echo ready; exec sleep 60")
    try:
        exited = wait_pid_gone(main_pid)
        _out, err = live.proc.communicate(timeout=IO_TIMEOUT)
        cut_after = time.monotonic() - exited
        assert live.proc.returncode != 0, err
        assert 1.5 <= cut_after <= 6, f"session cut {cut_after:.1f} s after the main process ended"
        wait_gone(live.starter_dir)
        done = grace_pool.wait_state(job, "completed")
        assert (done["exit_code"], done["exit_signal"]) == (3, None), done
    finally:
        live.stop()
