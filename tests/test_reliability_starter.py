"""The starter's side of a pool that never loses, duplicates or wedges a job (issue 9), with real
processes: one starter per state dir, jobs that survive a SIGKILLed starter and are taken back
by the next one, and sessions that leave nothing behind when their client is interrupted."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import SSH_TO_JOB, Pool, User, wait_for

from ssh_to_job import common

PYTHON = str(pathlib.Path(sys.executable))


def _starter_argv(pool: Pool) -> list[str]:
    # The same command line stj pool uses, so Pool.pids('starter') and Pool.stop() see it.
    return [
        PYTHON,
        "-P",
        "-m",
        "ssh_to_job.starter",
        "--state-dir",
        str(pool.state),
        "--config",
        str(pool.config_path),
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: it only waits to be reaped.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def _start_starter(pool: Pool) -> None:
    """Let the paused ``stj pool`` run again: it sees its starter gone and starts a new one."""
    assert pool.proc is not None
    old = pool.pids("starter")
    os.kill(pool.proc.pid, signal.SIGCONT)
    wait_for(
        "stj pool to start a new starter", lambda: [p for p in pool.pids("starter") if p not in old]
    )


def _orphan_daemons(pool: Pool) -> None:
    """Pause the ``stj pool`` supervisor (SIGSTOP) so that it does not restart the starter
    while the test wants it down; _start_starter lets it go on."""
    assert pool.proc is not None
    os.kill(pool.proc.pid, signal.SIGSTOP)


def _kill_starter(pool: Pool) -> int:
    [pid] = pool.pids("starter")
    os.kill(pid, signal.SIGKILL)
    wait_for("the starter's death", lambda: not _alive(pid))
    return pid


def _cgroup_bases(pool: Pool) -> list[pathlib.Path]:
    """This pool's starter's cgroup base(s) (named after its key, like the starter does)."""
    seed = common.load_or_create_key(pool.state / "keys" / "starter.key")
    name = f"ssh-to-job-{common.public_hex(seed)[:16]}"
    return list(pathlib.Path("/sys/fs/cgroup").glob(f"**/{name}"))


def _job_dir(user: User) -> pathlib.Path:
    d = pathlib.Path(f"/tmp/stjt-runs-{os.getpid()}-{time.monotonic_ns()}")
    d.mkdir(mode=0o700)
    os.chown(d, user.uid, user.gid)
    return d


def test_a_second_starter_on_a_state_dir_exits_at_once(make_pool: Any) -> None:
    """A starter started on a state dir whose starter is running exits 1 at once, naming the
    running one's pid; the running one goes on serving."""
    pool = make_pool()
    [running] = pool.pids("starter")
    started = time.monotonic()
    r = subprocess.run(
        _starter_argv(pool), capture_output=True, text=True, timeout=30, env=pool.env(pool_root())
    )
    assert r.returncode == 1, r.stderr
    assert f"another starter (pid {running}) is running" in r.stderr
    assert time.monotonic() - started < 10
    assert pool.pids("starter") == [running]
    pool.wait_for_starter()


def pool_root() -> User:
    return User("root", 0, 0, "/root")


@pytest.mark.parametrize(
    "config", ["", "[starter]\nuse_cgroups = false\n"], ids=["cgroups", "no-cgroups"]
)
def test_jobs_survive_a_sigkilled_starter(
    make_pool: Any, users: dict[str, User], config: str
) -> None:
    """After a SIGKILL of the starter, the next starter takes back the running job (same pid,
    still running in stj q, still removable), records once the exit code of a job that ended
    while no starter was up, and runs no job twice (with cgroups and without)."""
    pool = make_pool(config)
    a = users["a"]
    runs = _job_dir(a)
    log, flag = runs / "runs.log", runs / "flag"
    try:
        # Each job appends its pid to a log only it writes: a second run would add a line.
        [long] = pool.submit(a, "/bin/sh", "-c", f"echo long $$ >> {log}; exec sleep 1000")
        [short] = pool.submit(
            a,
            "/bin/sh",
            "-c",
            f"echo short $$ >> {log}; while [ ! -e {flag} ]; do sleep 0.05; done; exit 7",
        )
        long_pid = pool.wait_state(long, "running")["pids"][0]
        short_pid = pool.wait_state(short, "running")["pids"][0]
        _orphan_daemons(pool)
        _kill_starter(pool)
        # While no starter runs: the short job ends, the long one goes on.
        flag.touch()
        os.chown(flag, a.uid, a.gid)
        wait_for("the short job's end", lambda: not _alive(short_pid))
        assert _alive(long_pid)
        _start_starter(pool)
        done = wait_for(
            "the short job's exit in history",
            lambda: (
                pool.jobs(history=True).get(short, {}).get("state") == "completed"
                and pool.jobs(history=True)[short]
            ),
            timeout=30,
        )
        assert done["exit_code"] == 7
        row = pool.wait_state(long, "running")
        assert row["pids"][0] == long_pid
        assert _alive(long_pid)
        assert sorted(log.read_text().split("\n")) == sorted(
            ["", f"long {long_pid}", f"short {short_pid}"]
        )
        history = [j for j in pool.jobs(history=True).values() if j["id"] == short]
        assert len(history) == 1
        # The new starter controls the job it took back.
        pool.stj(a, "rm", long)
        wait_for("the long job's end", lambda: not _alive(long_pid), timeout=20)
        time.sleep(1)  # a rerun would have appended to the log by now
        assert len(log.read_text().split()) == 4
    finally:
        subprocess.run(["rm", "-rf", str(runs)], check=False)


def test_keep_jobs_on_stop_leaves_jobs_to_the_next_starter(
    make_pool: Any, users: dict[str, User]
) -> None:
    """With keep_jobs_on_stop, a SIGTERMed starter leaves its job running, and the next
    starter takes it back."""
    pool = make_pool("[starter]\nkeep_jobs_on_stop = true\n")
    a = users["a"]
    [job] = pool.submit(a, "/bin/sleep", "1000")
    pid = pool.wait_state(job, "running")["pids"][0]
    _orphan_daemons(pool)
    [starter] = pool.pids("starter")
    os.kill(starter, signal.SIGTERM)
    wait_for("the starter's exit", lambda: not _alive(starter))
    assert _alive(pid)
    _start_starter(pool)
    pool.wait_for_starter()
    row = pool.wait_state(job, "running")
    assert row["pids"][0] == pid
    pool.stj(a, "rm", job)
    wait_for("the job's end", lambda: not _alive(pid))


def test_an_interrupted_client_leaves_no_session_behind(
    make_pool: Any, users: dict[str, User]
) -> None:
    """When a remote command's client is killed, its command, session dir and session cgroup
    are gone within session_end_grace (and a little), while the job runs on."""
    pool = make_pool("[starter]\nsession_end_grace = 1.0\n")
    a = users["a"]
    [job] = pool.submit(a, "/bin/sleep", "1000")
    job_pid = pool.wait_state(job, "running")["pids"][0]
    marker = f"{4000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    client = subprocess.Popen(
        [*a.prefix(), SSH_TO_JOB, job, f"exec sleep {marker}"],
        env=pool.env(a),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def remote() -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    sessions = pool.state / "execute" / ".sessions"
    try:
        [cmd] = wait_for("the remote command", remote, timeout=30)
        assert list(sessions.iterdir())
        cgroups = [p for base in _cgroup_bases(pool) for p in base.glob("job-*/session-*")]
        assert cgroups or not _cgroup_bases(pool)  # with cgroups, the session has its own
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()
        wait_for("the remote command's end", lambda: not _alive(cmd), timeout=15)
        wait_for("the session dir's removal", lambda: not list(sessions.iterdir()), timeout=15)
        wait_for(
            "the session cgroup's removal",
            lambda: not any(p.exists() for p in cgroups),
            timeout=15,
        )
        assert _alive(job_pid)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()


def test_a_job_owner_racing_the_cleanup_leaves_no_session_dir(
    make_pool: Any, users: dict[str, User]
) -> None:
    """A process of the job's owner that keeps creating files inside a session dir (through
    a directory it holds open) cannot keep the starter from removing that dir."""
    pool = make_pool()
    a = users["a"]
    [job] = pool.submit(a, "/bin/sleep", "1000")
    pool.wait_state(job, "running")
    sessions = pool.state / "execute" / ".sessions"
    client = subprocess.Popen(
        [
            *a.prefix(),
            SSH_TO_JOB,
            job,
            'echo "$SSH_TO_JOB_SESSION"; sleep 3',
        ],
        env=pool.env(a),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    racer: subprocess.Popen[bytes] | None = None
    try:
        assert client.stdout is not None
        sid = client.stdout.readline().strip()
        d = sessions / sid
        assert d.is_dir()
        # The racer is the owner's, outside the job and the session (so no cgroup kill
        # ends it): it holds the session dir's subdirectory open as its cwd and fills it.
        (d / "sub").mkdir()
        os.chown(d / "sub", a.uid, a.gid)
        racer = subprocess.Popen(
            [
                *a.prefix(),
                "/bin/sh",
                "-c",
                f'cd "{d}/sub" && i=0 && while :; do i=$((i+1)); touch f$i 2>/dev/null; done',
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for("the racer's files", lambda: len(list((d / "sub").iterdir())) > 10)
        client.wait(30)
        wait_for("the session dir's removal", lambda: not d.exists(), timeout=15)
    finally:
        for p in (client, racer):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if client.stdout is not None:
            client.stdout.close()


def test_sessions_of_a_dead_starter_are_ended_by_the_next(
    make_pool: Any, users: dict[str, User]
) -> None:
    """A session served by a starter that was SIGKILLed is ended by the next starter (its
    command and session dir gone), while the job it was in is taken back and runs on."""
    pool = make_pool()
    a = users["a"]
    [job] = pool.submit(a, "/bin/sleep", "1000")
    job_pid = pool.wait_state(job, "running")["pids"][0]
    marker = f"{5000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000}"
    client = subprocess.Popen(
        [*a.prefix(), SSH_TO_JOB, job, f"exec sleep {marker}"],
        env=pool.env(a),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sessions = pool.state / "execute" / ".sessions"
    try:
        out = wait_for(
            "the remote command",
            lambda: subprocess.run(
                ["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True, check=False
            ).stdout.split(),
            timeout=30,
        )
        cmd = int(out[0])
        _orphan_daemons(pool)
        _kill_starter(pool)
        assert _alive(cmd)  # nothing ends it but the next starter
        _start_starter(pool)
        wait_for("the dead starter's session to end", lambda: not _alive(cmd), timeout=20)
        wait_for("its session dir's removal", lambda: not list(sessions.iterdir()), timeout=15)
        assert pool.wait_state(job, "running")["pids"][0] == job_pid
        assert _alive(job_pid)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
        client.wait()
