"""``stj pool``: a broker and a starter on this host, supervised.

The two daemons run as separate processes so that either can die without the other (the
starter keeps the jobs while a broker restarts). The supervisor restarts a daemon that dies,
with backoff, and says why; its own death, even by SIGKILL, takes both down (the kernel's
parent-death signal), so no daemon is ever left unsupervised. A second ``stj pool`` on the same
state directory is refused, naming the running one: the daemons' own locks would refuse a second
broker or starter anyway, but the supervisor must not sit restarting them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable

#: Backoff between restarts of one daemon: doubles from the first to the last, and starts
#: again from the first once the daemon has stayed up for STABLE seconds.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE = 60.0
#: A daemon that exits with this status was given bad flags or config: restarting cannot help.
USAGE_EXIT = 2
_PR_SET_PDEATHSIG = 1


class PoolLocked(RuntimeError):
    """Another ``stj pool`` already supervises this state directory."""


def lock_pool(state: pathlib.Path) -> int:
    """Hold ``<state>/pool.lock`` for this process's life; PoolLocked names the holder."""
    path = state / "pool.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise PoolLocked(
            f"a pool is already running in {state} (stj pool pid {holder}); "
            "stop it first, or use another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _die_with_parent(parent: int, sig: int) -> Callable[[], None]:
    """A preexec hook: the child gets ``sig`` when the supervisor dies, however it dies."""

    def hook() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the prctl took effect
            os.kill(os.getpid(), sig)

    return hook


def _say(msg: str) -> None:
    print(f"stj pool: {msg}", file=sys.stderr, flush=True)


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


class Daemon:
    """One supervised daemon: its argv, its process, and its restart schedule."""

    def __init__(self, role: str, argv: list[str], death_signal: int) -> None:
        self.role = role
        self.argv = argv
        self.death_signal = death_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = BACKOFF_FIRST
        self.restart_at: float | None = None

    def start(self) -> None:
        hook = _die_with_parent(os.getpid(), self.death_signal)
        self.proc = subprocess.Popen(self.argv, preexec_fn=hook)
        self.started = time.monotonic()
        self.restart_at = None

    def check(self, now: float) -> int | None:
        """Restart if due; returns the exit status if it just died (None otherwise)."""
        if self.proc is None:
            return None
        if self.restart_at is not None:
            if now >= self.restart_at:
                _say(f"restarting the {self.role}")
                self.start()
            return None
        code = self.proc.poll()
        if code is None:
            return None
        if now - self.started >= STABLE:
            self.backoff = BACKOFF_FIRST
        self.restart_at = now + self.backoff
        _say(
            f"the {self.role} (pid {self.proc.pid}) exited with {_how(code)}; "
            f"restarting it in {self.backoff:g} s"
        )
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def supervise(state: pathlib.Path, broker: list[str], starter: list[str], label: str) -> int:
    """Run the broker, then the starter, and keep both running until SIGTERM/SIGINT/SIGHUP."""
    addr = state / "broker.addr"
    addr.unlink(missing_ok=True)
    # When the supervisor dies (even by SIGKILL) its daemons go too, never left unsupervised:
    # the broker stops cleanly (its queue is on disk); the starter goes as if killed, which
    # leaves its jobs running for the next pool's starter to take back, so that the death of
    # a supervisor is not the death of every job (a Ctrl-C of stj pool still ends them).
    daemons = [
        Daemon("broker", broker, signal.SIGTERM),
        Daemon("starter", starter, signal.SIGKILL),
    ]

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        b = daemons[0]
        b.start()
        assert b.proc is not None
        deadline = time.monotonic() + 10
        while not addr.exists() and b.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not addr.exists():
            code = b.proc.poll()
            _say("the broker did not start" + (f" ({_how(code)})" if code is not None else ""))
            return 1
        daemons[1].start()
        pids = ", ".join(f"{d.role} pid {d.proc.pid}" for d in daemons if d.proc)
        _say(f"{label} running in {state} ({pids}); Ctrl-C stops it")
        while True:
            now = time.monotonic()
            for d in daemons:
                code = d.check(now)
                if code == USAGE_EXIT and now - d.started < 5:
                    _say(f"the {d.role} refused its configuration; stopping the pool")
                    return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        # The starter first: it ends its jobs while the broker can still hear about it.
        for d in reversed(daemons):
            d.stop()
        for d in reversed(daemons):
            d.wait(15)
