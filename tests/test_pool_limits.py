"""Issue 9, the broker's bounds (real processes): a flood of connections from one uid does not
stop another uid, and one broker per state directory."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

from conftest import ROOT, Pool, User

#: Runs as the flooding user: opens N connections to the broker (every third one with a
#: half-sent frame), counts the ones refused with an error frame, and holds the rest open
#: until its stdin closes.
FLOOD = textwrap.dedent(
    """
    import socket, struct, sys
    path, n = sys.argv[1], int(sys.argv[2])
    held, refused = [], 0
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if i % 3 == 0:
            s.sendall(struct.pack(">I", 1 << 20) + b'{"type": "sub')
        held.append(s)
    for s in held:
        s.settimeout(0.2)
        try:
            data = s.recv(4096)
        except (TimeoutError, OSError):
            continue
        if b"busy" in data:
            refused += 1
    print(f"open {n} refused {refused}", flush=True)
    sys.stdin.read()
    """
)


def _timed(pool: Pool, user: User, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    r = pool.stj(user, *args)
    return time.monotonic() - start, r


def test_flood_from_one_uid_leaves_others_served(make_pool: Any, users: dict[str, User]) -> None:
    """300 connections from one uid (a third of them with half-sent 1 MiB frames) are capped at
    max_connections_per_uid (the rest get a "busy" error frame), while another uid's `stj q`
    answers within a second and its ssh-to-job session still works."""
    pool: Pool = make_pool()
    a, b = users["a"], users["b"]
    (job,) = pool.submit(b, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    flood = subprocess.Popen(
        [*a.prefix(), sys.executable, "-c", FLOOD, str(pool.state / "broker.sock"), "300"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flood.stdout is not None
        line = flood.stdout.readline()
        assert line.startswith("open 300 refused "), line
        refused = int(line.split()[-1])
        # 64 per uid by default: everything past that is refused at once, with a reason.
        assert refused >= 300 - 64 - 5, line
        for _ in range(5):
            took, r = _timed(pool, b, "q", "--nobatch", "--owner", "stjtb")
            assert job in r.stdout
            assert took < 1.0, f"stj q took {took:.2f} s during the flood"
        start = time.monotonic()
        r = pool.ssh(b, job, "echo", "still-served", timeout=30)
        assert r.returncode == 0, r.stderr
        assert "still-served" in r.stdout
        assert time.monotonic() - start < 10
    finally:
        assert flood.stdin is not None
        flood.stdin.close()
        flood.wait(10)
        if flood.stdout is not None:
            flood.stdout.close()
        pool.stj(ROOT, "rm", job, check=False)
    assert pool.pids("broker"), "the broker died"


def test_a_second_broker_on_a_state_dir_exits_naming_the_first(
    make_pool: Any, users: dict[str, User]
) -> None:
    """A second `python -m ssh_to_job.broker` on a live state dir exits 1 at once, saying which
    pid holds it; the first broker keeps serving."""
    pool: Pool = make_pool()
    (first,) = pool.pids("broker")
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "ssh_to_job.broker", "--state-dir", str(pool.state)],
        capture_output=True,
        text=True,
        timeout=30,
        env=pool.env(ROOT),
        check=False,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"pid {first}" in r.stderr
    assert "already running" in r.stderr
    assert time.monotonic() - start < 10
    assert pool.pids("broker") == [first]
    pool.stj(ROOT, "q")


def test_a_slow_sender_on_the_unix_socket_is_cut_at_frame_timeout(
    make_pool: Any, users: dict[str, User]
) -> None:
    """A local user sending a byte every half second is disconnected after frame_timeout (2 s here),
    not held for the idle timeout (the unix socket used to ignore frame_timeout)."""
    pool: Pool = make_pool("frame_timeout = 2.0\n")
    frame = b"\x00\x00\x00\x40" + b'{"type": "status"}' + b" " * 46
    start = time.monotonic()
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(pool.state / "broker.sock"))
        s.settimeout(0.5)
        try:
            for byte in frame:
                s.send(bytes([byte]))
                sent += 1
                try:
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    pass  # still open: the half-second wait is our "one byte a second"
        except OSError:
            pass  # the broker hung up mid-send
    took = time.monotonic() - start
    assert sent < len(frame)
    assert took < 6, took
