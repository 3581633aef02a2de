"""ssh-to-job as a command line: interactive logins, remote commands, exit statuses, options.

Everything is real: the installed ``ssh-to-job`` run as the job's owner (setpriv), a real pool,
real sshd/ssh, a real pty (pexpect) for the interactive login.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pexpect
import pytest
from conftest import SSH_TO_JOB, Pool, User

#: Hard limit for one pexpect wait or one ssh-to-job run.
TIMEOUT = 30
#: A job environment value that sshd's config syntax (SetEnv) must carry unchanged.
TRICKY = """a "quoted" \\back\\slash $dollar 'single' #hash  two  spaces=eq\ttab héllo"""


@pytest.fixture(scope="module")
def job(pool: Pool, users: dict[str, User]) -> dict[str, Any]:
    """A running job of user a with a marker variable; shared by the tests that only read it."""
    (jid,) = pool.submit(
        users["a"],
        "-e",
        "MARK=hello world",
        "-e",
        f"TRICKY={TRICKY}",
        "-e",
        "EMPTY=",
        "/bin/sleep",
        "3000",
    )
    return pool.wait_state(jid, "running")


def spawn(pool: Pool, user: User, *args: str, env: dict[str, str] | None = None) -> Any:
    """ssh-to-job in a real pty, as ``user``, with the pool's environment."""
    argv = [*user.prefix(), SSH_TO_JOB, *args]
    return pexpect.spawn(
        argv[0],
        argv[1:],
        env=pool.env(user, {"TERM": "dumb", **(env or {})}),
        cwd="/tmp",
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 250),
    )


def popen(pool: Pool, user: User, *args: str) -> subprocess.Popen[str]:
    """ssh-to-job in the background (pipes for all three streams), killed after TIMEOUT."""
    proc = subprocess.Popen(
        [*user.prefix(), SSH_TO_JOB, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pool.env(user),
        cwd="/tmp",
    )
    # A hard deadline even for readline(): a killed process's pipes reach EOF.
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return proc


def run_bytes(
    pool: Pool, user: User, *args: str, data: bytes
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*user.prefix(), SSH_TO_JOB, *args],
        input=data,
        capture_output=True,
        timeout=TIMEOUT,
        env=pool.env(user),
        cwd="/tmp",
        check=False,
    )


def test_interactive_login(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """An interactive login: a pty shell as the job's uid, in its dir and env; its exit status."""
    a = users["a"]
    child = spawn(pool, a, job["id"])
    try:
        _interact(child, a, job)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3


def _interact(child: Any, a: User, job: dict[str, Any]) -> None:
    child.expect(r"welcome to job (\S+) on \S+; its processes: ([0-9 ]+)\r\n")
    assert child.match.group(1) == job["id"]
    assert child.match.group(2).split()[0] == str(job["pids"][0])
    child.sendline(
        'printf "R:%s|%s|%s|%s|%s|%s\\n" "$(tty)" "$(id -u)" "$PWD" "$MARK" '
        '"${SSH_TO_JOB_PIDS%% *}" "$SSH_TO_JOB_ID"'
    )
    child.expect(r"R:(/dev/pts/\d+)\|(\d+)\|([^|]*)\|([^|]*)\|(\d+)\|([0-9.]+)\r\n")
    tty, uid, cwd, mark, main_pid, jid = child.match.groups()
    assert (int(uid), cwd, mark, int(main_pid), jid) == (
        a.uid,
        job["scratch"],
        "hello world",
        job["pids"][0],
        job["id"],
    )
    # A second command in the same shell: state carries over, as in any login.
    child.sendline('cd /; X=$((6*7)); echo "second:$X:$PWD"')
    child.expect(r"second:42:/\r\n")
    # The pty is a real terminal: its size came across, and Ctrl-C interrupts the remote
    # command (not ssh-to-job), leaving the shell alive.
    child.sendline('echo "size:$(stty size)"')
    child.expect(r"size:40 250\r\n")
    child.sendline("sleep 60; echo slept")
    time.sleep(0.5)
    child.sendintr()
    child.sendline("echo alive:$((1+1))")
    child.expect(r"alive:2\r\n", timeout=10)
    assert "\nslept" not in child.before  # (the typed line itself is echoed)
    assert tty.startswith("/dev/pts/")
    child.sendline("exit 3")
    child.expect(pexpect.EOF)


def test_command_streams_and_exit_status(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """A remote command's stdout and stderr arrive separately and its exit status is ours."""
    r = pool.ssh(users["a"], job["id"], "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    # Several words are joined into one command line, as ssh does.
    r = pool.ssh(users["a"], job["id"], "echo", "a", "b")
    assert (r.returncode, r.stdout) == (0, "a b\n")


def test_job_environment(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """The session sees the job's environment exactly (quotes, backslashes, empty values)."""
    r = pool.ssh(
        users["a"],
        job["id"],
        'printf "%s\\0" "$TRICKY" "${EMPTY-unset}" "$HOME" '
        '"$SSH_TO_JOB_ID" "$SSH_TO_JOB_SCRATCH_DIR" "$SSH_TO_JOB_IWD"',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\0")[:-1] == [
        TRICKY,
        "",
        users["a"].home,
        job["id"],
        job["scratch"],
        job["initialdir"],
    ]


def test_stdin_streams(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """5 MB piped through a remote ``cat`` come back byte for byte."""
    data = os.urandom(5 << 20)
    r = run_bytes(pool, users["a"], job["id"], "cat", data=data)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    r = run_bytes(pool, users["a"], job["id"], "sha256sum", data=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-bogus", "1", "true"], "unknown option -bogus"),
        (["--bogus=1", "1", "true"], "unknown option --bogus=1"),
        (["not-a-job", "true"], "'not-a-job' is not a job id"),
        (["1.2.3.4", "true"], "is not a job id"),
        ([], "no job id given"),
        (["-debug"], "no job id given"),
        (["-name"], "option -name needs a value"),
        (["-keygen-options", "-t dsa", "1", "true"], "unsupported key type 'dsa'"),
        (["-keygen-options", "-N foo", "1", "true"], "-N is not supported"),
        (["-keygen-options", "-C me", "1", "true"], "-C is not supported"),
        (["-keygen-options", "-t", "1", "true"], "-t needs a value"),
        (["1.0.7", "true"], "job 1.0 has no node 7 (its only node is 0)"),
        (["-ssh", "rsync", "1.0"], "rsync -av -e ssh-to-job 1.0:remote/path"),
    ],
)
def test_bad_arguments_exit_2(
    pool: Pool, users: dict[str, User], argv: list[str], message: str
) -> None:
    """Bad arguments exit 2 with a message saying what is wrong, and leave no file behind."""
    cwd = pathlib.Path(tempfile.mkdtemp(prefix="stjcwd-", dir="/tmp"))
    try:
        cwd.chmod(0o777)
        r = pool.run(users["a"], [SSH_TO_JOB, *argv], cwd=str(cwd))
        assert list(cwd.iterdir()) == []
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_setup_failures_exit_1(pool: Pool, users: dict[str, User]) -> None:
    """An unknown or a completed job exits 1 with a message saying so."""
    a = users["a"]
    r = pool.ssh(a, "987654", "true")
    assert r.returncode == 1
    assert r.stderr.strip() == "ssh-to-job: job 987654.0 is not in the queue"
    (done,) = pool.submit(a, "/bin/true")
    pool.wait_state(done, "completed")
    r = pool.ssh(a, done, "true")
    assert r.returncode == 1
    assert r.stderr == f"ssh-to-job: job {done} is completed; there is nothing to connect to\n"


def test_pool_option_without_a_trusted_ca(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """-pool (any spelling) to a pool whose CA this user never trusted is refused in one line
    that says how to get it (never trust on first use); exit 1. (tests/test_remote.py has
    the rest of the remote client.)"""
    for argv, where in (
        (["-pool", "cm.example.org"], "cm.example.org:9620"),
        (["--pool", "cm.example.org"], "cm.example.org:9620"),
        (["--pool=cm:9618"], "cm:9618"),
    ):
        r = pool.ssh(users["a"], *argv, job["id"], "true")
        assert r.returncode == 1
        assert r.stderr.startswith(f"ssh-to-job: no pool CA for {where}: "), r.stderr
        assert len(r.stderr.splitlines()) == 1


def test_ssh_exit_255_passes_through(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """When ssh itself fails (sshd killed mid-session, a bad ssh option), its 255 is our status."""
    t0 = time.monotonic()
    # $PPID of the command's shell is the session's sshd: killing it cuts the connection.
    r = pool.ssh(users["a"], job["id"], "kill -9 $PPID; sleep 20")
    assert r.returncode == 255, r.stderr
    # ssh words a lost connection by what it was doing when it noticed.
    assert (
        "closed by remote host" in r.stderr
        or "Broken pipe" in r.stderr
        or "Connection reset" in r.stderr
    ), r.stderr
    assert time.monotonic() - t0 < 15
    r = pool.ssh(users["a"], "-ssh", "ssh -o BadOption=1", job["id"], "true")
    assert r.returncode == 255
    assert "Bad configuration option: badoption" in r.stderr


def test_name_option(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """-name takes the broker's state directory or socket path, and wins over STJ_STATE_DIR."""
    wrong = {"STJ_STATE_DIR": "/tmp/stju-no-such-pool"}
    for argv in (
        ["-name", str(pool.state)],
        ["--name", str(pool.state / "broker.sock")],
        [f"--name={pool.state}"],
    ):
        r = pool.ssh(users["a"], *argv, job["id"], "echo $SSH_TO_JOB_ID", env=wrong)
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{job['id']}\n", "")
    r = pool.ssh(users["a"], job["id"], "true", env=wrong)
    assert r.returncode == 1
    assert "cannot reach the broker at /tmp/stju-no-such-pool/broker.sock" in r.stderr


def test_ssh_option_with_extra_words(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """-ssh "ssh opts..." runs ssh with those options (here: quiet, and a forced pty)."""
    r = pool.ssh(users["a"], "-ssh", "ssh -o LogLevel=QUIET -tt", job["id"], "tty")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"/dev/pts/\d+\n", r.stdout), r.stdout  # (text mode ate the \r)
    r = pool.ssh(users["a"], "--ssh=ssh -T", job["id"], "tty")
    assert (r.returncode, r.stdout) == (1, "not a tty\n")
    r = pool.ssh(users["a"], "-ssh", "/nonexistent/ssh", job["id"], "true")
    assert r.returncode == 1
    assert "cannot run /nonexistent/ssh" in r.stderr


def test_keygen_options(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """-keygen-options picks the session key type, and sshd accepts an RSA or ECDSA key."""
    r = pool.ssh(users["a"], "-debug", "-keygen-options", "-t rsa -b 3072", job["id"], "echo ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    assert re.search(r"Server accepts key: \S+ RSA SHA256:", r.stderr), r.stderr
    r = pool.ssh(users["a"], "--keygen-options=-t ecdsa -b 384", "-debug", job["id"], "true")
    assert r.returncode == 0
    assert re.search(r"Server accepts key: \S+ ECDSA SHA256:", r.stderr), r.stderr
    r = pool.ssh(users["a"], "-debug", job["id"], "true")
    assert re.search(r"Server accepts key: \S+ ED25519 SHA256:", r.stderr), r.stderr


def test_shells_option(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """The session shell is the first usable one of -shells, else the client's $SHELL."""
    probe = 'echo "$0 $SHELL $(readlink /proc/$$/exe)"; true'
    a, jid = users["a"], job["id"]

    def shell(*argv: str, env: dict[str, str] | None = None) -> list[str]:
        r = pool.ssh(a, *argv, jid, probe, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert shell("-shells", "/bin/nonexistent,/bin/dash") == ["dash", "/bin/dash", "/usr/bin/dash"]
    assert shell("--shells=nonexistent-shell,dash") == ["dash", "/usr/bin/dash", "/usr/bin/dash"]
    assert shell() == ["bash", "/bin/bash", "/usr/bin/bash"]  # the pool env's SHELL
    assert shell(env={"SHELL": "/bin/dash"}) == ["dash", "/bin/dash", "/usr/bin/dash"]
    # A nologin/false shell would turn every command into "account not available": skipped.
    assert shell("-shells", "/usr/sbin/nologin,/bin/false,/bin/dash")[0] == "dash"
    assert shell(env={"SHELL": "/usr/sbin/nologin"})[0] == "bash"  # stjta's passwd shell


def test_auto_retry(make_pool: Any, users: dict[str, User]) -> None:
    """-auto-retry waits for an idle job, saying so, connects when it runs, stops if it ends."""
    a = users["a"]
    pool = make_pool(slots=1)
    (first,) = pool.submit(a, "/bin/sleep", "3000")
    pool.wait_state(first, "running")
    second, third, fourth = (pool.submit(a, "/bin/sleep", "3000")[0] for _ in range(3))
    r = pool.ssh(a, second, "true")
    assert r.returncode == 1
    assert f"job {second} is idle (not running yet); use -auto-retry" in r.stderr

    def waiting(target: str, *extra: str, lines: int = 1) -> subprocess.Popen[str]:
        """Start a waiting ssh-to-job; return once it has said it waits ``lines`` times."""
        proc = popen(pool, a, "-auto-retry", *extra, target, "echo in $SSH_TO_JOB_ID")
        assert proc.stderr is not None
        for n in range(lines):
            assert proc.stderr.readline() == f"ssh-to-job: job {target} is idle; waited {n} s\n"
        return proc

    proc = waiting(second, lines=2)
    pool.stj(a, "rm", first)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out) == (0, f"in {second}\n"), err
    assert "Traceback" not in err

    proc = waiting(third)
    pool.stj(a, "hold", third)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    assert f"ssh-to-job: stopped waiting: job {third} is held" in err

    proc = waiting(fourth)
    pool.stj(a, "rm", fourth)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    assert f"ssh-to-job: stopped waiting: job {fourth} is removed" in err

    # Interrupted while waiting, with -remove-on-interrupt: the idle job goes away too.
    pool.stj(a, "release", third)
    proc = waiting(third, "-remove-on-interrupt")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert pool.job(third)["state"] == "removed"


def _session_dirs(user: User, pid: int) -> list[pathlib.Path]:
    base = pathlib.Path(f"/tmp/ssh-to-job-{user.uid}")
    found = []
    for d in base.glob("*"):
        try:
            if int((d / "pid").read_text()) == pid:
                found.append(d)
        except (OSError, ValueError):
            continue
    return found


def test_remove_on_interrupt(pool: Pool, users: dict[str, User]) -> None:
    """SIGTERM mid-session with -remove-on-interrupt ends the session, the job and the key files."""
    a = users["a"]
    (jid,) = pool.submit(a, "/bin/sleep", "3000")
    pool.wait_state(jid, "running")
    proc = popen(pool, a, "-remove-on-interrupt", jid, "echo started; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    dirs = _session_dirs(a, proc.pid)  # setpriv execs: its pid is ssh-to-job's
    assert len(dirs) == 1
    assert (dirs[0] / "id").exists()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 255  # ssh's own status when it is terminated
    assert f"ssh-to-job: job {jid}: rm done" in err
    assert pool.job(jid)["state"] == "removed"
    assert not dirs[0].exists()
    # Without the option an interrupted session leaves the job alone.
    (kept,) = pool.submit(a, "/bin/sleep", "3000")
    pool.wait_state(kept, "running")
    proc = popen(pool, a, kept, "echo started; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT)
    assert pool.job(kept)["state"] == "running"
    pool.stj(a, "rm", kept)


def test_ctrl_c_with_remove_on_interrupt(pool: Pool, users: dict[str, User]) -> None:
    """Ctrl-C on the terminal during a remote command with -remove-on-interrupt removes the job."""
    a = users["a"]
    (jid,) = pool.submit(a, "/bin/sleep", "3000")
    pool.wait_state(jid, "running")
    # With a command, ssh allocates no pty: the local terminal stays cooked, and ^C is SIGINT
    # to the foreground process group (ssh-to-job and ssh).
    child = spawn(pool, a, "-remove-on-interrupt", jid, "echo go; sleep 60")
    try:
        child.expect(r"go\r\n")
        time.sleep(0.3)
        child.sendintr()
        child.expect(rf"ssh-to-job: job {jid}: rm done\r\n")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 255
    assert pool.job(jid)["state"] == "removed"


#: Runs inside the session: open the forwarded X display with the cookie sshd installed via
#: xauth, send an X11 connection set-up, print what the "X server" answers.
_X_CLIENT = r"""
import os, socket, struct, subprocess
d = os.environ["DISPLAY"]
n = int(d.split(":")[1].split(".")[0])
_host, proto, cookie = subprocess.run(["xauth", "list", d], capture_output=True, text=True,
                                      check=True).stdout.split()
pad = lambda b: b + b"\0" * (-len(b) % 4)
proto_b, cookie_b = proto.encode(), bytes.fromhex(cookie)
setup = b"l\0" + struct.pack("<HHHH", 11, 0, len(proto_b), len(cookie_b)) + b"\0\0"
s = socket.create_connection(("127.0.0.1", 6000 + n), timeout=20)
s.sendall(setup + pad(proto_b) + pad(cookie_b))
print("display", d, "answered", s.recv(100).decode())
"""


@pytest.fixture
def fake_x_display() -> Iterator[tuple[int, list[bytes]]]:
    """A unix-socket "X server" on the client side that records the set-up and answers."""
    xdir = pathlib.Path("/tmp/.X11-unix")
    xdir.mkdir(exist_ok=True)
    xdir.chmod(0o1777)
    for n in range(700 + secrets.randbelow(200), 1000):
        path = xdir / f"X{n}"
        if not path.exists():
            break
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(4)
    srv.settimeout(TIMEOUT)
    got: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            got.append(conn.recv(4096))
            conn.sendall(b"FAKE-X-SERVER")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield n, got
    srv.close()
    path.unlink(missing_ok=True)
    t.join(TIMEOUT)


def test_x11_forwarding(
    pool: Pool, users: dict[str, User], job: dict[str, Any], fake_x_display: tuple[int, list[bytes]]
) -> None:
    """-X forwards X11 from the session to the client's display; -x and the default do not."""
    if shutil.which("xauth") is None:
        pytest.skip("sshd needs xauth for X11 forwarding; the dev script installs it")
    n, got = fake_x_display
    env = {"DISPLAY": f":{n}"}
    for argv in (["-x"], []):
        r = pool.ssh(users["a"], *argv, job["id"], 'echo "D=$DISPLAY"', env=env)
        assert (r.returncode, r.stdout) == (0, "D=\n"), r.stderr
    r = pool.ssh(users["a"], "-X", job["id"], "python3 -", input=_X_CLIENT, env=env)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"display localhost:\d+\.0 answered FAKE-X-SERVER\n", r.stdout), r.stdout
    assert len(got) == 1
    assert got[0].startswith(b"l\0\x0b\0")
    assert b"MIT-MAGIC-COOKIE-1" in got[0]


def test_debug_and_help(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """-debug narrates the set-up and runs ssh -v, stdout untouched; -help/--help/-h exit 0."""
    r = pool.ssh(users["a"], "-debug", job["id"], "echo ok")
    assert (r.returncode, r.stdout) == (0, "ok\n")
    assert f"ssh-to-job: asking broker {pool.state}/broker.sock" in r.stderr
    assert "ssh-to-job: starter host key verified" in r.stderr
    assert "debug1: " in r.stderr
    for flag in ("-help", "--help", "-h"):
        r = pool.ssh(users["a"], flag)
        assert (r.returncode, r.stderr) == (0, "")
        assert r.stdout.startswith("usage: ssh-to-job")
        assert "-remove-on-interrupt" in r.stdout


def test_job_id_forms(pool: Pool, users: dict[str, User]) -> None:
    """cluster means proc 0, cluster.proc and cluster.proc.0 name that proc; another node is
    refused rather than quietly entering node 0."""
    a = users["a"]
    ids = pool.submit(a, "/bin/sleep", "3000", count=2)
    for jid in ids:
        pool.wait_state(jid, "running")
    cluster = ids[0].split(".")[0]
    for given, expected in ((cluster, ids[0]), (ids[1], ids[1]), (f"{ids[1]}.0", ids[1])):
        r = pool.ssh(a, given, "echo $SSH_TO_JOB_ID")
        assert (r.returncode, r.stdout) == (0, f"{expected}\n"), r.stderr
    r = pool.ssh(a, f"{cluster}.7", "true")
    assert (r.returncode, r.stderr) == (1, f"ssh-to-job: job {cluster}.7 is not in the queue\n")
    r = pool.ssh(a, f"{ids[1]}.3", "true")
    assert r.returncode == 2
    assert f"job {ids[1]} has no node 3" in r.stderr
    pool.stj(a, "rm", cluster)


def test_ssh_style_user_arguments(pool: Pool, users: dict[str, User], job: dict[str, Any]) -> None:
    """What rsync passes an "ssh" (-l user, user@host) is accepted; the job decides the login."""
    a = users["a"]
    for argv in (["-l", "someuser", job["id"]], [f"someuser@{job['id']}"]):
        r = pool.ssh(a, *argv, "id -un")
        assert (r.returncode, r.stdout) == (0, "stjta\n"), r.stderr


def test_twenty_concurrent_sessions(
    pool: Pool, users: dict[str, User], job: dict[str, Any]
) -> None:
    """Twenty sessions into one job at once all succeed, each with its own output."""

    def one(i: int) -> tuple[int, str, str]:
        r = pool.ssh(users["a"], job["id"], f"echo token-{i}-$SSH_TO_JOB_SESSION")
        return r.returncode, r.stdout, r.stderr

    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, range(20)))
    assert [rc for rc, _, _ in results] == [0] * 20, [err for _, _, err in results]
    sessions = set()
    for i, (_, out, _) in enumerate(results):
        m = re.fullmatch(rf"token-{i}-([0-9a-f]{{16}})\n", out)
        assert m, out
        sessions.add(m.group(1))
    assert len(sessions) == 20
