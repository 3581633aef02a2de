"""The job queue, in SQLite (WAL): the one place the pool's state survives restarts.

Every state change is one transaction, committed before the broker tells anyone about it, so a
broker killed at any instant restarts with a queue that is a prefix of what it promised. This
module does no networking and knows nothing of starters beyond their names.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from ssh_to_job import wire

IDLE, RUNNING, SUSPENDED, HELD, COMPLETED, REMOVED = (
    "idle",
    "running",
    "suspended",
    "held",
    "completed",
    "removed",
)
LIVE_STATES = (IDLE, RUNNING, SUSPENDED, HELD)
FINISHED_STATES = (COMPLETED, REMOVED)
TAIL = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    cluster INTEGER NOT NULL,
    proc INTEGER NOT NULL,
    owner TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    hold_reason TEXT NOT NULL DEFAULT '',
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    exit_code INTEGER,
    exit_signal INTEGER,
    starter TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,
    scratch TEXT NOT NULL DEFAULT '',
    sessions INTEGER NOT NULL DEFAULT 0,
    debug_hold INTEGER NOT NULL DEFAULT 0,
    stdout_tail BLOB,
    stderr_tail BLOB,
    PRIMARY KEY (cluster, proc)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, cluster, proc);
CREATE TABLE IF NOT EXISTS audit (
    ts REAL NOT NULL, uid INTEGER NOT NULL, action TEXT NOT NULL,
    job TEXT NOT NULL, outcome TEXT NOT NULL
);
"""


class UnknownJob(KeyError):
    pass


def split_id(job_id: str) -> tuple[int, int]:
    cluster, _, proc = job_id.partition(".")
    return int(cluster), int(proc or 0)


@functools.lru_cache(maxsize=256)
def _spec_dict(spec: str) -> dict[str, Any]:
    """A stored spec, parsed: every proc of a cluster shares one, so listings parse it once.
    (Callers only read the result.)"""
    d: dict[str, Any] = json.loads(spec)
    d["args_t"] = tuple(d["args"])
    return d


class Row:
    """One job as stored."""

    __slots__ = (
        "cluster",
        "debug_hold",
        "exit_code",
        "exit_signal",
        "finished",
        "hold_reason",
        "owner",
        "owner_gid",
        "owner_uid",
        "pid",
        "proc",
        "scratch",
        "sessions",
        "spec",
        "started",
        "starter",
        "state",
        "submitted",
    )

    cluster: int
    proc: int
    owner: str
    owner_uid: int
    owner_gid: int
    spec: str
    state: str
    hold_reason: str
    submitted: float
    started: float | None
    finished: float | None
    exit_code: int | None
    exit_signal: int | None
    starter: str
    pid: int
    scratch: str
    sessions: int
    debug_hold: int

    @property
    def id(self) -> str:
        return f"{self.cluster}.{self.proc}"

    def job_spec(self) -> wire.JobSpec:
        d = _spec_dict(self.spec)
        return wire.JobSpec(
            executable=d["executable"],
            args=tuple(d["args"]),
            env=d["env"],
            initialdir=d["initialdir"],
            hold_on_failure=d.get("hold_on_failure", False),
        )


_COLUMNS = ", ".join(Row.__slots__)


def _row(values: tuple[object, ...]) -> Row:
    r = Row.__new__(Row)
    for name, v in zip(Row.__slots__, values, strict=True):
        setattr(r, name, v)
    return r


class JobQueue:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files (which hold
        # the same job data) the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if p.exists():
                p.chmod(0o600)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writes: one transaction each

    def submit(self, spec: wire.JobSpec, count: int, owner: str, uid: int, gid: int) -> int:
        now = time.time()
        blob = json.dumps(
            {
                "executable": spec.executable,
                "args": list(spec.args),
                "env": dict(spec.env),
                "initialdir": spec.initialdir,
                "hold_on_failure": spec.hold_on_failure,
            },
            separators=(",", ":"),
        )
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute("SELECT value FROM meta WHERE key='next_cluster'")
            row = cur.fetchone()
            cluster = int(row[0]) if row else 1
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_cluster', ?)",
                (str(cluster + 1),),
            )
            self.db.executemany(
                "INSERT INTO jobs (cluster, proc, owner, owner_uid, owner_gid, spec, state,"
                " submitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ((cluster, p, owner, uid, gid, blob, IDLE, now) for p in range(count)),
            )
        return cluster

    def set_state(self, job_id: str, state: str, **fields: object) -> None:
        cluster, proc = split_id(job_id)
        allowed = set(Row.__slots__) | {"stdout_tail", "stderr_tail"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown job columns {bad}")
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        with self.db:
            self.db.execute(
                f"UPDATE jobs SET {sets} WHERE cluster = ? AND proc = ?",  # noqa: S608
                (state, *fields.values(), cluster, proc),
            )

    def update(self, job_id: str, **fields: object) -> None:
        row = self.get(job_id)
        self.set_state(job_id, row.state, **fields)

    def audit(self, uid: int, action: str, job: str, outcome: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO audit (ts, uid, action, job, outcome) VALUES (?, ?, ?, ?, ?)",
                (time.time(), uid, action, job, outcome),
            )

    # -- reads

    def get(self, job_id: str) -> Row:
        try:
            cluster, proc = split_id(job_id)
            cur = self.db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE cluster = ? AND proc = ?",  # noqa: S608
                (cluster, proc),
            )
        except (ValueError, OverflowError):  # not a number, or too big for SQLite
            raise UnknownJob(job_id) from None
        r = cur.fetchone()
        if r is None:
            raise UnknownJob(job_id)
        return _row(r)

    def select(
        self,
        ids: wire.JobId | None = None,
        states: tuple[str, ...] = LIVE_STATES,
        owner_uid: int | None = None,
    ) -> Iterator[Row]:
        for r in self._select(_COLUMNS, ids, states, owner_uid):
            yield _row(r)

    def infos(
        self,
        ids: wire.JobId | None = None,
        states: tuple[str, ...] = LIVE_STATES,
        owner_uid: int | None = None,
    ) -> Iterator[wire.JobInfo]:
        """What ``stj q`` shows, straight from the rows (a listing may be 100,000 long)."""
        cols = (
            "cluster, proc, owner, owner_uid, state, spec, submitted, started, finished, "
            "exit_code, exit_signal, hold_reason, starter, pid, scratch, sessions"
        )
        info = wire.JobInfo
        for (
            cluster,
            proc,
            owner,
            owner_uid_,
            state,
            spec,
            submitted,
            started,
            finished,
            exit_code,
            exit_signal,
            hold_reason,
            starter,
            pid,
            scratch,
            sessions,
        ) in self._select(cols, ids, states, owner_uid):
            d = _spec_dict(spec)
            yield info(
                f"{cluster}.{proc}",
                owner,
                owner_uid_,
                state,
                d["executable"],
                d["args_t"],
                submitted,
                started,
                finished,
                exit_code,
                exit_signal,
                hold_reason,
                starter,
                (pid,) if pid else (),
                scratch,
                d["initialdir"],
                sessions,
            )

    def _select(
        self, columns: str, ids: wire.JobId | None, states: tuple[str, ...], owner_uid: int | None
    ) -> sqlite3.Cursor:
        where = [f"state IN ({', '.join('?' * len(states))})"]
        args: list[object] = list(states)
        if ids is not None:
            where.append("cluster = ?")
            args.append(ids.cluster)
            if ids.proc is not None:
                where.append("proc = ?")
                args.append(ids.proc)
        if owner_uid is not None:
            where.append("owner_uid = ?")
            args.append(owner_uid)
        return self.db.execute(
            f"SELECT {columns} FROM jobs WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY cluster, proc",
            args,
        )

    def next_idle(self, limit: int) -> list[Row]:
        cur = self.db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY cluster, proc LIMIT ?",  # noqa: S608
            (IDLE, limit),
        )
        return [_row(r) for r in cur]

    def on_starter(self, starter: str) -> list[Row]:
        cur = self.db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE starter = ?"  # noqa: S608
            " AND (state IN (?, ?) OR debug_hold = 1)",
            (starter, RUNNING, SUSPENDED),
        )
        return [_row(r) for r in cur]

    def tail(self, job_id: str, stream: str) -> bytes:
        cluster, proc = split_id(job_id)
        col = "stdout_tail" if stream == "stdout" else "stderr_tail"
        cur = self.db.execute(
            f"SELECT {col} FROM jobs WHERE cluster = ? AND proc = ?",  # noqa: S608
            (cluster, proc),
        )
        r = cur.fetchone()
        return bytes(r[0]) if r and r[0] is not None else b""

    def counts(self) -> dict[str, int]:
        cur = self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {state: n for state, n in cur}
