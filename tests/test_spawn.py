"""The clone3 spawner of a session's sshd (starter/stj-spawn.c, starter/_spawn.py).

Real processes: the spawner itself into a real cgroup v2 directory, and pools of their own
with real ssh-to-job/ssh/sshd and real uids, once with ``spawn = "clone3"`` (the default) and
once with ``spawn = "fork"`` (the subprocess path it falls back to). The error mapping is
checked without I/O.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import secrets
import shutil
import signal
from collections.abc import Callable, Iterator

import pytest
import trio
from conftest import ROOT, Pool, User, new_state_dir, wait_for
from test_ssh_security import (
    IO_TIMEOUT,
    Live,
    _close_sockets,
    _deadline,
    comm,
    user_tmp,
    wait_no_session_dirs,
)

from ssh_to_job.starter import _procs, _spawn

# The fixtures pytest finds here by name: the autouse deadline and socket clean-up, $TMPDIR.
__all__ = ["_close_sockets", "_deadline", "user_tmp"]

CGROUP_ROOT = _procs.find_cgroup_root()
needs_cgroups = pytest.mark.skipif(CGROUP_ROOT is None, reason="no writable cgroup v2 here")


# ---------------------------------------------------------------------------- error mapping


def test_exec_failure_is_the_oserror_subprocess_would_raise() -> None:
    """A failed exec becomes the errno's OSError subclass naming the program, like Popen's."""
    exc = _spawn.child_error(6, errno.ENOENT, "/no/sshd")
    assert isinstance(exc, FileNotFoundError)
    assert (exc.errno, exc.filename) == (errno.ENOENT, "/no/sshd")
    assert isinstance(_spawn.child_error(6, errno.EACCES, "/x"), PermissionError)


def test_a_failure_before_exec_names_the_step() -> None:
    """A failure between clone and exec (the id switch) is an OSError that says which step."""
    exc = _spawn.child_error(4, errno.EPERM, "/usr/sbin/sshd")
    assert isinstance(exc, PermissionError)
    assert "uid, gid and groups" in str(exc)
    assert "step 99" in str(_spawn.child_error(99, errno.EIO, "/x"))


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM, errno.EINVAL])
def test_clone3_unavailable_means_fall_back(err: int) -> None:
    """No clone3 (old kernel, seccomp) or no CLONE_INTO_CGROUP: the caller falls back."""
    assert isinstance(_spawn.clone_error(err), _spawn.Unavailable)


def test_other_clone3_failures_are_raised() -> None:
    """Out of processes or memory is a real error, not a reason to fork instead."""
    exc = _spawn.clone_error(errno.EAGAIN)
    assert isinstance(exc, BlockingIOError)
    assert "clone3" in str(exc)


# ---------------------------------------------------------------------------- the spawner


@pytest.fixture
def cgroup() -> Iterator[pathlib.Path]:
    """A fresh child cgroup of this process's own, removed afterwards."""
    assert CGROUP_ROOT is not None
    path = CGROUP_ROOT / f"stjt-spawn-{secrets.token_hex(4)}"
    path.mkdir()
    yield path
    _procs.kill_cgroup(path)
    for _ in range(100):
        try:
            path.rmdir()
            break
        except OSError:
            os.sched_yield()


async def run_spawned(
    argv: list[str], cgroup: pathlib.Path, user: User, pass_fds: tuple[int, ...] = ()
) -> tuple[int, str, str]:
    """Spawn ``argv`` as ``user`` into ``cgroup``; its return code, stdout and stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        with trio.fail_after(IO_TIMEOUT):
            proc = _spawn.spawn(
                argv,
                stdin=out_r,  # any descriptor: the probes do not read
                stdout=out_w,
                stderr=err_w,
                env={"PATH": "/usr/bin:/bin"},
                cgroup=cgroup,
                uid=user.uid,
                gid=user.gid,
                groups=sorted(set(os.getgrouplist(user.name or "root", user.gid))),
                pass_fds=pass_fds,
            )
            os.close(out_w)
            os.close(err_w)
            out_w = err_w = -1
            code = await proc.wait()
        # Small outputs: they fit in the pipes' buffers, so reading after the wait is fine.
        return code, os.read(out_r, 65536).decode(), os.read(err_r, 65536).decode()
    finally:
        for fd in (out_r, out_w, err_r, err_w):
            if fd >= 0:
                os.close(fd)


@needs_cgroups
async def test_spawned_child_starts_in_its_cgroup_as_the_user(
    cgroup: pathlib.Path, users: dict[str, User]
) -> None:
    """The child runs in the given cgroup as the user's uid, gid and groups, in /, in a session
    of its own, with fds 0-2 as given, the kept descriptor and nothing else of ours."""
    a = users["a"]
    kept = os.open("/dev/null", os.O_RDONLY)
    stray = os.open("/dev/null", os.O_RDONLY)  # inheritable, not passed: must not reach it
    os.set_inheritable(stray, True)
    # ls last and alone: a pipeline or a command substitution would show the shell's pipes.
    probe = (
        "grep ^0:: /proc/self/cgroup; id -u; id -g; id -G; pwd; cut -d' ' -f6 /proc/$$/stat; "
        "echo $$; echo to-stderr >&2; ls /proc/$$/fd"
    )
    try:
        code, out, err = await run_spawned(["sh", "-c", probe], cgroup, a, (kept,))
    finally:
        os.close(kept)
        os.close(stray)
    assert (code, err) == (0, "to-stderr\n")
    cg, uid, gid, groups, cwd, sid, pid, *fds = out.splitlines()
    assert CGROUP_ROOT is not None
    assert pathlib.Path(CGROUP_ROOT.parent, cg[3:].lstrip("/")).name == cgroup.name
    assert (int(uid), int(gid)) == (a.uid, a.gid)
    assert sorted(map(int, groups.split())) == sorted(set(os.getgrouplist(a.name or "", a.gid)))
    assert cwd == "/"
    assert sorted(map(int, fds)) == sorted([0, 1, 2, kept])
    assert sid == pid


@needs_cgroups
async def test_spawned_child_has_default_signals_and_an_empty_mask(
    cgroup: pathlib.Path, users: dict[str, User]
) -> None:
    """Signals the starter ignores or blocks are neither ignored nor blocked in the child."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        code, out, _err = await run_spawned(
            ["grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"], cgroup, users["a"]
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGUSR1, old)
    assert code == 0
    assert out.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


@needs_cgroups
async def test_exec_failure_raises_and_leaves_no_child(
    cgroup: pathlib.Path, users: dict[str, User]
) -> None:
    """A program that cannot be exec'ed raises FileNotFoundError, and its child is reaped."""
    with pytest.raises(FileNotFoundError) as info:
        await run_spawned(["/nonexistent/sshd", "-i"], cgroup, users["a"])
    assert info.value.filename == "/nonexistent/sshd"
    assert _procs.cgroup_pids(cgroup) == set()
    assert zombies(os.getpid()) == []


@needs_cgroups
async def test_the_starter_stays_dumpable(cgroup: pathlib.Path, users: dict[str, User]) -> None:
    """The child's uid switch, in memory it may share with the starter until its exec, does not
    leave the starter non-dumpable (no core dumps, no ptrace by root tools without the cap)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    get_dumpable = 3  # PR_GET_DUMPABLE
    assert prctl(get_dumpable, 0, 0, 0, 0) == 1
    code, _out, _err = await run_spawned(["true"], cgroup, users["a"])
    assert code == 0
    assert prctl(get_dumpable, 0, 0, 0, 0) == 1


@needs_cgroups
async def test_start_falls_back_to_fork_and_says_so_once(
    cgroup: pathlib.Path,
    users: dict[str, User],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the library (or clone3), start() forks with the preexec as before, and logs why
    once however many sessions follow."""
    a = users["a"]
    why = "the spawner /nowhere/libstjspawn.so cannot be loaded (gone)"
    monkeypatch.setattr(_spawn, "_load_error", why)
    monkeypatch.setattr(_spawn, "_fallbacks_logged", set())
    caplog.set_level("INFO", logger="stj.starter")
    for _ in range(2):
        proc = await _spawn.start(
            ["sleep", "60"],
            stdin=0,
            stdout=1,
            stderr=2,
            env={"PATH": "/usr/bin:/bin"},
            cgroup=cgroup,
            uid=a.uid,
            gid=a.gid,
            groups=[a.gid],
            preexec=_procs.make_preexec(a.uid, a.gid, [a.gid], cgroup),
        )
        assert isinstance(proc, trio.Process)
        assert _procs.cgroup_pids(cgroup) == {proc.pid}
        proc.kill()
        with trio.fail_after(IO_TIMEOUT):
            await proc.wait()
    said = [r.getMessage() for r in caplog.records if "start by fork" in r.getMessage()]
    assert said == [f"sessions' sshd start by fork, not clone3: {why}"]


def children(parent: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of each child of ``parent``."""
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_bytes()
            except OSError:
                continue
            at = raw.rindex(b")")
            fields = raw[at + 2 :].split()
            if int(fields[1]) == parent:
                name = raw[raw.index(b"(") + 1 : at].decode(errors="replace")
                out.append((int(entry.name), name, fields[0].decode()))
    return out


def zombies(parent: int) -> list[int]:
    return [pid for pid, _name, state in children(parent) if state == "Z"]


@needs_cgroups
async def test_kill_and_wait_go_through_the_pidfd(
    cgroup: pathlib.Path, users: dict[str, User]
) -> None:
    """kill() ends the child, wait() reaps it and gives -SIGKILL; later kills do nothing."""
    a = users["a"]
    proc = _spawn.spawn(
        ["sleep", "60"],
        stdin=0,
        stdout=1,
        stderr=2,
        env={"PATH": "/usr/bin:/bin"},
        cgroup=cgroup,
        uid=a.uid,
        gid=a.gid,
        groups=[a.gid],
    )
    assert proc.poll() is None
    assert _procs.cgroup_pids(cgroup) == {proc.pid}
    proc.kill()
    with trio.fail_after(IO_TIMEOUT):
        assert await proc.wait() == -signal.SIGKILL
    assert proc.returncode == -signal.SIGKILL
    proc.kill()
    assert await proc.wait() == -signal.SIGKILL


# ---------------------------------------------------------------------------- in a real pool


@pytest.fixture(scope="module")
def fork_pool(users: dict[str, User]) -> Iterator[Pool]:
    """A pool whose starter starts sessions' sshd the old way (fork, then a cgroup write)."""
    su = users["su"].name
    p = Pool(new_state_dir(), f'[broker]\nsuperusers = ["{su}"]\n[starter]\nspawn = "fork"\n')
    p.start()
    yield p
    p.stop()
    shutil.rmtree(p.state, ignore_errors=True)


def cgroup_of(pid: int) -> str:
    text = pathlib.Path(f"/proc/{pid}/cgroup").read_text()
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def status(pid: int) -> dict[str, str]:
    text = pathlib.Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for entry in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            out[int(entry.name)] = os.readlink(entry)
        except OSError:
            continue
    return out


@needs_cgroups
@pytest.mark.parametrize("spawn", ["clone3", "fork"])
def test_session_sshd_runs_in_its_session_cgroup_as_the_job_owner(
    request: pytest.FixtureRequest,
    users: dict[str, User],
    user_tmp: Callable[[User], pathlib.Path],
    spawn: str,
) -> None:
    """Either way, a live session's sshd is in the session's cgroup below the job's, runs as the
    job owner's uid, gid and groups, has its log as fd 2, and shares no descriptor with the
    starter but the session socket; its command gets fds 0-2 only."""
    pool: Pool = request.getfixturevalue("pool" if spawn == "clone3" else "fork_pool")
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    main = pool.wait_state(job, "running")["pids"][0]
    live = Live(pool, a, job, user_tmp(a), "echo ready; exec sleep 60")
    try:
        (starter,) = pool.pids("starter")
        (sshd,) = [pid for pid, name, _state in children(starter) if name == "sshd"]
        assert cgroup_of(sshd) == f"{cgroup_of(main)}/session-{live.starter_dir.name}"
        st = status(sshd)
        assert st["Uid"].split() == [str(a.uid)] * 4
        assert st["Gid"].split() == [str(a.gid)] * 4
        want_groups = sorted(set(os.getgrouplist(a.name or "", a.gid)))
        assert sorted(map(int, st["Groups"].split())) == want_groups
        theirs = fd_targets(sshd)
        assert theirs[2] == str(live.starter_dir / "sshd.log")
        # sshd -i moves the session socket off fds 0-1 (and puts /dev/null there); the
        # starter keeps a duplicate of it to count its bytes. No other socket, pipe or anonymous
        # inode may be shared (files by path, /dev/null, are told apart by nothing).
        shared = {t for t in theirs.values() if not t.startswith("/")} & set(
            fd_targets(starter).values()
        )
        assert len(shared) == 1, f"the starter's descriptors leaked into sshd: {theirs}"
        assert shared.pop().startswith("socket:")
        (cmd,) = [
            pid
            for pid in _procs.cgroup_pids(pathlib.Path(pool_cgroup_dir(sshd)))
            if comm(pid) == "sleep"
        ]
        assert sorted(fd_targets(cmd)) == [0, 1, 2]
        said = "sessions' sshd start by fork, not clone3"
        if spawn == "clone3":
            assert said not in pool.log.read_text()
        else:
            assert f'{said}: [starter] spawn = "fork"' in pool.log.read_text()
    finally:
        live.stop()
        pool.stj(ROOT, "rm", job, check=False)


def pool_cgroup_dir(pid: int) -> str:
    """The directory of ``pid``'s cgroup v2."""
    assert CGROUP_ROOT is not None
    mounts = pathlib.Path("/proc/self/mounts").read_text().splitlines()
    mount = next(m.split()[1] for m in mounts if m.split()[2] == "cgroup2")
    return os.path.join(mount, cgroup_of(pid).lstrip("/"))


@needs_cgroups
def test_unstartable_sshd_fails_the_session_cleanly(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """An sshd that cannot be exec'ed (its path gone after the starter checked it) fails the
    session with "session set-up failed" naming it, and leaves no process, cgroup or dir."""
    a = users["a"]
    sshd = new_state_dir() / "sshd"  # 0755: the job's uid must reach it to get ENOENT
    sshd.symlink_to("/usr/sbin/sshd")
    pool = make_pool(f'[starter]\nsshd = "{sshd}"\n')
    sshd.unlink()
    (job,) = pool.submit(a, "/bin/sleep", "300")
    main = pool.wait_state(job, "running")["pids"][0]
    r = pool.ssh(a, job, "true", timeout=IO_TIMEOUT)
    assert r.returncode != 0
    assert "session set-up failed" in r.stderr, r.stderr
    assert "No such file or directory" in r.stderr, r.stderr
    assert str(sshd) in r.stderr, r.stderr
    wait_no_session_dirs(pool)
    job_cgroup = pathlib.Path(pool_cgroup_dir(main))
    wait_for("the session cgroup to go", lambda: not list(job_cgroup.glob("session-*")))
    (starter,) = pool.pids("starter")
    left = [(pid, name) for pid, name, state in children(starter) if name == "sshd" or state == "Z"]
    assert left == []
    assert pool.job(job)["state"] == "running"
    sshd.parent.rmdir()
