"""Process trees the starter can count, suspend, resume and kill as a whole.

A job and the sshd sessions into it share one *job group*. Where the host has a writable cgroup
v2 hierarchy, the group is a cgroup (``cgroup.kill`` and ``cgroup.freeze`` act on every process
in it, however it forked); sessions get a child cgroup each, so the job's own pids can be told
apart from the sessions'. Without cgroups, the group is the set of descendants of its leaders
found through /proc, plus every process still in the job's session (the reaper starts one:
a job's ``sleep 1000 &`` that its shell left behind keeps that session when it is reparented,
and the kernel never hands a session's id to another while one of its members lives). Only a
process that starts a session of its own (a daemon's double fork) escapes; the admin guide says
so.

Processes are started as the job's uid with the ``preexec_fn`` that :func:`make_preexec` makes:
the child joins the cgroup while still root, then drops to the job's gid, groups and uid, then
execs. Nothing of the starter's own privilege survives the exec. A session's sshd is started by
:mod:`._spawn` instead where it can be: ``clone3`` creates it already in the session's cgroup.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import signal
from collections.abc import Callable, Iterable

log = logging.getLogger("stj.starter")


def find_cgroup_root() -> pathlib.Path | None:
    """The cgroup v2 directory this process lives in, if it is writable."""
    try:
        mounts = pathlib.Path("/proc/self/mounts").read_text().splitlines()
        own = pathlib.Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    mount = next((m.split()[1] for m in mounts if m.split()[2:3] == ["cgroup2"]), None)
    rel = next((line[3:] for line in own if line.startswith("0::")), None)
    if mount is None or rel is None:
        return None
    base = pathlib.Path(mount) / rel.lstrip("/")
    if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
        return None
    return base


class JobGroup:
    """All processes of one job: its own and its sessions'."""

    def __init__(self, cgroup: pathlib.Path | None) -> None:
        self.cgroup = cgroup
        self.leaders: list[int] = []
        #: Without cgroups: the job's session id (its reaper is the session leader), 0 if none,
        #: and the job's uid: only that uid's processes count (a session id can be handed out
        #: again once every member of the session is gone).
        self.session = 0
        self.uid = -1
        #: Without cgroups: processes the starter started *for the job* (its tmux server),
        #: counted with the job's own, not its sessions'. Our children until reaped.
        self.members: list[int] = []
        if cgroup is not None:
            cgroup.mkdir(exist_ok=True)

    def session_cgroup(self, session_id: str) -> pathlib.Path | None:
        if self.cgroup is None:
            return None
        path = self.cgroup / f"session-{session_id[:16]}"
        path.mkdir(exist_ok=True)
        return path

    def adopt(self, pid: int) -> None:
        """Count ``pid`` and its descendants in the group: a session's sshd, which is the
        starter's child, not the job's. (With a cgroup it joined before its exec.)"""
        if self.cgroup is None:
            self.leaders.append(pid)

    async def settle(self, pid: int) -> None:
        """Finish adopting ``pid`` before it runs on (a Slurm job's group asks slurmstepd)."""

    def release(self, pid: int) -> None:
        """Forget an adopted process once it is reaped: its pid may be reused by a stranger."""
        if pid in self.leaders and self.cgroup is None:
            self.leaders.remove(pid)

    def add_member(self, pid: int) -> None:
        """Count ``pid`` and its descendants among the job's own processes (with a cgroup it
        joined the job's before its exec)."""
        if self.cgroup is None:
            self.members.append(pid)

    def release_member(self, pid: int) -> None:
        if pid in self.members:
            self.members.remove(pid)

    def own_pids(self, main_pid: int, hidden: Iterable[int] = ()) -> list[int]:
        """The job's processes (not its sessions', nor ``hidden`` ones such as its reaper),
        the main process first."""
        if self.cgroup is not None:
            skip = set(hidden)
            pids = [p for p in _read_pids(self.cgroup / "cgroup.procs") if p not in skip]
        else:
            skip = set(hidden)
            members = {p for p in self.members if _alive(p)}
            found = (
                _descendants([main_pid, *self.members])
                | members
                | _in_session(self.session, self.uid)
            )
            pids = sorted((found | ({main_pid} if _alive(main_pid) else set())) - skip)
        rest = [p for p in pids if p != main_pid]
        return ([main_pid] if main_pid in pids else []) + rest

    def all_pids(self) -> set[int]:
        if self.cgroup is not None:
            return cgroup_pids(self.cgroup)
        roots = [*self.leaders, *self.members]
        return (
            _descendants(roots)
            | {p for p in roots if _alive(p)}
            | _in_session(self.session, self.uid)
        )

    def kill(self) -> None:
        if self.cgroup is not None and (self.cgroup / "cgroup.kill").exists():
            try:
                (self.cgroup / "cgroup.kill").write_text("1")
                return
            except OSError as exc:
                log.warning("cgroup.kill failed (%s); signalling each process", exc)
        # Freeze-then-kill is not available here; repeat until nothing is left.
        for _ in range(10):
            pids = self.all_pids()
            if not pids:
                return
            for pid in pids:
                _signal(pid, signal.SIGKILL)

    def freeze(self, frozen: bool) -> None:
        if self.cgroup is not None and (self.cgroup / "cgroup.freeze").exists():
            (self.cgroup / "cgroup.freeze").write_text("1" if frozen else "0")
            return
        sig = signal.SIGSTOP if frozen else signal.SIGCONT
        for pid in self.all_pids():
            _signal(pid, sig)

    def remove(self) -> None:
        if self.cgroup is not None:
            remove_cgroup_tree(self.cgroup)


def remove_session_cgroup(path: pathlib.Path | None) -> None:
    if path is not None:
        _rmdir(path)


def cgroup_pids(path: pathlib.Path) -> set[int]:
    """Every process in the cgroup ``path`` and its descendants."""
    out: set[int] = set()
    for procs in path.rglob("cgroup.procs"):
        out.update(_read_pids(procs))
    return out


def kill_cgroup(path: pathlib.Path) -> None:
    """SIGKILL every process in the cgroup ``path`` (and below), however they forked."""
    try:
        (path / "cgroup.kill").write_text("1")
        return
    except FileNotFoundError:
        if not path.exists():
            return
    except OSError as exc:
        log.warning("cgroup.kill in %s failed (%s); signalling each process", path, exc)
    for _ in range(10):
        pids = cgroup_pids(path)
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGKILL)


def remove_cgroup_tree(path: pathlib.Path) -> None:
    """Remove the (empty) cgroup ``path`` and its child cgroups, deepest first."""
    subs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
    for sub in reversed(subs):
        _rmdir(sub)
    _rmdir(path)


def _rmdir(path: pathlib.Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        log.debug("cgroup %s still busy", path)


def _read_pids(path: pathlib.Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _scan() -> list[tuple[int, int, int, bytes]]:
    """(pid, parent pid, session id, state) of every process, from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The comm field may contain spaces and parentheses: parse after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        out.append((int(entry.name), int(fields[1]), int(fields[3]), fields[0]))
    return out


def _in_session(session: int, uid: int) -> set[int]:
    """Live processes of ``uid`` whose session id is ``session`` (none for 0)."""
    if not session:
        return set()
    out = set()
    for pid, _ppid, sid, state in _scan():
        if sid != session or state in (b"Z", b"X"):
            continue
        try:
            if uid < 0 or os.stat(f"/proc/{pid}").st_uid == uid:
                out.add(pid)
        except OSError:
            continue
    return out


def _descendants(roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _sid, _state in _scan():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def make_preexec(
    uid: int, gid: int, groups: list[int], cgroup: pathlib.Path | None, setsid: bool = True
) -> Callable[[], None]:
    """The child's last steps as root: join the cgroup, new session, then drop privileges.

    Runs between fork and exec (subprocess's preexec_fn), so it only makes system calls.
    """
    procs = str(cgroup / "cgroup.procs") if cgroup is not None else None

    def preexec() -> None:
        if procs is not None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if setsid:
            os.setsid()
        if os.getuid() == 0:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        elif os.getuid() != uid:
            raise PermissionError("a non-root starter can only run jobs as its own uid")
        # Belt and braces: the switch must have stuck.
        if os.getuid() != uid or os.geteuid() != uid:
            os._exit(126)

    return preexec
