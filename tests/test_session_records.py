"""Session records say which forwards a session asked for (from its sshd's log) and how its
command ended (from the kernel's process events).

The parsers are checked on their own on OpenSSH 9.2's log lines; then end to end: a real
session with -L (used), -R and X11 through real ssh and sshd, ending with exit 3, and
``stj history --sessions``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from typing import Any

from conftest import SSH_TO_JOB, Pool, User, wait_for

from ssh_to_job.starter import _exits, _sshdlog

LOG = """\
debug1: server_input_global_request: tcpip-forward listen localhost port 18766
debug1: server_input_global_request: tcpip-forward listen 0.0.0.0 port 18770
debug1: session_input_channel_req: session 0 req x11-req
debug1: session_input_channel_req: session 0 req auth-agent-req@openssh.com
debug1: server_request_direct_tcpip: originator 127.0.0.1 port 48492, target localhost port 22
debug1: server_request_direct_tcpip: originator 127.0.0.1 port 48494, target localhost port 22
debug1: server_request_direct_streamlocal: originator 127.0.0.1 port 4, target /run/x.sock
debug1: server_input_global_request: streamlocal-forward listen path /tmp/y.sock
"""


def test_forwards_from_an_sshd_log() -> None:
    """Each kind of forward in sshd's DEBUG1 lines becomes one entry, once, in order."""
    assert _sshdlog.forwards(LOG) == (
        "R:18766,R:0.0.0.0:18770,X11,agent,L:localhost:22,L:/run/x.sock,R:/tmp/y.sock"
    )
    assert _sshdlog.forwards("") == ""
    assert _sshdlog.forwards("junk\0\nserver_request_direct_tcpip: target\n") == ""


def test_command_pid_and_wait_status() -> None:
    """The session's command is the first pid sshd reported an exit for; a raw wait status
    becomes the exit status, or 128 + the signal."""
    log = "debug1: session_exit_message: session 0 channel 2 pid 18917\n" * 2
    assert _sshdlog.command_pid(log) == 18917
    assert _sshdlog.command_pid("session_exit_message: pid 1") == 0
    assert (_exits.wait_status(3 << 8), _exits.wait_status(9), _exits.wait_status(0)) == (3, 137, 0)


def test_forwards_are_bounded() -> None:
    """A log with thousands of distinct forwards gives a bounded record."""
    lines = "".join(
        f"debug1: server_request_direct_tcpip: originator a port 1, target h{i} port {i}\n"
        for i in range(5000)
    )
    out = _sshdlog.forwards(lines).split(",")
    assert len(out) == _sshdlog.MAX_FORWARDS + 1
    assert out[-1] == f"+{5000 - _sshdlog.MAX_FORWARDS} more"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_session_record_has_forwards_and_exit_status(pool: Pool, users: dict[str, User]) -> None:
    """ssh-to-job -ssh 'ssh -L ... -R ...' -X J 'exit 3': the record lists the used -L, the -R
    and X11, and exit status 3 (a second session: a pty shell killed by a signal)."""
    a = users["a"]
    (jid,) = pool.submit(a, "/bin/sleep", "3000")
    pool.wait_state(jid, "running")
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    tport = target.getsockname()[1]
    lport, rport = _free_port(), _free_port()
    got: list[bytes] = []

    def serve() -> None:
        target.settimeout(20)
        try:
            conn, _ = target.accept()
        except OSError:
            return
        with conn:
            got.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proc = subprocess.Popen(
        [
            *a.prefix(),
            SSH_TO_JOB,
            "-X",
            "-ssh",
            f"ssh -L {lport}:127.0.0.1:{tport} -R {rport}:localhost:9",
            jid,
            "sleep 3; exit 3",
        ],
        env=pool.env(a, {"DISPLAY": ":9"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/tmp",
    )
    try:

        def through() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", lport), timeout=1) as c:
                    c.sendall(b"hello")
                    time.sleep(0.2)
            except OSError:
                return False
            return bool(got)

        wait_for("a connection through the -L forward", through, timeout=20)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        target.close()
    assert proc.returncode == 3, err
    assert got == [b"hello"]

    def record() -> dict[str, Any] | None:
        rows = json.loads(pool.stj(a, "history", "--sessions", "--json", jid).stdout)
        done = [r for r in rows if r["outcome"] == "granted" and r["ended"]]
        return done[0] if done else None

    row = wait_for("the session's record", record)
    assert set(row["forwards"].split(",")) == {"X11", f"R:{rport}", f"L:127.0.0.1:{tport}"}
    table = pool.stj(a, "history", "--sessions", jid).stdout
    (line,) = [x for x in table.splitlines() if "forwards:" in x]
    assert set(line.split("forwards:")[1].strip().split(", ")) == set(row["forwards"].split(","))
    assert row["exit_status"] == 3
    assert "exit status: 3" in table
    # A pty session whose shell is killed by a signal: 128 + 9.
    r = pool.ssh(a, "-ssh", "ssh -tt", jid, "kill -9 $$", timeout=30)
    assert r.returncode == 255 or r.returncode == 137, r

    def second() -> dict[str, Any] | None:
        rows = json.loads(pool.stj(a, "history", "--sessions", "--json", jid).stdout)
        done = [r for r in rows if r["outcome"] == "granted" and r["ended"]]
        return done[-1] if len(done) == 2 else None

    assert wait_for("the second record", second)["exit_status"] == 137
    pool.stj(a, "rm", jid)
