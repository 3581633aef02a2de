"""The job queue, in SQLite (WAL): the one place the pool's state survives restarts.

Every state change is one transaction, committed before the broker tells anyone about it, so a
broker killed at any instant restarts with a queue that is a prefix of what it promised. This
module does no networking and knows nothing of starters beyond their names; which state change
is allowed is decided in ``_lifecycle`` and applied in ``_jobs``.

Schema version 2 stores a cluster's spec once (``specs``), however many procs it has, and marks
jobs whose processes are on a starter (``placed``). A version-1 ``queue.db`` is migrated in one
transaction when the broker opens it; a newer version than this code knows is refused.
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

IDLE, RUNNING, SUSPENDED, HELD, RELEASING, COMPLETED, REMOVED = (
    "idle",
    "running",
    "suspended",
    "held",
    "releasing",
    "completed",
    "removed",
)
LIVE_STATES = (IDLE, RUNNING, SUSPENDED, HELD, RELEASING)
FINISHED_STATES = (COMPLETED, REMOVED)
TAIL = 65536
SCHEMA_VERSION = 4
#: The hold reason that marked "releasing" in schema version 1 (migrated to the state).
_V1_RELEASING = "released; ending its debug hold"

#: Tables added in schema version 3 (collaborators, session records): in a new queue and in
#: the version 2 to 3 migration alike.
_V3_TABLES = """
CREATE TABLE IF NOT EXISTS ssh_allow (
    cluster INTEGER NOT NULL, proc INTEGER NOT NULL, uid INTEGER NOT NULL,
    PRIMARY KEY (cluster, proc, uid)
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, job TEXT NOT NULL, uid INTEGER NOT NULL, user TEXT NOT NULL,
    owner_uid INTEGER NOT NULL, outcome TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    starter TEXT NOT NULL DEFAULT '', requested REAL NOT NULL, started REAL NOT NULL DEFAULT 0,
    ended REAL NOT NULL DEFAULT 0, bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (requested);
"""

#: Schema version 4, applied to every older queue and to a new one alike: what a session
#: asked to forward and how it exited, the remote client's key and address, and the client
#: keys users registered for remote use (``stj keys``).
_V4_CHANGES = """
ALTER TABLE sessions ADD COLUMN forwards TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN exit_status INTEGER NOT NULL DEFAULT -1;
ALTER TABLE sessions ADD COLUMN client_key TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN client_addr TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS client_keys (
    fingerprint TEXT PRIMARY KEY, uid INTEGER NOT NULL, key TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '', added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS client_keys_by_uid ON client_keys (uid);
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS specs (id INTEGER PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    cluster INTEGER NOT NULL,
    proc INTEGER NOT NULL,
    owner TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    spec_id INTEGER NOT NULL REFERENCES specs (id),
    state TEXT NOT NULL,
    placed INTEGER NOT NULL DEFAULT 0,
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
    debug_until REAL NOT NULL DEFAULT 0,
    stdout_tail BLOB,
    stderr_tail BLOB,
    PRIMARY KEY (cluster, proc)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, cluster, proc);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner_uid, state);
CREATE INDEX IF NOT EXISTS jobs_by_starter ON jobs (starter) WHERE placed = 1;
{_V3_TABLES}CREATE TABLE IF NOT EXISTS audit (
    ts REAL NOT NULL, uid INTEGER NOT NULL, action TEXT NOT NULL,
    job TEXT NOT NULL, outcome TEXT NOT NULL
);
"""


class UnknownJob(KeyError):
    pass


class QueueVersionError(RuntimeError):
    """queue.db was written by a newer broker than this one."""


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
        "debug_until",
        "exit_code",
        "exit_signal",
        "finished",
        "hold_reason",
        "owner",
        "owner_gid",
        "owner_uid",
        "pid",
        "placed",
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
    debug_until: float
    placed: int

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
            debug_on=tuple(d.get("debug_on", ())),
            debug_hold_ttl=float(d.get("debug_hold_ttl", 0.0)),
            time_limit=float(d.get("time_limit", 0.0)),
            ssh=bool(d.get("ssh", True)),
            ssh_users=tuple(d.get("ssh_users", ())),
            ssh_from=tuple(d.get("ssh_from", ())),
        )


# Every column from jobs (j) but the spec's text, which comes from specs (s).
_COLUMNS = ", ".join("s.spec" if c == "spec" else f"j.{c}" for c in Row.__slots__)
_FROM = "jobs j JOIN specs s ON s.id = j.spec_id"


def _row(values: tuple[object, ...]) -> Row:
    r = Row.__new__(Row)
    for name, v in zip(Row.__slots__, values, strict=True):
        setattr(r, name, v)
    return r


_V1_MIGRATION = f"""
DROP INDEX IF EXISTS jobs_by_state;
ALTER TABLE jobs RENAME TO jobs_v1;
{_SCHEMA}
INSERT INTO specs (spec) SELECT DISTINCT spec FROM jobs_v1;
INSERT INTO jobs (cluster, proc, owner, owner_uid, owner_gid, spec_id, state, placed,
    hold_reason, submitted, started, finished, exit_code, exit_signal, starter, pid, scratch,
    sessions, debug_hold, stdout_tail, stderr_tail)
SELECT cluster, proc, owner, owner_uid, owner_gid,
    (SELECT id FROM specs WHERE specs.spec = v.spec),
    CASE WHEN state = 'held' AND hold_reason = '{_V1_RELEASING}' THEN 'releasing' ELSE state END,
    CASE WHEN state IN ('running', 'suspended') OR debug_hold = 1
        OR (state IN ('held', 'removed') AND starter != '' AND pid != 0) THEN 1 ELSE 0 END,
    hold_reason, submitted, started, finished, exit_code, exit_signal, starter, pid, scratch,
    sessions, debug_hold, stdout_tail, stderr_tail
FROM jobs_v1 v;
DROP TABLE jobs_v1;
"""  # noqa: S608 - constants only


#: Version 2 to 3: when a debug hold ends, shown by stj q.
_V2_MIGRATION = "ALTER TABLE jobs ADD COLUMN debug_until REAL NOT NULL DEFAULT 0;\n" + _V3_TABLES


def _spec_blob(spec: wire.JobSpec) -> str:
    d: dict[str, object] = {
        "executable": spec.executable,
        "args": list(spec.args),
        "env": dict(spec.env),
        "initialdir": spec.initialdir,
        "hold_on_failure": spec.hold_on_failure,
    }
    # Only when set, so that specs stored before these fields existed read back the same.
    if spec.debug_on:
        d["debug_on"] = list(spec.debug_on)
    if spec.debug_hold_ttl:
        d["debug_hold_ttl"] = spec.debug_hold_ttl
    if spec.time_limit:
        d["time_limit"] = spec.time_limit
    if not spec.ssh:
        d["ssh"] = False
    if spec.ssh_users:
        d["ssh_users"] = list(spec.ssh_users)
    if spec.ssh_from:
        d["ssh_from"] = list(spec.ssh_from)
    return json.dumps(d, separators=(",", ":"))


_SESSION_COLUMNS = (
    "id, job, uid, user, outcome, requested, reason, starter, started, ended, bytes_in, bytes_out,"
    " forwards, exit_status, client_key, client_addr"
)


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
        try:
            self._open_schema()
        except BaseException:
            self.db.close()
            raise

    def _open_schema(self) -> None:
        tables = {
            r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        version = 0
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 1
        if version > SCHEMA_VERSION:
            raise QueueVersionError(
                f"{self.path} has queue schema version {version}; this broker knows only up "
                f"to {SCHEMA_VERSION} (it was written by a newer ssh-to-job)"
            )
        if "jobs" not in tables:
            script = _SCHEMA + _V4_CHANGES
        elif version < 2:
            script = _V1_MIGRATION + _V4_CHANGES
        elif version < 3:
            script = _V2_MIGRATION + _V4_CHANGES
        elif version < 4:
            script = _V4_CHANGES
        else:
            script = ""
        try:
            # One transaction: a migration that fails half-way leaves the version-1 queue.
            self.db.executescript(
                f"BEGIN IMMEDIATE;{script}INSERT OR REPLACE INTO meta (key, value)"  # noqa: S608
                f" VALUES ('schema_version', '{SCHEMA_VERSION}');COMMIT;"
            )
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    # -- session records (audit): one row per attempt, granted, refused or failed

    def record_session(
        self,
        session_id: str,
        job: str,
        uid: int,
        user: str,
        owner_uid: int,
        outcome: str,
        reason: str = "",
        starter: str = "",
        keep_days: float = 90.0,
        client_key: str = "",
        client_addr: str = "",
    ) -> None:
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO sessions (id, job, uid, user, owner_uid, outcome, reason,"
                " starter, requested, client_key, client_addr)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    job,
                    uid,
                    user,
                    owner_uid,
                    outcome,
                    reason,
                    starter,
                    now,
                    client_key,
                    client_addr,
                ),
            )
            self.db.execute("DELETE FROM sessions WHERE requested < ?", (now - keep_days * 86400,))

    def session_ended(
        self,
        session_id: str,
        starter: str,
        started: float,
        ended: float,
        bytes_in: int,
        bytes_out: int,
        forwards: str = "",
        exit_status: int = -1,
    ) -> bool:
        """Record how a granted session went; only its own starter may (False otherwise)."""
        with self.db:
            cur = self.db.execute(
                "UPDATE sessions SET started = ?, ended = ?, bytes_in = ?, bytes_out = ?,"
                " forwards = ?, exit_status = ?"
                " WHERE id = ? AND starter = ? AND outcome = 'granted' AND ended = 0",
                (started, ended, bytes_in, bytes_out, forwards, exit_status, session_id, starter),
            )
        return cur.rowcount == 1

    def sessions(self, uid: int | None, job: str = "") -> list[wire.SessionInfo]:
        """Session records, newest last: those of jobs ``uid`` owns or that ``uid`` asked for
        (every record for None, a superuser)."""
        where: list[str] = []
        args: list[object] = []
        if uid is not None:
            where.append("(owner_uid = ? OR uid = ?)")
            args += [uid, uid]
        if job:
            where.append("job = ?")
            args.append(job)
        cond = " WHERE " + " AND ".join(where) if where else ""
        # Only our constant fragments are joined; every value is a parameter.
        sql = f"SELECT {_SESSION_COLUMNS} FROM sessions{cond} ORDER BY requested LIMIT 100000"  # noqa: S608
        return [wire.SessionInfo(*r) for r in self.db.execute(sql, args)]

    def allow_ssh(self, job_id: str, uids: list[int]) -> None:
        """Let ``uids`` into the sessions of job ``job_id`` too."""
        cluster, _, proc = job_id.partition(".")
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO ssh_allow (cluster, proc, uid) VALUES (?, ?, ?)",
                [(int(cluster), int(proc), u) for u in uids],
            )

    def ssh_allowed(self, job_id: str) -> set[int]:
        cluster, _, proc = job_id.partition(".")
        cur = self.db.execute(
            "SELECT uid FROM ssh_allow WHERE cluster = ? AND proc = ?", (int(cluster), int(proc))
        )
        return {r[0] for r in cur}

    # -- writes: one transaction each

    def submit(self, spec: wire.JobSpec, count: int, owner: str, uid: int, gid: int) -> int:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute("SELECT value FROM meta WHERE key='next_cluster'")
            row = cur.fetchone()
            cluster = int(row[0]) if row else 1
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_cluster', ?)",
                (str(cluster + 1),),
            )
            spec_id = self.db.execute(
                "INSERT INTO specs (spec) VALUES (?)", (_spec_blob(spec),)
            ).lastrowid
            # One statement for every proc: the spec is stored once, the rows are small.
            self.db.execute(
                "WITH RECURSIVE p(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n + 1 < ?)"
                " INSERT INTO jobs (cluster, proc, owner, owner_uid, owner_gid, spec_id, state,"
                " submitted) SELECT ?, n, ?, ?, ?, ?, ?, ? FROM p",
                (count, cluster, owner, uid, gid, spec_id, IDLE, now),
            )
        return cluster

    def set_state(self, job_id: str, state: str, **fields: object) -> None:
        cluster, proc = split_id(job_id)
        allowed = (set(Row.__slots__) - {"spec", "cluster", "proc"}) | {
            "stdout_tail",
            "stderr_tail",
        }
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

    def update_group(
        self,
        cluster: int,
        procs: tuple[int, int],
        match: tuple[str, int, int],
        state: str,
        **fields: object,
    ) -> int:
        """Set ``state`` and ``fields`` on the procs in ``procs`` (inclusive) of ``cluster`` that
        are in ``match`` = (state, placed, debug_hold); how many rows changed."""
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        with self.db:
            cur = self.db.execute(
                f"UPDATE jobs SET {sets} WHERE cluster = ? AND proc BETWEEN ? AND ?"  # noqa: S608
                " AND state = ? AND placed = ? AND debug_hold = ?",
                (state, *fields.values(), cluster, *procs, *match),
            )
        return cur.rowcount

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
                f"SELECT {_COLUMNS} FROM {_FROM} WHERE j.cluster = ? AND j.proc = ?",  # noqa: S608
                (cluster, proc),
            )
        except (ValueError, OverflowError):  # not a number, or too big for SQLite
            raise UnknownJob(job_id) from None
        r = cur.fetchone()
        if r is None:
            raise UnknownJob(job_id)
        return _row(r)

    def live_range(self, cluster: int, procs: tuple[int, int]) -> tuple[int, int, int]:
        """(how many, lowest proc, highest proc) of the live jobs of ``cluster`` in ``procs``."""
        try:
            cur = self.db.execute(
                "SELECT COUNT(*), MIN(proc), MAX(proc) FROM jobs WHERE cluster = ?"  # noqa: S608
                f" AND proc BETWEEN ? AND ? AND state IN ({', '.join('?' * len(LIVE_STATES))})",
                (cluster, *procs, *LIVE_STATES),
            )
        except OverflowError:
            return 0, 0, -1
        n, lo, hi = cur.fetchone()
        return (n, lo, hi) if n else (0, 0, -1)

    def placed_starters(self, cluster: int, procs: tuple[int, int]) -> set[str]:
        """The starters that jobs of ``cluster`` in ``procs`` are on."""
        try:
            cur = self.db.execute(
                "SELECT DISTINCT starter FROM jobs WHERE cluster = ? AND proc BETWEEN ? AND ?"
                " AND placed = 1",
                (cluster, *procs),
            )
        except OverflowError:
            return set()
        return {name for (name,) in cur}

    def groups(
        self, cluster: int, procs: tuple[int, int]
    ) -> list[tuple[str, int, int, int, int, int, str, int]]:
        """The live jobs of ``cluster`` in ``procs``, grouped by (state, placed, debug_hold):
        (state, placed, debug_hold, count, min proc, max proc, owner, owner_uid) each (a
        cluster has one owner)."""
        try:
            cur = self.db.execute(
                "SELECT state, placed, debug_hold, COUNT(*), MIN(proc), MAX(proc), MIN(owner),"  # noqa: S608
                " MIN(owner_uid) FROM jobs WHERE cluster = ? AND proc BETWEEN ? AND ?"
                f" AND state IN ({', '.join('?' * len(LIVE_STATES))})"
                " GROUP BY state, placed, debug_hold",
                (cluster, *procs, *LIVE_STATES),
            )
        except OverflowError:
            return []
        return list(cur)

    def procs_in(
        self, cluster: int, procs: tuple[int, int], match: tuple[str, int, int], limit: int
    ) -> list[Row]:
        cur = self.db.execute(
            f"SELECT {_COLUMNS} FROM {_FROM} WHERE j.cluster = ? AND j.proc BETWEEN ? AND ?"  # noqa: S608
            " AND j.state = ? AND j.placed = ? AND j.debug_hold = ? ORDER BY j.proc LIMIT ?",
            (cluster, *procs, *match, limit),
        )
        return [_row(r) for r in cur]

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
            "j.cluster, j.proc, j.owner, j.owner_uid, j.state, s.spec, j.submitted, j.started,"
            " j.finished, j.exit_code, j.exit_signal, j.hold_reason, j.starter, j.pid,"
            " j.scratch, j.sessions, j.debug_until"
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
            debug_until,
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
                debug_until,
            )

    def table_pages(
        self,
        ids: wire.JobId | None = None,
        states: tuple[str, ...] = LIVE_STATES,
        owner_uid: int | None = None,
        page: int = 2000,
        objects: bool = False,
    ) -> Iterator[str]:
        """What ``infos`` gives, as ``job_table`` pages: the JSON text of a list of rows of
        ``wire.JOB_COLUMNS`` values, up to ``page`` rows each (always at least one page);
        with ``objects``, each row an object keyed by the columns, one per line.

        SQLite writes each row's JSON but for the spec's parts, which Python splices in from
        one parsed copy per cluster: half the time of building lists for ``json.dumps``.
        Times are printed with 17 significant digits (``%!.17g``), so that they read back as
        exactly the stored floats (SQLite's own JSON numbers keep 15).

        Most of a big queue is idle jobs whose columns after ``submitted`` all hold their
        defaults, and whose ``submitted`` is their cluster's: SQLite only tests for that
        (``rest`` is NULL), and Python splices in the text that SQLite wrote once for those
        defaults and once per distinct time. Writing every row's JSON and printing its times
        took SQLite 0.4 s of a listing of 100,000 idle jobs; the output is the same bytes.
        """

        def num(col: str) -> str:
            # printf of a double is SQLite's dearest step; 0 is common (debug_until).
            return (
                f"CASE WHEN {col} IS NULL THEN 'null' WHEN {col} = 0 THEN '0.0'"
                f" ELSE printf('%!.17g', {col}) END"
            )

        def key(name: str) -> str:
            return f"'\"{name}\":' || " if objects else ""

        open_, pack = ("'{'", "json_object") if objects else ("'['", "json_array")

        def pairs(*cols: tuple[str, str]) -> str:
            return ", ".join(f"'{k}', {v}" if objects else v for k, v in cols)

        head = (
            pack
            + "("
            + pairs(
                ("id", "j.cluster || '.' || j.proc"),
                ("owner", "j.owner"),
                ("owner_uid", "j.owner_uid"),
                ("state", "j.state"),
            )
            + ")"
        )
        pids = "CASE WHEN j.pid THEN json_array(j.pid) ELSE json_array() END"
        mid = (
            f"{open_} || {key('started')}{num('j.started')} || ',' || "
            f"{key('finished')}{num('j.finished')} || ',' || substr({pack}("
            + pairs(
                ("exit_code", "j.exit_code"),
                ("exit_signal", "j.exit_signal"),
                ("hold_reason", "j.hold_reason"),
                ("starter", "j.starter"),
                ("pids", pids),
                ("scratch", "j.scratch"),
            )
            + "), 2)"
        )
        tail = (
            f"{open_} || {key('sessions')}j.sessions || ',' || "
            f"{key('debug_until')}{num('j.debug_until')} || {'}' if objects else ']'!r}"
        )
        # JSON text never holds a raw NUL (json_quote writes \u0000), so it splits mid | tail.
        rest = f"{mid} || char(0) || {tail}"
        idle = (
            "j.started IS NULL AND j.finished IS NULL AND j.exit_code IS NULL"
            " AND j.exit_signal IS NULL AND j.hold_reason = '' AND j.starter = ''"
            " AND j.pid = 0 AND j.scratch = '' AND j.sessions = 0 AND j.debug_until = 0"
        )
        cols = f"j.spec_id, {head}, j.submitted, CASE WHEN {idle} THEN NULL ELSE {rest} END"
        # The same expressions over the defaults that ``idle`` tests for: the same bytes.
        ((idle_rest,),) = self.db.execute(
            f"SELECT {rest} FROM (SELECT NULL AS started, NULL AS finished,"  # noqa: S608
            " NULL AS exit_code, NULL AS exit_signal, '' AS hold_reason, '' AS starter,"
            " 0 AS pid, '' AS scratch, 0 AS sessions, 0.0 AS debug_until) j"
        )
        idle_mid, idle_tail = idle_rest.split("\0")
        idle_mid, idle_tail = idle_mid[1:-1], idle_tail[1:]
        sep = ",\n" if objects else ","
        sub_key = '"submitted":' if objects else ""
        # A cluster's procs share one spec: its JSON parts are made once per listing.
        frags: dict[int, tuple[str, str]] = {}
        times: dict[float, str] = {}
        rows: list[str] = []
        for got in self._select_by_pages(cols, ids, states, owner_uid, page):
            new = {r[2] for r in got}.difference(times)
            if new:
                # One query per page for the times not printed yet (a cluster's jobs share
                # their submit time), by SQLite as before.
                vals = list(new)
                for at in range(0, len(vals), 500):
                    part = vals[at : at + 500]
                    texts = self.db.execute(
                        "SELECT printf('%!.17g', column1) FROM (VALUES "  # noqa: S608
                        + ", ".join(["(?)"] * len(part))
                        + ")",
                        part,
                    )
                    times.update(zip(part, [sub_key + t for (t,) in texts], strict=True))
            for spec_id, a, sub, more in got:
                f = frags.get(spec_id)
                if f is None:
                    f = frags[spec_id] = self._spec_frags(spec_id, objects)
                # a = [id,owner,uid,state]; mid = [started,finished,exit...,scratch];
                # tail = [sessions,debug_until]: spliced in JobInfo's order with the spec's
                # parts and the submit time (with ``objects``, the same as "key":value pairs
                # in braces).
                if more is None:
                    rows.append(f"{a[:-1]},{f[0]},{times[sub]},{idle_mid},{f[1]},{idle_tail}")
                else:
                    m, t = more.split("\0")
                    rows.append(f"{a[:-1]},{f[0]},{times[sub]},{m[1:-1]},{f[1]},{t[1:]}")
                if len(rows) == page:
                    yield "[" + sep.join(rows) + "]"
                    rows = []
        yield "[" + sep.join(rows) + "]"

    def _spec_frags(self, spec_id: int, objects: bool) -> tuple[str, str]:
        """A spec's parts of a ``job_table`` row: its executable and args, and its
        initialdir (with ``objects``, as "key":value pairs)."""
        ((text,),) = self.db.execute("SELECT spec FROM specs WHERE id = ?", (spec_id,))
        d = _spec_dict(text)
        spec: Any = [d["executable"], d["args"]]
        where: Any = d["initialdir"]
        if objects:
            spec = {"executable": spec[0], "args": spec[1]}
            where = {"initialdir": where}
            return (
                json.dumps(spec, separators=(",", ":"))[1:-1],
                json.dumps(where, separators=(",", ":"))[1:-1],
            )
        return json.dumps(spec, separators=(",", ":"))[1:-1], json.dumps(where)

    def _select_by_pages(
        self,
        columns: str,
        ids: wire.JobId | None,
        states: tuple[str, ...],
        owner_uid: int | None,
        page: int,
    ) -> Iterator[list[tuple[Any, ...]]]:
        """``_select``'s rows (of ``jobs j`` alone), a page (a list) at a time.

        A single ``ORDER BY`` query over the state index sorts every matching row, with all
        its columns computed, before it yields the first (0.6 s for 100,000 jobs): the
        listing's first page waited for its last. Here only the keys are sorted (75 ms), and
        each page's rows are looked up by rowid in that order (job rows are never deleted, so
        a rowid always names the same job); a job that has left ``states`` since the keys
        were read is left out, and one that moved between ``states`` is shown as it is now.
        """
        where, args = self._where(ids, states, owner_uid)
        keys = [
            r[0]
            for r in self.db.execute(
                f"SELECT j.rowid FROM jobs j WHERE {where} ORDER BY j.cluster, j.proc",  # noqa: S608
                args,
            )
        ]
        marks = ", ".join("?" * len(states))
        sql = (
            f"SELECT {columns} FROM json_each(?) k CROSS JOIN jobs j ON j.rowid = k.value"  # noqa: S608
            f" WHERE j.state IN ({marks}) ORDER BY k.id"
        )
        for start in range(0, len(keys), page):
            yield self.db.execute(sql, (json.dumps(keys[start : start + page]), *states)).fetchall()

    def _where(
        self, ids: wire.JobId | None, states: tuple[str, ...], owner_uid: int | None
    ) -> tuple[str, list[object]]:
        where = [f"j.state IN ({', '.join('?' * len(states))})"]
        args: list[object] = list(states)
        if ids is not None:
            where.append("j.cluster = ?")
            args.append(ids.cluster)
            if ids.proc is not None:
                where.append("j.proc = ?")
                args.append(ids.proc)
        if owner_uid is not None:
            where.append("j.owner_uid = ?")
            args.append(owner_uid)
        return " AND ".join(where), args

    def _select(
        self, columns: str, ids: wire.JobId | None, states: tuple[str, ...], owner_uid: int | None
    ) -> sqlite3.Cursor:
        where, args = self._where(ids, states, owner_uid)
        return self.db.execute(
            f"SELECT {columns} FROM {_FROM} WHERE {where} ORDER BY j.cluster, j.proc",  # noqa: S608
            args,
        )

    def next_idle(self, limit: int) -> list[Row]:
        cur = self.db.execute(
            f"SELECT {_COLUMNS} FROM {_FROM} WHERE j.state = ? AND j.placed = 0"  # noqa: S608
            " ORDER BY j.cluster, j.proc LIMIT ?",
            (IDLE, limit),
        )
        return [_row(r) for r in cur]

    def on_starter(self, starter: str) -> list[Row]:
        """Every job whose processes are (as far as the queue knows) on ``starter``."""
        cur = self.db.execute(
            f"SELECT {_COLUMNS} FROM {_FROM} WHERE j.starter = ? AND j.placed = 1",  # noqa: S608
            (starter,),
        )
        return [_row(r) for r in cur]

    def queued(self, uid: int) -> int:
        """How many live jobs ``uid`` has (the per-user quota counts these)."""
        cur = self.db.execute(
            f"SELECT COUNT(*) FROM jobs WHERE owner_uid = ? AND state IN"  # noqa: S608
            f" ({', '.join('?' * len(LIVE_STATES))})",
            (uid, *LIVE_STATES),
        )
        n: int = cur.fetchone()[0]
        return n

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

    def clusters(
        self, ids: wire.JobId | None = None, owner_uid: int | None = None
    ) -> list[wire.ClusterInfo]:
        """What ``stj q`` shows by default: one summary per cluster of live jobs.

        Counted by SQLite from the ``jobs_by_state`` index alone (100,000 idle jobs in about
        10 ms, where one pass over the rows with every column took 150 ms); only the rows that
        have more to say are read: a held job's reason and debug hold, a running job's
        sessions, and one row per cluster for its owner, time and command.
        """
        where: list[str] = []
        args: list[object] = []
        if ids is not None:
            where.append("cluster = ?")
            args.append(ids.cluster)
            if ids.proc is not None:
                where.append("proc = ?")
                args.append(ids.proc)
        if owner_uid is not None:
            where.append("owner_uid = ?")
            args.append(owner_uid)
        cond = "".join(f" AND {w}" for w in where)
        live = ", ".join("?" * len(LIVE_STATES))
        counts: dict[int, dict[str, int]] = {}
        cur = self.db.execute(
            f"SELECT cluster, state, COUNT(*) FROM jobs WHERE state IN ({live}){cond}"  # noqa: S608
            " GROUP BY state, cluster",
            (*LIVE_STATES, *args),
        )
        for cluster, state, n in cur:
            counts.setdefault(cluster, {})[state] = n
        if not counts:
            return []
        # Held jobs: the lowest and highest reason say whether they share one; a debug hold
        # not yet past its end is one to connect to (its lowest proc).
        now = time.time()
        held: dict[int, tuple[str, str, int, int | None, float | None]] = {}
        cur = self.db.execute(
            "SELECT cluster, MIN(hold_reason), MAX(hold_reason), SUM(debug_until > ?),"  # noqa: S608
            " MIN(CASE WHEN debug_until > ? THEN proc END),"
            " MAX(CASE WHEN debug_until > ? THEN debug_until END)"
            f" FROM jobs WHERE state = ?{cond} GROUP BY cluster",
            (now, now, now, HELD, *args),
        )
        for cluster, lo, hi, n_debug, debug_proc, until in cur:
            held[cluster] = (lo, hi, n_debug, debug_proc, until)
        sessions: dict[int, int] = dict(
            self.db.execute(
                f"SELECT cluster, SUM(sessions) FROM jobs WHERE state IN (?, ?, ?){cond}"  # noqa: S608
                " AND sessions > 0 GROUP BY cluster",
                (RUNNING, SUSPENDED, HELD, *args),
            )
        )
        # Every proc of a cluster shares its owner, submit time and spec: read the lowest.
        meta: dict[int, tuple[str, int, float, str]] = {}
        for cluster in counts:
            row = self.db.execute(
                "SELECT j.owner, j.owner_uid, j.submitted, s.spec FROM jobs j"
                " JOIN specs s ON s.id = j.spec_id WHERE j.cluster = ? ORDER BY j.proc LIMIT 1",
                (cluster,),
            ).fetchone()
            meta[cluster] = row
        out: list[wire.ClusterInfo] = []
        for cluster in sorted(counts):
            c = counts[cluster]
            owner, uid, submitted, spec = meta[cluster]
            d = _spec_dict(spec)
            reason_lo, reason_hi, debug_held, debug_proc, debug_until = held.get(
                cluster, ("", "", 0, None, None)
            )
            out.append(
                wire.ClusterInfo(
                    cluster,
                    owner,
                    uid,
                    submitted,
                    d["executable"],
                    d["args_t"],
                    c.get(IDLE, 0),
                    c.get(RUNNING, 0),
                    c.get(SUSPENDED, 0),
                    c.get(HELD, 0),
                    c.get(RELEASING, 0),
                    sessions.get(cluster, 0),
                    reason_lo,
                    reason_lo != reason_hi,
                    debug_held,
                    f"{cluster}.{debug_proc}" if debug_proc is not None else "",
                    debug_until or 0.0,
                )
            )
        return out
