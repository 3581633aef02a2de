"""stj pool supervises its daemons: a dead one is restarted, the pool's own death takes both
down, and a second pool on the same state directory is refused."""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import signal
import tempfile
import time
from collections.abc import Callable

from conftest import ROOT, STJ, Pool, User, wait_for


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def dead(pid: int) -> bool:
    return not alive(pid)


def test_a_killed_starter_is_restarted(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """SIGKILL of the starter: stj pool says why and starts a new one, which serves again."""
    pool = make_pool()
    pool.wait_for_starter()
    (old,) = pool.pids("starter")
    os.kill(old, signal.SIGKILL)
    new = wait_for("a new starter", lambda: [p for p in pool.pids("starter") if p != old], 15)
    assert len(new) == 1
    pool.wait_for_starter()
    assert f"the starter (pid {old}) exited with signal 9; restarting" in pool.log_text()
    (job,) = pool.submit(users["a"], "/bin/true")
    assert pool.wait_state(job, "completed")["exit_code"] == 0
    assert pool.proc is not None
    assert pool.proc.poll() is None


def test_a_killed_broker_is_restarted(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """SIGKILL of the broker: a new one runs within seconds and the starter finds it."""
    pool = make_pool("[starter]\nreconnect_max = 0.3\n")
    pool.wait_for_starter()
    (old,) = pool.pids("broker")
    os.kill(old, signal.SIGKILL)
    wait_for("a new broker", lambda: [p for p in pool.pids("broker") if p != old], 15)
    pool.wait_for_starter()
    (job,) = pool.submit(users["a"], "/bin/true")
    assert pool.wait_state(job, "completed")["exit_code"] == 0


def test_the_pools_death_takes_its_daemons_down(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """SIGKILL of stj pool itself leaves no broker or starter running unsupervised; the job
    keeps running and the next stj pool on the state directory takes it back, same process."""
    pool = make_pool()
    (job,) = pool.submit(users["a"], "/bin/sleep", "300")
    (job_pid,) = pool.wait_state(job, "running")["pids"]
    daemons = pool.pids("broker") + pool.pids("starter")
    assert len(daemons) == 2
    assert pool.proc is not None
    os.kill(pool.proc.pid, signal.SIGKILL)
    pool.proc.wait(5)
    for pid in daemons:
        wait_for(f"pid {pid} to end with its pool", functools.partial(dead, pid), 20)
    assert alive(job_pid)
    pool.start()
    pool.wait_for_starter()
    info = pool.wait_state(job, "running")
    assert info["pids"] == [job_pid]
    pool.stj(users["a"], "rm", job)
    wait_for("the job to end", functools.partial(dead, job_pid), 20)


def test_a_second_pool_on_the_same_state_is_refused(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """A second stj pool exits at once, naming the running one; the first keeps its daemons."""
    pool = make_pool()
    pool.wait_for_starter()
    before = pool.pids("broker") + pool.pids("starter")
    assert pool.proc is not None
    t0 = time.monotonic()
    r = pool.run(
        ROOT,
        [STJ, "pool", "--state-dir", str(pool.state), "--config", str(pool.config_path)],
        timeout=30,
    )
    assert time.monotonic() - t0 < 10
    assert r.returncode == 1, r
    assert f"stj pool pid {pool.proc.pid}" in r.stderr, r.stderr
    assert pool.pids("broker") + pool.pids("starter") == before
    pool.wait_for_starter()


def test_a_state_dir_that_cannot_be_made_is_one_line(pool: Pool, users: dict[str, User]) -> None:
    """stj pool with a --state-dir under a directory the user cannot write: one line, exit 1."""
    r = pool.run(users["a"], [STJ, "pool", "--state-dir", "/root/nope/state"], timeout=30)
    assert r.returncode == 1, r
    assert "Permission denied" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not pathlib.Path("/root/nope").exists()


def test_daemons_log_to_files_by_config(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """With log_file set, the broker and the starter append their logs there, not to stderr;
    a log file that cannot be opened stops a daemon with one line."""
    logs = pathlib.Path(tempfile.mkdtemp(prefix="stjlogs-", dir="/tmp"))
    try:
        pool = make_pool(
            f'log_file = "{logs}/broker.log"\n[starter]\nlog_file = "{logs}/starter.log"\n'
        )
        pool.wait_for_starter()
        (job,) = pool.submit(users["a"], "/bin/true")
        pool.wait_state(job, "completed")
        broker_log = (logs / "broker.log").read_text()
        starter_log = (logs / "starter.log").read_text()
        assert "stj.broker INFO broker listening" in broker_log
        assert f"job {job} started as pid" in starter_log
        assert "broker listening" not in pool.log_text()
        bad = pool.state / "bad.toml"
        bad.write_text('[broker]\nlog_file = "/nonexistent-dir/x.log"\n')
        argv = [STJ, "broker", "--state-dir", str(pool.state / "other"), "--config", str(bad)]
        r = pool.run(ROOT, argv, timeout=30)
        assert r.returncode == 1, r
        assert "cannot open the log file" in r.stderr
    finally:
        shutil.rmtree(logs, ignore_errors=True)
