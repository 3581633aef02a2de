"""Starting a session's sshd straight into its session cgroup, with clone3.

The usual way (subprocess with :func:`._procs.make_preexec`) forks the starter and has the child
write itself into the session cgroup: that move waits for an RCU grace period in the kernel
(5 to 40 ms, the largest share of the starter's set-up of a cold session). The C spawner
``libstjspawn.so`` (``stj-spawn.c``, built at install time, loaded here with ctypes)
uses ``clone3(CLONE_INTO_CGROUP | CLONE_PIDFD)`` instead: the child starts in the session
cgroup, drops to the job's ids with raw system calls and execs sshd; the starter keeps a pidfd
to wait on and signal.

Where it cannot be used (no cgroup for the session, the library missing, a kernel or seccomp
filter without clone3, ``[starter] spawn = "fork"``), :func:`start` takes the usual path and
says so once in the log.

Must never: run Python in the child; hide an exec failure (it raises OSError like subprocess);
signal or reap a pid other than the child's own (everything goes through its pidfd).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import pathlib
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

log = logging.getLogger("stj.starter")

LIBRARY = pathlib.Path(__file__).resolve().parent / "libstjspawn.so"

_INT_P = ctypes.POINTER(ctypes.c_int)
_UINT_P = ctypes.POINTER(ctypes.c_uint)
_CHAR_PP = ctypes.POINTER(ctypes.c_char_p)
#: int stj_spawn(const char *path, char *const argv[], char *const envp[], int cgroup_fd,
#:               const int std[3], const int *keep, int nkeep, int change_ids,
#:               unsigned int uid, unsigned int gid, const unsigned int *groups,
#:               int ngroups, int *pidfd, int *err, int *stage);
_ARGTYPES = (
    ctypes.c_char_p,
    _CHAR_PP,
    _CHAR_PP,
    ctypes.c_int,
    _INT_P,
    _INT_P,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint,
    _UINT_P,
    ctypes.c_int,
    _INT_P,
    _INT_P,
    _INT_P,
)

#: The child's steps as stj-spawn.c numbers them, for error messages.
STAGES = {
    1: "setting up its descriptors",
    2: "resetting its signal mask",
    3: "starting a new session (setsid)",
    4: "switching to the job's uid, gid and groups",
    5: "changing to /",
    6: "exec",
}
_EXEC = 6
#: clone3 errors that mean "not here" rather than "failed": no clone3 (old kernel, a seccomp
#: filter answering ENOSYS or EPERM), or no CLONE_INTO_CGROUP (EINVAL before Linux 5.7).
FALLBACK_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EINVAL})
#: stj-spawn.c's MAX_KEEP.
MAX_KEEP = 16


class Unavailable(Exception):
    """clone3 spawning cannot be used here; the caller takes the fork path."""


_lib: Any = None
_load_error = ""
#: Why sessions' sshd went the fork path, each said once in the log.
_fallbacks_logged: set[str] = set()


def _load() -> Any:
    """The spawner's ``stj_spawn``, with its C signature (ctypes checks every argument)."""
    global _lib, _load_error
    if _load_error:
        raise Unavailable(_load_error)
    if _lib is None:
        try:
            lib = ctypes.CDLL(os.fsdecode(LIBRARY), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as exc:
            _load_error = f"the spawner {LIBRARY} cannot be loaded ({exc})"
            raise Unavailable(_load_error) from None
        fn = lib.stj_spawn
        fn.argtypes = _ARGTYPES
        fn.restype = ctypes.c_int
        _lib = fn
    return _lib


def child_error(stage: int, err: int, path: str) -> OSError:
    """The OSError for a child that failed at ``stage`` with ``err`` (as subprocess raises:
    an exec failure names the program, so a missing one is a FileNotFoundError)."""
    if stage == _EXEC:
        return OSError(err, os.strerror(err), path)
    step = STAGES.get(stage, f"step {stage}")
    return OSError(err, f"{os.strerror(err)} (the child of the starter, {step})")


def clone_error(err: int) -> Exception:
    """What clone3's own failure means: fall back (``Unavailable``) or a real OSError."""
    if err in FALLBACK_ERRNOS:
        return Unavailable(f"clone3 into a cgroup is not available here ({os.strerror(err)})")
    return OSError(err, f"clone3: {os.strerror(err)}")


class Process:
    """A child started by :func:`spawn`: what ``_session._serve`` uses of ``trio.Process``.

    Waited on and signalled through its pidfd, so a reused pid is never touched."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd

    def __repr__(self) -> str:
        return f"<spawned process {self.pid}: returncode {self.returncode}>"

    def poll(self) -> int | None:
        """Reap the child if it has exited; its return code (negative: killed by a signal)."""
        if self.returncode is None and self._pidfd >= 0:
            info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            if info is None or info.si_pid == 0:
                return None
            code = info.si_status
            self.returncode = code if info.si_code == os.CLD_EXITED else -code
            self._close()
        return self.returncode

    async def wait(self) -> int:
        while self.poll() is None:
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            except trio.ClosedResourceError:
                pass  # another task reaped it
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd >= 0:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _close(self) -> None:
        fd, self._pidfd = self._pidfd, -1
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


def spawn(
    argv: Sequence[str],
    *,
    stdin: int,
    stdout: int,
    stderr: int,
    env: Mapping[str, str],
    cgroup: pathlib.Path,
    uid: int,
    gid: int,
    groups: Sequence[int],
    pass_fds: Sequence[int] = (),
) -> Process:
    """Start ``argv`` in ``cgroup`` as ``uid``/``gid``/``groups``, in a new session, in /, with
    fds 0-2 from ``stdin``/``stdout``/``stderr``, ``pass_fds`` kept and no other descriptor.

    Returns once the child has exec'ed. Raises OSError when it could not (nothing is left
    behind), :class:`Unavailable` when clone3 cannot be used here."""
    stj_spawn = _load()
    root = os.getuid() == 0
    if not root and uid != os.getuid():
        raise PermissionError("a non-root starter can only run jobs as its own uid")
    keep = sorted(set(pass_fds))
    if len(keep) > MAX_KEEP or any(fd < 3 for fd in keep):
        raise ValueError(f"pass_fds must be at most {MAX_KEEP} descriptors, each above 2")
    path = argv[0]
    if "/" not in path:
        found = shutil.which(path, path=env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        path = found
    # Everything the child reads is made here, before the clone: it must not allocate.
    # (ctypes keeps the bytes objects alive with the arrays that point into them, and passes
    # an array where its argtypes say a pointer to the element type.)
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
    c_envp = (ctypes.c_char_p * (len(env) + 1))(
        *[os.fsencode(f"{k}={v}") for k, v in env.items()], None
    )
    std = (ctypes.c_int * 3)(stdin, stdout, stderr)
    c_keep = (ctypes.c_int * max(len(keep), 1))(*keep)
    c_groups = (ctypes.c_uint * max(len(groups), 1))(*groups)
    pidfd, err, stage = ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_int(0)
    cgfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pid = stj_spawn(
            os.fsencode(path),
            c_argv,
            c_envp,
            cgfd,
            std,
            c_keep,
            len(keep),
            1 if root else 0,
            uid,
            gid,
            c_groups,
            len(groups),
            ctypes.byref(pidfd),
            ctypes.byref(err),
            ctypes.byref(stage),
        )
    finally:
        os.close(cgfd)
    if pid < 0:
        if stage.value == 0:
            raise clone_error(err.value)
        raise child_error(stage.value, err.value, path)
    return Process(pid, pidfd.value)


async def start(
    argv: Sequence[str],
    *,
    stdin: int,
    stdout: int,
    stderr: int,
    env: Mapping[str, str],
    cgroup: pathlib.Path | None,
    uid: int,
    gid: int,
    groups: Sequence[int],
    preexec: Callable[[], None],
    pass_fds: Sequence[int] = (),
    mode: str = "clone3",
) -> Process | trio.Process:
    """A session's sshd, with :func:`spawn` where it can be used, else as subprocess does it
    (fork, ``preexec`` joins the cgroup and drops privileges, exec)."""
    if mode != "clone3":
        _fall_back(f'[starter] spawn = "{mode}"')
    elif cgroup is None:
        _fall_back("no session cgroup (cgroups off or not writable here, or a Slurm job)")
    else:
        # In a worker thread, as trio runs Popen: the spawner returns only once the child has
        # exec'ed, and once it runs as the job's uid the job's processes may signal it (a
        # SIGSTOP before its exec). That holds up this session, not the starter's event loop,
        # until the job's cgroup is killed.
        call = functools.partial(
            spawn,
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cgroup=cgroup,
            uid=uid,
            gid=gid,
            groups=groups,
            pass_fds=pass_fds,
        )
        try:
            return await trio.to_thread.run_sync(call)
        except Unavailable as exc:
            _fall_back(str(exc))
    return await trio.lowlevel.open_process(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(env),
        cwd="/",
        preexec_fn=preexec,
        pass_fds=tuple(pass_fds),
    )


def _fall_back(why: str) -> None:
    if why not in _fallbacks_logged:
        _fallbacks_logged.add(why)
        log.info("sessions' sshd start by fork, not clone3: %s", why)


# The first session should not pay for the dlopen: load it with the starter.
# A failure is only remembered here; spawn() raises Unavailable and start() falls back.
try:
    _load()
except Unavailable:
    pass
