"""A personal pool run by an ordinary user: no root anywhere, jobs and sessions as that user."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

from conftest import SSH_TO_JOB, STJ, User, new_state_dir

Run = Callable[..., subprocess.CompletedProcess[str]]


@contextlib.contextmanager
def user_pool(user: User) -> Iterator[tuple[dict[str, str], Run]]:
    """`stj pool` run by ``user`` in a fresh state dir, up and connected: its environment and
    a function that runs a command as ``user`` in it. Stopped and removed afterwards."""
    state = new_state_dir()
    os.chown(state, user.uid, user.gid)
    env = {
        "PATH": f"{os.path.dirname(STJ)}:/usr/bin:/bin",
        "HOME": user.home,
        "USER": str(user.name),
        "STJ_STATE_DIR": str(state),
        "LANG": "C.UTF-8",
        "SHELL": "/bin/bash",
    }

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*user.prefix(), *argv], env=env, capture_output=True, text=True, timeout=60, cwd="/tmp"
        )

    pool = subprocess.Popen(
        [*user.prefix(), STJ, "pool"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = run(STJ, "status", "--json")
            starters = json.loads(r.stdout)["starters"] if r.returncode == 0 else []
            if any(s["connected"] for s in starters):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the user's pool did not come up")
        yield env, run
    finally:
        os.killpg(pool.pid, 15)
        pool.wait(20)
        shutil.rmtree(state, ignore_errors=True)


def test_pool_started_by_a_user_runs_their_jobs_and_sessions(users: dict[str, User]) -> None:
    """`stj pool` as user b: its job runs as b, and ssh-to-job (a command and a pty) gets in;
    another user's submit is refused at once with the reason."""
    b = users["b"]
    with user_pool(b) as (env, run):
        # Another user's job could never run here (the starter runs as b): refused at once.
        a = users["a"]
        other = subprocess.run(
            [*a.prefix(), STJ, "submit", "/bin/true"],
            env={**env, "HOME": a.home, "USER": str(a.name)},
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/tmp",
        )
        assert other.returncode == 1, other
        assert f"this is {b.name}'s personal pool" in other.stderr
        r = run(STJ, "submit", "/bin/sleep", "300")
        assert r.returncode == 0, r.stderr
        job = r.stdout.split(":", 1)[1].split()[0]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            q = json.loads(run(STJ, "q", "--json", job).stdout)
            if q and q[0]["state"] == "running" and q[0]["pids"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"job {job} did not start")
        with open(f"/proc/{q[0]['pids'][0]}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert uids == [str(b.uid)] * 4
        r = run(SSH_TO_JOB, job, "id -u; pwd")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(b.uid), q[0]["scratch"]]
        r = run(SSH_TO_JOB, "-ssh", "ssh -tt", job, "tty")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().startswith("/dev/pts/")
        assert run(STJ, "rm", job).returncode == 0


def test_without_cgroups_a_left_behind_process_is_the_jobs(users: dict[str, User]) -> None:
    """In a user's pool (no cgroups), what a failed job left running (`sleep 1000 &`) is listed
    in SSH_TO_JOB_PIDS during its debug hold, and stj rm kills it."""
    b = users["b"]
    with user_pool(b) as (_env, run):
        script = "sleep 1000 & echo $! > left.pid; exit 3"
        r = run(STJ, "submit", "--hold-on-failure", "/bin/sh", "-c", script)
        assert r.returncode == 0, r.stderr
        job = r.stdout.split(":", 1)[1].split()[0]
        deadline = time.monotonic() + 20
        while True:
            q = json.loads(run(STJ, "q", "--json", job).stdout)
            if q and "debug hold" in q[0]["hold_reason"]:
                break
            assert time.monotonic() < deadline, f"job {job} was not kept: {q}"
            time.sleep(0.1)
        r = run(SSH_TO_JOB, job, 'cat left.pid; echo "$SSH_TO_JOB_PIDS"')
        assert r.returncode == 0, r.stderr
        left, pids = r.stdout.splitlines()
        assert left in pids.split(), (left, pids)
        assert run(STJ, "rm", job).returncode == 0
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{left}") and _running(int(left)):
            assert time.monotonic() < deadline, "the left-behind process outlived stj rm"
            time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_stopping_a_users_pool_ends_its_jobs(users: dict[str, User]) -> None:
    """SIGTERM to a user's `stj pool` process group (the starter gets it twice: from the group
    and from the supervisor's own stop) ends the pool's running job instead of leaving it
    behind with no starter."""
    with user_pool(users["a"]) as (_env, run):
        r = run(STJ, "submit", "/bin/sleep", "300")
        assert r.returncode == 0, r.stderr
        job = r.stdout.split(":", 1)[1].split()[0]
        pids: list[int] = []
        deadline = time.monotonic() + 20
        while not pids and time.monotonic() < deadline:
            jobs = json.loads(run(STJ, "q", "--json", job).stdout or "[]")
            pids = [p for j in jobs if j["state"] == "running" for p in j["pids"]]
            time.sleep(0.1)
        assert pids, "the job did not start"
    # user_pool has stopped the pool (SIGTERM to its group, then waited for it).
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
        time.sleep(0.1)
    assert alive == [], f"job processes {alive} outlived their stopped pool"
