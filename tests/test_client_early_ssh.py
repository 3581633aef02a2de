"""The client starts ssh while the starter sets the session up (issue 12: ssh's own start-up
off the session's path), on a guess of what ``session_ready`` will say; a wrong guess restarts
ssh, and a set-up that fails stops it without a word from ssh or its ProxyCommand helper."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

from conftest import Pool, User


def _running(pool: Pool, user: User) -> str:
    (job,) = pool.submit(user, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    return job


def _lines_from(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def _started_and_verified(stderr: str) -> tuple[int, int]:
    """Where, among -debug's own lines, the client started its one ssh (scp) and where it
    verified the starter's host key; each must happen exactly once."""
    ours = _lines_from(stderr, "ssh-to-job: ")
    running = [i for i, line in enumerate(ours) if line.startswith("ssh-to-job: running ")]
    verified = [i for i, line in enumerate(ours) if "starter host key verified" in line]
    assert (len(running), len(verified)) == (1, 1), ours
    return running[0], verified[0]


def test_ssh_starts_before_the_starter_answers(pool: Pool, users: dict[str, User]) -> None:
    """For the job's owner the guess holds: ssh is started while the broker works on the
    request (before its grant) and so before the starter's host key is verified, once, and the
    session runs as the owner."""
    a = users["a"]
    job = _running(pool, a)
    try:
        r = pool.ssh(a, "-debug", job, "id -u")
        assert (r.returncode, r.stdout) == (0, f"{a.uid}\n"), r.stderr
        running, verified = _started_and_verified(r.stderr)
        assert running < verified, r.stderr
        ours = _lines_from(r.stderr, "ssh-to-job: ")
        (granted,) = [i for i, line in enumerate(ours) if "granted by the broker" in line]
        (asked,) = [i for i, line in enumerate(ours) if "asking broker" in line]
        assert asked < running < granted, r.stderr
        assert "restarting ssh" not in r.stderr
    finally:
        pool.stj(a, "rm", job)


def test_a_wrong_guess_restarts_ssh(pool: Pool, users: dict[str, User]) -> None:
    """A queue superuser entering another user's job logs in as the owner, not as himself:
    the ssh started on the guess is replaced by one with the starter's login."""
    a, su = users["a"], users["su"]
    job = _running(pool, a)
    try:
        r = pool.ssh(su, "-debug", job, "id -u")
        assert (r.returncode, r.stdout) == (0, f"{a.uid}\n"), r.stderr
        assert "differs from the guess: restarting ssh" in r.stderr
        ours = _lines_from(r.stderr, "ssh-to-job: running ")
        assert len(ours) == 2, r.stderr
        assert "ssh-to-job proxy:" not in r.stderr
    finally:
        pool.stj(a, "rm", job)


def _ssh_processes(uid: int) -> list[str]:
    """Command lines of this uid's ssh clients and proxy helpers that are still alive."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(argv[0].decode(errors="replace"))
        if name in ("ssh", "stj-fdpass") or b"_fdproxy.py" in b" ".join(argv):
            found.append(" ".join(a.decode(errors="replace") for a in argv))
    return found


def test_a_failed_set_up_stops_the_early_ssh_quietly(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """When the starter cannot start sshd, the user sees the starter's reason and nothing
    else: the ssh started ahead is gone, and neither it nor its helper printed a word."""
    a = users["a"]
    pool = make_pool('[starter]\nsshd = "/sbin/ldconfig"\n')
    job = _running(pool, a)
    r = pool.ssh(a, job, "true")
    assert r.returncode == 1, r
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"ssh-to-job: job {job}: session set-up failed: "), r.stderr
    # A helper whose ssh was killed may take a moment to notice: bounded wait.
    deadline = time.monotonic() + 5
    while (left := _ssh_processes(a.uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], left
    pool.stj(a, "rm", job)


def test_a_refusal_before_the_grant_stops_the_early_ssh_quietly(
    pool: Pool, users: dict[str, User]
) -> None:
    """A job the broker refuses: one line, the broker's, and no ssh or helper left behind."""
    b = users["b"]
    r = pool.ssh(b, "987654.0", "true")
    assert r.returncode == 1, r
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("ssh-to-job: "), r.stderr
    assert "987654" in r.stderr
    deadline = time.monotonic() + 5
    while (left := _ssh_processes(b.uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], left


def test_scp_starts_only_once_the_starter_has_answered(pool: Pool, users: dict[str, User]) -> None:
    """scp runs ssh as its own child, which a kill of scp would orphan: so it is never started
    on a guess, even where the guess would be wrong (a superuser copying from a user's job)."""
    a, su = users["a"], users["su"]
    job = _running(pool, a)
    here = pathlib.Path(tempfile.mkdtemp(prefix="stjt-scp-", dir="/tmp"))
    os.chown(here, su.uid, su.gid)
    dest = here / "got"
    try:
        r = pool.ssh(su, "-debug", "-ssh", "scp", job, "remote:/etc/hostname", str(dest))
        assert r.returncode == 0, r.stderr
        assert dest.read_text() == pathlib.Path("/etc/hostname").read_text()
        running, verified = _started_and_verified(r.stderr)
        assert verified < running, r.stderr
        assert "restarting" not in r.stderr
    finally:
        pool.stj(a, "rm", job)
        shutil.rmtree(here, ignore_errors=True)
