"""Repeat commands through one OpenSSH ControlMaster per (user, pool, job): the first command
is a full session, later ones reuse it without the broker; the master is the user's alone,
ends with the job, and the pool can turn it off."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import stat
import sys
import time
from typing import Any

from conftest import Pool, User, wait_for

from ssh_to_job.client import _mux


def _master(pool: Pool, user: User, job: str) -> pathlib.Path:
    """Where ``user``'s master for ``job`` in ``pool`` lives (the pool env's TMPDIR, /tmp)."""
    base = pathlib.Path("/tmp") / f"ssh-to-job-{user.uid}"
    return _mux.socket_path(base, str(pool.state / "broker.sock"), job, ("/bin/bash",))


#: The client's own switch, which conftest's pools turn off for the other tests.
MUX = {"SSH_TO_JOB_MUX": "1"}


def _granted(pool: Pool, user: User, job: str) -> list[dict[str, Any]]:
    rows = json.loads(pool.stj(user, "history", "--sessions", "--json", job).stdout)
    return [r for r in rows if r["outcome"] == "granted"]


def _session_of(pool: Pool, user: User, job: str) -> str:
    """The id of the sshd session a command ran in (the starter's SSH_TO_JOB_SESSION)."""
    r = pool.ssh(user, job, "echo $SSH_TO_JOB_SESSION", env=MUX)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_repeat_commands_skip_the_broker_and_files_still_copy(
    pool: Pool, users: dict[str, User]
) -> None:
    """The second and later commands (ssh, scp, sftp, rsync) run in the first command's session:
    one granted session record, one sshd; the socket is the user's, in a 0700 directory; and
    `stj rm` ends the master."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    sock = _master(pool, a, job)
    first = _session_of(pool, a, job)
    assert first
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_uid == a.uid
    top = os.lstat(sock.parent)
    assert (top.st_uid, stat.S_IMODE(top.st_mode)) == (a.uid, 0o700)
    for _ in range(3):
        assert _session_of(pool, a, job) == first
    assert pool.ssh(a, job, "echo data > f.txt", env=MUX).returncode == 0
    dest = pathlib.Path(a.home) / f"mux-{job}"
    try:
        r = pool.ssh(a, "-ssh", "scp", job, "remote:f.txt", str(dest), env=MUX)
        assert r.returncode == 0, r.stderr
        assert dest.read_text() == "data\n"
        dest.unlink()
        r = pool.run(a, ["rsync", "-e", "ssh-to-job", f"{job}:f.txt", str(dest)], env=MUX)
        assert r.returncode == 0, r.stderr
        assert dest.read_text() == "data\n"
        r = pool.ssh(a, "-ssh", "sftp", job, input="ls f.txt\n", env=MUX)
        assert r.returncode == 0, r.stderr
        assert "f.txt" in r.stdout
    finally:
        dest.unlink(missing_ok=True)
    assert len(_granted(pool, a, job)) == 1
    pool.stj(a, "rm", job)
    wait_for("the master to end with the job", lambda: not sock.exists(), timeout=20)
    r = pool.ssh(a, job, "true", env=MUX)
    assert r.returncode == 1
    assert len(_granted(pool, a, job)) == 1


def test_another_uid_cannot_use_the_master_and_hold_ends_it(
    pool: Pool, users: dict[str, User]
) -> None:
    """Another user can neither reach the socket nor drive the master with ssh -O; a new full
    session after `stj hold` / `release` is a second capability."""
    a, b = users["a"], users["b"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        first = _session_of(pool, a, job)
        sock = _master(pool, a, job)
        assert sock.exists()
        probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        r = pool.run(b, [sys.executable, "-c", probe, str(sock)])
        assert "PermissionError" in r.stderr, r.stderr
        r = pool.run(b, ["ssh", "-S", str(sock), "-O", "check", "x"])
        assert r.returncode != 0
        r = pool.run(b, ["ssh", "-S", str(sock), "-F", "none", "x", "id"])
        assert r.returncode != 0
        assert str(a.uid) not in r.stdout
        pool.stj(a, "hold", job)
        wait_for("the master to end with the hold", lambda: not sock.exists(), timeout=20)
        pool.stj(a, "release", job)
        pool.wait_state(job, "running")
        assert _session_of(pool, a, job) not in ("", first)
        assert len(_granted(pool, a, job)) == 2
    finally:
        pool.stj(a, "rm", job)


def test_concurrent_first_commands_make_one_master_quietly(
    pool: Pool, users: dict[str, User]
) -> None:
    """Six first commands at once all succeed with nothing on stderr (one of them makes the
    master, the others stay plain sessions); the next command uses that master."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            runs = list(ex.map(lambda i: pool.ssh(a, job, f"echo {i}", env=MUX), range(6)))
        assert [(r.returncode, r.stdout, r.stderr) for r in runs] == [
            (0, f"{i}\n", "") for i in range(6)
        ]
        assert _master(pool, a, job).exists()
        n = len(_granted(pool, a, job))
        assert n == 6
        _session_of(pool, a, job)
        assert len(_granted(pool, a, job)) == n
    finally:
        pool.stj(a, "rm", job)


def test_pool_turns_it_off_and_an_idle_master_does_not_hold_up_completion(
    make_pool: Any, users: dict[str, User]
) -> None:
    """With [starter] mux_persist = 0 every command is a full session and no master is left;
    with a short mux_persist a job whose process ends completes once its master has idled."""
    a = users["a"]
    off: Pool = make_pool("[starter]\nmux_persist = 0\n", slots=2)
    (job,) = off.submit(a, "/bin/sleep", "300")
    off.wait_state(job, "running")
    try:
        one, two = _session_of(off, a, job), _session_of(off, a, job)
        assert one != two
        assert not _master(off, a, job).exists()
        assert len(_granted(off, a, job)) == 2
    finally:
        off.stj(a, "rm", job)
    short: Pool = make_pool("[starter]\nmux_persist = 2\n", slots=2)
    (job,) = short.submit(a, "/bin/sh", "-c", "while [ ! -e go ]; do sleep 0.1; done")
    short.wait_state(job, "running")
    assert short.ssh(a, job, "touch go", env=MUX).returncode == 0
    assert _master(short, a, job).exists()
    t0 = time.monotonic()
    short.wait_state(job, "completed", timeout=30)
    # mux_persist (2 s) plus the starter's own rounds; far below the default session_grace.
    assert time.monotonic() - t0 < 15
    assert not _master(short, a, job).exists()
