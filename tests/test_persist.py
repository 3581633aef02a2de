"""ssh-to-job --persist: a tmux terminal that lives in the job, survives the ssh session and
dies with the job.

Real pool, real sshd/ssh, real tmux, real uids, a real pty (pexpect) for the attaches.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
from typing import Any

import pexpect
import pytest
from conftest import SSH_TO_JOB, Pool, User, wait_for

TIMEOUT = 30


def attach(pool: Pool, user: User, *args: str) -> Any:
    """ssh-to-job --persist... in a real pty, as ``user``."""
    argv = [*user.prefix(), SSH_TO_JOB, *args]
    return pexpect.spawn(
        argv[0],
        argv[1:],
        env=pool.env(user, {"TERM": "xterm"}),
        cwd="/tmp",
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(30, 120),
    )


def remote(pool: Pool, user: User, job: str, command: str) -> str:
    """A plain (non-tty) command in the job; its stdout."""
    r = pool.ssh(user, job, command, timeout=TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr, pool.log_text())
    return r.stdout


def server_pid(pool: Pool, user: User, job: str) -> int:
    out = remote(pool, user, job, "tmux -N -S \"$SSH_TO_JOB_TMUX\" display-message -p '#{pid}'")
    return int(out)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; the starter reaps its children a moment later.
    try:
        return b"\nState:\tZ" not in pathlib.Path(f"/proc/{pid}/status").read_bytes()
    except FileNotFoundError:
        return False


def kill_ssh_of(child: Any) -> None:
    """SIGKILL the ssh client under ssh-to-job (a dropped connection, as far as sshd knows)."""
    kids = subprocess.run(
        ["pgrep", "-P", str(child.pid), "-x", "ssh"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert kids, "no ssh under ssh-to-job"
    for pid in kids:
        os.kill(int(pid), signal.SIGKILL)
    child.expect(pexpect.EOF)
    child.close()


@pytest.fixture(scope="module")
def job(pool: Pool, users: dict[str, User]) -> dict[str, Any]:
    (jid,) = pool.submit(users["a"], "-e", "MARK=in-the-job", "/bin/sleep", "3000")
    return pool.wait_state(jid, "running")


def test_terminal_survives_a_dropped_connection(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """What was typed in a --persist terminal is still there after the ssh client is SIGKILLed:
    the re-attach sees the same shell (a variable) in the job's environment and directory."""
    a = users["a"]
    child = attach(pool, a, "--persist", job["id"])
    try:
        child.sendline(
            'X=kept-$((6*7)); cd "$SSH_TO_JOB_SCRATCH_DIR"; echo "one:$X:$MARK:$(id -u)"'
        )
        child.expect(f"one:kept-42:in-the-job:{a.uid}")
        kill_ssh_of(child)
    finally:
        child.close(force=True)
    # The session that ran the first attach is over (its sshd and cgroup are gone) ...
    wait_for(
        "the first session to end",
        lambda: pool.job(job["id"]).get("sessions") == 0,
    )
    # ... and the shell in the terminal lives on.
    child = attach(pool, a, "--persist", job["id"])
    try:
        child.sendline('echo "two:$X:$PWD"')
        child.expect(f"two:kept-42:{job['scratch']}")
        child.send("\x02d")  # tmux's detach key: the client ends, the terminal does not
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    out = remote(pool, a, job["id"], "tmux -N -S \"$SSH_TO_JOB_TMUX\" ls -F '#{session_name}'")
    assert out.split() == ["main"]


def test_named_terminals_side_by_side(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """--persist-name makes a second terminal beside the first; each keeps its own shell."""
    a = users["a"]
    for name, value in (("build", "b1"), ("logs", "l1")):
        child = attach(pool, a, "--persist-name", name, job["id"])
        try:
            child.sendline(f"V={value}; echo set-$V-done")
            child.expect(f"set-{value}-done")
            child.send("\x02d")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
    out = remote(pool, a, job["id"], "tmux -N -S \"$SSH_TO_JOB_TMUX\" ls -F '#{session_name}'")
    assert {"build", "logs"} <= set(out.split())
    child = attach(pool, a, "--persist-name", "build", job["id"])
    try:
        child.sendline('echo "again-$V-done"')
        child.expect("again-b1-done")
    finally:
        child.close(force=True)


def test_server_is_the_jobs_and_private(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """The tmux server runs as the job (uid, cwd, environment, cgroup, SSH_TO_JOB_PIDS) and its
    socket is in a 0700 directory of the job, not the user's shared /tmp/tmux-UID."""
    a = users["a"]
    child = attach(pool, a, "--persist", job["id"])
    try:
        child.sendline("echo attached-$((1+1))")
        child.expect("attached-2")
    finally:
        child.close(force=True)
    pid = server_pid(pool, a, job["id"])
    st = os.stat(f"/proc/{pid}")
    assert st.st_uid == a.uid
    assert os.readlink(f"/proc/{pid}/cwd") == job["scratch"]
    environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"MARK=in-the-job" in environ
    main = job["pids"][0]
    assert (
        pathlib.Path(f"/proc/{pid}/cgroup").read_text()
        == pathlib.Path(f"/proc/{main}/cgroup").read_text()
    )
    listed = remote(pool, a, job["id"], 'echo "$SSH_TO_JOB_PIDS"').split()
    assert str(pid) in listed
    sock = remote(pool, a, job["id"], 'echo "$SSH_TO_JOB_TMUX"').strip()
    assert sock.startswith(job["scratch"] + "/")
    assert not sock.startswith("/tmp/tmux-")
    d = os.stat(os.path.dirname(sock))
    assert (d.st_mode & 0o777, d.st_uid) == (0o700, a.uid)
    assert not os.path.exists(f"/tmp/tmux-{a.uid}/default") or not _listening(
        f"/tmp/tmux-{a.uid}/default"
    )


def _listening(path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def test_bad_persist_options(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """--persist refuses a remote command, another -ssh program and a name tmux would misread."""
    a = users["a"]
    for args, says in (
        (["--persist", job["id"], "ls"], "takes no remote command"),
        (["--persist", "-ssh", "sftp", job["id"]], "needs ssh"),
        (["--persist-name", "a.b", job["id"]], "--persist-name 'a.b'"),
    ):
        r = pool.ssh(a, *args)
        assert r.returncode == 2, r
        assert says in r.stderr


def _ends_with_job(pool: Pool, a: User, how: str) -> None:
    (jid,) = pool.submit(a, "/bin/sleep", "3000")
    job = pool.wait_state(jid, "running")
    child = attach(pool, a, "--persist", jid)
    try:
        child.sendline("echo up-$((2+3))")
        child.expect("up-5")
        child.send("\x02d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    pid = server_pid(pool, a, jid)
    assert str(pid) in remote(pool, a, jid, 'echo "$SSH_TO_JOB_PIDS"').split()
    if how == "rm":
        pool.stj(a, "rm", jid)
    else:
        os.kill(job["pids"][0], signal.SIGTERM)  # the job's main process ends by itself
    wait_for("the tmux server to die with the job", lambda: not alive(pid))
    wait_for("its scratch dir (and socket) to go", lambda: not os.path.exists(job["scratch"]))


@pytest.mark.parametrize("how", ["rm", "exit"])
def test_terminal_dies_with_the_job(pool: Pool, users: dict[str, User], how: str) -> None:
    """The tmux server ends when the job is removed or its main process exits."""
    _ends_with_job(pool, users["a"], how)


def test_without_cgroups(make_pool: Any, users: dict[str, User]) -> None:
    """Without cgroup v2, the server is still among the job's processes (SSH_TO_JOB_PIDS) and
    stj rm kills it."""
    _ends_with_job(make_pool("[starter]\nuse_cgroups = false\n"), users["a"], "rm")
