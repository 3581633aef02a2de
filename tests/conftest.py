"""Shared fixtures: real users, real pools (broker + starter processes), real OpenSSH.

Everything here runs the *installed* package (the venv's ``stj`` and ``ssh-to-job``), as the
CI does, as root, creating the users it needs. A ``Pool`` is a running ``stj pool`` in its own
state directory under /tmp (traversable by job users, unlike pytest's tmp_path).
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest

BIN = pathlib.Path(sys.executable).parent
STJ = str(BIN / "stj")
SSH_TO_JOB = str(BIN / "ssh-to-job")
#: A uid with no passwd entry (checked below), for "any uid" tests.
BARE_UID = 62001
USERS = ("stjta", "stjtb", "stjtsu")


def pytest_configure(config: pytest.Config) -> None:
    if os.getuid() != 0:
        raise pytest.UsageError("the ssh-to-job suite runs real uids: run it as root")
    pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


class User:
    def __init__(self, name: str | None, uid: int, gid: int, home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    def prefix(self) -> list[str]:
        if self.uid == 0:
            return []
        groups = ["--init-groups"] if self.name else ["--clear-groups"]
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups]

    def __repr__(self) -> str:
        return f"User({self.name or self.uid})"


def _ensure_user(name: str) -> User:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@pytest.fixture(scope="session")
def users() -> dict[str, User]:
    """Test users: two ordinary ones (a, b), a queue superuser (su), root and a bare uid."""
    made = {n: _ensure_user(n) for n in USERS}
    try:
        pwd.getpwuid(BARE_UID)
        raise RuntimeError(f"uid {BARE_UID} must have no passwd entry for these tests")
    except KeyError:
        pass
    # The users stay afterwards: several test runs may share them, and they own nothing.
    return {
        "a": made["stjta"],
        "b": made["stjtb"],
        "su": made["stjtsu"],
        "root": User("root", 0, 0, "/root"),
        "bare": User(None, BARE_UID, BARE_UID, "/tmp"),
    }


class Pool:
    """A running personal pool (broker and starter processes) in its own state directory."""

    def __init__(
        self, state: pathlib.Path, config: str = "", slots: int = 4, debug: bool = False
    ) -> None:
        self.state = state
        self.debug = debug
        self.config_path = state / "config.toml"
        self.config_path.write_text(config)
        self.slots = slots
        self.log = state / "pool.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, user: User, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "STJ_STATE_DIR": str(self.state),
            "STJ_CONFIG": str(self.config_path),
            "HOME": user.home,
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
            "TMPDIR": "/tmp",
            # One full session per command, as most tests count on (tests/test_mux.py turns
            # the repeat-command master back on).
            "SSH_TO_JOB_MUX": "0",
        }
        if user.name:
            env["USER"] = env["LOGNAME"] = user.name
        env.update(extra or {})
        return env

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    STJ,
                    "pool",
                    "--state-dir",
                    str(self.state),
                    "--config",
                    str(self.config_path),
                    "--slots",
                    str(self.slots),
                    *(["--debug"] if self.debug else []),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env(ROOT),
                start_new_session=True,
            )
        self.wait_for_starter()

    def wait_for_starter(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.stj(ROOT, "status", "--json", check=False)
            starters = json.loads(r.stdout)["starters"] if r.returncode == 0 else []
            if any(s["connected"] for s in starters):
                return
            time.sleep(0.1)
        raise AssertionError(f"no starter connected within {timeout} s:\n{self.log_text()}")

    def pids(self, role: str) -> list[int]:
        """pids of this pool's 'broker' or 'starter' process."""
        out = subprocess.run(
            ["pgrep", "-f", f"ssh_to_job.{role} --state-dir {self.state} "],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for role in ("starter", "broker"):
            for pid in self.pids(role):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def run(
        self,
        user: User,
        argv: Sequence[str],
        *,
        input: bytes | str | None = None,
        timeout: float = 60,
        check: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as ``user`` with this pool's environment; text output."""
        return subprocess.run(
            [*user.prefix(), *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd=cwd or "/tmp",
            env=self.env(user, env),
        )

    def stj(
        self, user: User, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        r = self.run(user, [STJ, *args], timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(
                f"stj {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n"
                f"{r.stderr}\n--- pool log ---\n{self.log_text()}"
            )
        return r

    def ssh(
        self,
        user: User,
        *args: str,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(user, [SSH_TO_JOB, *args], timeout=timeout, input=input, env=env)

    def submit(self, user: User, *argv: str, count: int = 1) -> list[str]:
        r = self.stj(user, "submit", "-n", str(count), *argv)
        ids = r.stdout.split(":", 1)[1].split()
        assert len(ids) == count, r.stdout
        return ids

    def jobs(self, history: bool = False) -> dict[str, dict[str, Any]]:
        r = self.stj(ROOT, "history" if history else "q", "--json")
        return {j["id"]: j for j in json.loads(r.stdout)}

    def job(self, job_id: str) -> dict[str, Any]:
        live = self.jobs()
        if job_id in live:
            return live[job_id]
        return self.jobs(history=True)[job_id]

    def wait_state(self, job_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                job = self.job(job_id)
            except KeyError:
                job = {}
            if job.get("state") == state and (state != "running" or job.get("pids")):
                return job
            time.sleep(0.1)
        raise AssertionError(
            f"job {job_id} did not become {state} (last: {job})\n{self.log_text()}"
        )


ROOT = User("root", 0, 0, "/root")
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 15) -> T:
    """Poll ``probe`` until it returns something true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def session_entries(runtime: pathlib.Path) -> list[pathlib.Path]:
    """What a client's runtime directory holds besides the config memo
    (``common._where.CONFIG_MEMO``, kept across sessions on purpose)."""
    return sorted(p for p in runtime.iterdir() if p.name != "config-state-dir")


def new_state_dir() -> pathlib.Path:
    d = pathlib.Path("/tmp") / f"stjt-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


@pytest.fixture
def make_pool(users: dict[str, User]) -> Iterator[Any]:
    """Factory: start pools with a given config; all are stopped and removed afterwards."""
    pools: list[Pool] = []

    def make(config: str = "", slots: int = 4, start: bool = True, debug: bool = False) -> Pool:
        su = users["su"].name
        cfg = f'[broker]\nsuperusers = ["{su}"]\n' + config
        pool = Pool(new_state_dir(), cfg, slots, debug)
        pools.append(pool)
        if start:
            pool.start()  # on failure the teardown below still stops it
        return pool

    yield make
    for pool in pools:
        pool.stop()
        shutil.rmtree(pool.state, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(users: dict[str, User]) -> Iterator[Pool]:
    """One shared pool per test module (tests must not stop it)."""
    su = users["su"].name
    p = Pool(new_state_dir(), f'[broker]\nsuperusers = ["{su}"]\n', slots=8)
    try:
        p.start()
    except BaseException:
        p.stop()
        raise
    yield p
    p.stop()
    shutil.rmtree(p.state, ignore_errors=True)


#: Forwarding tests: a one-shot TCP server on 127.0.0.1:argv[1] that sends argv[2].
SERVE_ONCE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.sendall(sys.argv[2].encode())
c.close()
"""

#: ... and its client: what 127.0.0.1:argv[1] sends (through a SOCKS5 proxy to argv[2]).
READ_FROM = """
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
        break
    except OSError:
        time.sleep(0.1)
if len(sys.argv) > 2:  # through a SOCKS5 proxy to 127.0.0.1:argv[2]
    c.sendall(b"\\x05\\x01\\x00")
    assert c.recv(2) == b"\\x05\\x00"
    to = socket.inet_aton("127.0.0.1") + int(sys.argv[2]).to_bytes(2, "big")
    c.sendall(b"\\x05\\x01\\x00\\x01" + to)
    assert c.recv(10)[:2] == b"\\x05\\x00"
data = b""
while chunk := c.recv(100):
    data += chunk
print(data.decode())
"""
