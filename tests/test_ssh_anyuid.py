"""Any uid gets a working session (issue 4): no passwd entry, a nologin shell, a missing home.

End to end through ``ssh-to-job``: real jobs of such uids, real sshd with the shim, real
ssh/scp/sftp/rsync clients, a real pty for the interactive shell. Users this module creates
are named ``stju*`` and stay afterwards (other runs may share them).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pexpect
import pytest
from conftest import BARE_UID, SSH_TO_JOB, Pool, User, session_entries

TIMEOUT = 30
#: name -> useradd options: a nologin account (with a home), and one whose home does not exist.
ODD_USERS = {
    "stjunologin": ["-m", "-s", "/usr/sbin/nologin"],
    "stjunohome": ["-M", "-d", "/nonexistent", "-s", "/bin/bash"],
}


def _odd_user(name: str) -> User:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", *ODD_USERS[name], name], check=True, timeout=TIMEOUT)
        pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@pytest.fixture(scope="module", params=sorted(ODD_USERS))
def odd(request: pytest.FixtureRequest, pool: Pool) -> tuple[User, dict[str, Any]]:
    """A nologin or homeless user, and a running job of theirs."""
    user = _odd_user(request.param)
    if request.param == "stjunohome":
        assert not os.path.exists(user.home)
    else:
        assert os.path.isdir(user.home)
        assert pwd.getpwnam(user.name or "").pw_shell == "/usr/sbin/nologin"
    (jid,) = pool.submit(user, "-e", "MARK=odd", "/bin/sleep", "3000")
    return user, pool.wait_state(jid, "running")


@pytest.fixture(scope="module")
def bare_job(pool: Pool, users: dict[str, User]) -> dict[str, Any]:
    """A running job of uid 62001, which has no passwd entry (submitted by that uid itself)."""
    (jid,) = pool.submit(users["bare"], "-e", "MARK=bare", "/bin/sleep", "3000")
    info = pool.wait_state(jid, "running")
    assert info["owner_uid"] == BARE_UID
    return info


@contextlib.contextmanager
def local_dir(user: User) -> Iterator[pathlib.Path]:
    """A client-side directory the user owns (pytest's tmp_path is root's and closed to them)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="stju-anyuid-", dir="/tmp"))
    os.chown(d, user.uid, user.gid)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def check_commands(
    pool: Pool,
    client: User,
    info: dict[str, Any],
    owner_uid: int,
    env: dict[str, str] | None = None,
) -> None:
    """A command runs as the job's uid, in its dir, with its env, under a working shell."""
    r = pool.ssh(
        client, info["id"], 'echo "$(id -u)|$PWD|$MARK|$HOME|$SSH_TO_JOB_ID|$0"; exit 4', env=env
    )
    assert r.returncode == 4, r.stderr
    uid, cwd, mark, _home, jid, shell = r.stdout.strip().split("|")
    assert (int(uid), cwd, jid) == (owner_uid, info["scratch"], info["id"])
    assert mark in ("odd", "bare")
    assert shell in ("bash", "sh", "dash")


def check_interactive(
    pool: Pool,
    client: User,
    info: dict[str, Any],
    owner_uid: int,
    env: dict[str, str] | None = None,
) -> None:
    """The interactive login: a pty, the job's uid and dir, typed commands, the exit status."""
    argv = [*client.prefix(), SSH_TO_JOB, info["id"]]
    child = pexpect.spawn(
        argv[0],
        argv[1:],
        cwd="/tmp",
        encoding="utf-8",
        timeout=TIMEOUT,
        env=pool.env(client, {"TERM": "dumb", **(env or {})}),
        dimensions=(40, 250),
    )
    try:
        child.expect(rf"welcome to job {info['id']} on \S+; its processes: {info['pids'][0]}\b")
        child.sendline('printf "R:%s|%s|%s|%s\\n" "$(tty)" "$(id -u)" "$PWD" "$MARK"')
        child.expect(r"R:(/dev/pts/\d+)\|(\d+)\|([^|]*)\|([^|\r]*)\r\n")
        _tty, uid, cwd, _mark = child.match.groups()
        assert (int(uid), cwd) == (owner_uid, info["scratch"])
        child.sendline("exit 6")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 6


def check_copies(
    pool: Pool,
    client: User,
    info: dict[str, Any],
    owner_uid: int,
    env: dict[str, str] | None = None,
) -> None:
    """scp both ways, sftp and rsync both ways; remote files belong to the job's uid."""
    jid = info["id"]
    with local_dir(client) as local:
        (local / "up load.txt").write_text("up\n")

        def run(*argv: str, stdin: str | None = None) -> str:
            r = pool.run(client, argv, cwd=str(local), input=stdin, env=env, timeout=TIMEOUT)
            assert r.returncode == 0, f"{argv}: {r.stderr}"
            return r.stdout

        run(SSH_TO_JOB, "-ssh", "scp", jid, "up load.txt", "remote:scp in.txt")
        run(SSH_TO_JOB, "-ssh", "scp", jid, "remote:scp in.txt", "scp back.txt")
        run(
            SSH_TO_JOB,
            "-ssh",
            "sftp -b -",
            jid,
            stdin='put "up load.txt" "sftp in.txt"\nget "sftp in.txt" "sftp back.txt"\n',
        )
        run("rsync", "-a", "-e", "ssh-to-job", "up load.txt", f"{jid}:rsync dir/")
        run("rsync", "-a", "-e", "ssh-to-job", f"{jid}:rsync dir/", "rsync back/")
        for name in ("scp back.txt", "sftp back.txt", "rsync back/up load.txt"):
            assert (local / name).read_text() == "up\n", name
        listing = run(
            SSH_TO_JOB, jid, "stat -c '%u %n' 'scp in.txt' 'sftp in.txt' 'rsync dir/up load.txt'"
        )
        assert [line.split(" ", 1)[0] for line in listing.splitlines()] == [str(owner_uid)] * 3


def test_bare_uid_client_is_refused_clearly(
    pool: Pool, users: dict[str, User], bare_job: dict[str, Any]
) -> None:
    """A uid with no passwd entry cannot run the OpenSSH client: ssh-to-job says so and exits 1."""
    r = pool.ssh(users["bare"], bare_job["id"], "true")
    assert r.returncode == 1
    assert "has no passwd entry on this host" in r.stderr
    assert pool.job(bare_job["id"])["sessions"] == 0


def test_bare_uid_job_root_commands(
    pool: Pool, users: dict[str, User], bare_job: dict[str, Any]
) -> None:
    """Root runs commands as a job uid with no passwd entry, a uid that cannot be the client.

    The OpenSSH client refuses to run for a uid with no passwd entry ("No user exists for uid"),
    so the job's own uid cannot be the client here; root, a queue superuser, is.
    """
    check_commands(pool, users["root"], bare_job, BARE_UID)
    r = pool.ssh(users["root"], bare_job["id"], 'echo "$USER $HOME"')
    assert r.stdout == f"u{BARE_UID} {bare_job['scratch']}\n"


def test_bare_uid_job_root_interactive(
    pool: Pool, users: dict[str, User], bare_job: dict[str, Any]
) -> None:
    """Root gets an interactive pty shell as the passwd-less job uid (itself no OpenSSH client)."""
    check_interactive(pool, users["root"], bare_job, BARE_UID)


def test_bare_uid_job_root_copies(
    pool: Pool, users: dict[str, User], bare_job: dict[str, Any]
) -> None:
    """Root copies files in and out of a passwd-less uid's job with scp, sftp and rsync."""
    check_copies(pool, users["root"], bare_job, BARE_UID)


def test_odd_user_commands(pool: Pool, odd: tuple[User, dict[str, Any]]) -> None:
    """A nologin or homeless user runs commands in their own job, also with $SHELL=nologin."""
    user, info = odd
    check_commands(pool, user, info, user.uid)
    check_commands(pool, user, info, user.uid, env={"SHELL": "/usr/sbin/nologin"})
    # The session starts in the job's dir whatever the passwd home says.
    r = pool.ssh(user, info["id"], "pwd; id -un")
    assert r.stdout == f"{info['scratch']}\n{user.name}\n"


def test_odd_user_interactive(pool: Pool, odd: tuple[User, dict[str, Any]]) -> None:
    """A nologin or homeless user gets an interactive pty shell in their own job."""
    user, info = odd
    check_interactive(pool, user, info, user.uid)


def test_odd_user_copies(pool: Pool, odd: tuple[User, dict[str, Any]]) -> None:
    """A nologin or homeless user copies with scp, sftp and rsync, also with $SHELL=nologin."""
    user, info = odd
    # $SHELL=nologin, as such a user may well have: the session must still get a real shell.
    check_copies(pool, user, info, user.uid, env={"SHELL": "/usr/sbin/nologin"})
    # Every session's key directory is gone afterwards (the config memo may stay).
    assert session_entries(pathlib.Path(f"/tmp/ssh-to-job-{user.uid}")) == []
