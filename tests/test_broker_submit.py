"""Submits the broker refuses (in-process, real unix socket): jobs that can never start, and a
request over the frame limit, each with a clear error; and the queue's v1 -> v2 migration."""

from __future__ import annotations

import json
import pathlib
import sqlite3
import time

import pytest
import trio
from test_broker_inprocess import broker, request, state_dir  # noqa: F401 - fixtures

from ssh_to_job import wire
from ssh_to_job.broker import Broker, JobQueue
from ssh_to_job.broker._queue import QueueVersionError


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (wire.JobSpec("/bin/e\0cho"), "the executable contains a NUL byte"),
        (wire.JobSpec("/bin/echo", args=("ok", "b\0d")), "argument 2 contains a NUL byte"),
        (wire.JobSpec("/bin/echo", initialdir="/tmp\0x"), "initial directory contains a NUL"),
        (wire.JobSpec("/bin/echo", env={"A=B": "1"}), "name 'A=B' is empty or contains '='"),
        (wire.JobSpec("/bin/echo", env={"": "1"}), "name '' is empty"),
        (wire.JobSpec("/bin/echo", env={"A\0": "1"}), "contains '=' or a NUL byte"),
        (wire.JobSpec("/bin/echo", env={"A": "x\0y"}), "variable A contains a NUL byte"),
        (wire.JobSpec("echo"), "must be an absolute path"),
    ],
)
async def test_jobs_that_can_never_start_are_refused_at_submit(
    broker: Broker,  # noqa: F811
    spec: wire.JobSpec,
    says: str,
) -> None:
    """NUL bytes in executable, args, initialdir or environment, and '=' / NUL / empty in an
    environment name, are refused at submit with a clear error; nothing is queued."""
    reply, _ = await request(broker, wire.Submit(spec=spec))
    assert isinstance(reply, wire.Error)
    assert reply.code == "bad_request"
    assert says in reply.message
    assert broker.queue.counts() == {}


async def test_a_request_over_the_frame_limit_gets_a_clear_error(broker: Broker) -> None:  # noqa: F811
    """A 2 MiB submit (the limit is 1 MiB) is read off and answered with a too_big error naming
    the limit and the setting, not a cut connection."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    with sock:
        await sock.connect(str(broker.socket_path))
        big = wire.Submit(spec=wire.JobSpec("/bin/echo", args=("x" * (2 << 20),)))
        conn = wire.Connection(
            wire.Channel.CONTROL, wire.Role.CLIENT, wire.Role.BROKER, max_frame=4 << 20
        )
        with trio.fail_after(20):
            view = memoryview(conn.send(big))
            while view:
                sent = await sock.send(view[: 1 << 16])
                view = view[sent:]
            reply = b""
            while chunk := await sock.recv(65536):
                reply += chunk
    err = wire.decode_message(reply[wire.FRAME_HEADER.size :])
    assert isinstance(err, wire.Error)
    assert err.code == "too_big"
    assert "broker.max_frame" in err.message
    assert str(1 << 20) in err.message


def _v1_queue(path: pathlib.Path) -> None:
    spec = json.dumps({"executable": "/bin/sleep", "args": ["1"], "env": {}, "initialdir": "/"})
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE jobs (
            cluster INTEGER NOT NULL, proc INTEGER NOT NULL, owner TEXT NOT NULL,
            owner_uid INTEGER NOT NULL, owner_gid INTEGER NOT NULL, spec TEXT NOT NULL,
            state TEXT NOT NULL, hold_reason TEXT NOT NULL DEFAULT '', submitted REAL NOT NULL,
            started REAL, finished REAL, exit_code INTEGER, exit_signal INTEGER,
            starter TEXT NOT NULL DEFAULT '', pid INTEGER NOT NULL DEFAULT 0,
            scratch TEXT NOT NULL DEFAULT '', sessions INTEGER NOT NULL DEFAULT 0,
            debug_hold INTEGER NOT NULL DEFAULT 0, stdout_tail BLOB, stderr_tail BLOB,
            PRIMARY KEY (cluster, proc));
        CREATE INDEX jobs_by_state ON jobs (state, cluster, proc);
        CREATE TABLE audit (ts REAL NOT NULL, uid INTEGER NOT NULL, action TEXT NOT NULL,
            job TEXT NOT NULL, outcome TEXT NOT NULL);
        INSERT INTO meta VALUES ('next_cluster', '3');
        """
    )
    rows = [
        (1, 0, "idle", "", "", 0, 0),
        (1, 1, "running", "", "st1", 42, 0),
        (2, 0, "held", "released; ending its debug hold", "st1", 43, 1),
        (2, 1, "completed", "", "st1", 0, 0),
    ]
    for cluster, proc, state, reason, starter, pid, debug in rows:
        db.execute(
            "INSERT INTO jobs (cluster, proc, owner, owner_uid, owner_gid, spec, state,"
            " hold_reason, submitted, starter, pid, debug_hold) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (cluster, proc, "ann", 1000, 1000, spec, state, reason, 1.0, starter, pid, debug),
        )
    db.commit()
    db.close()


def test_a_version_1_queue_is_migrated(tmp_path: pathlib.Path) -> None:
    """A v1 queue.db (spec per row, "releasing" as a hold-reason string) opens as v2: specs
    shared, releasing a state, running and debug-held jobs placed, ids and data kept."""
    path = tmp_path / "queue.db"
    _v1_queue(path)
    q = JobQueue(path)
    try:
        states = {r.id: (r.state, r.placed) for r in q.select(states=("idle", "running",
                  "held", "releasing", "completed"))}  # fmt: skip
        assert states == {
            "1.0": ("idle", 0),
            "1.1": ("running", 1),
            "2.0": ("releasing", 1),
            "2.1": ("completed", 0),
        }
        assert q.get("1.1").job_spec().args == ("1",)
        (n,) = q.db.execute("SELECT COUNT(*) FROM specs").fetchone()
        assert n == 1
        assert q.submit(wire.JobSpec("/bin/true"), 1, "ann", 1000, 1000) == 3
    finally:
        q.close()
    JobQueue(path).close()  # a second open is a no-op


def test_a_version_2_queue_is_migrated(tmp_path: pathlib.Path) -> None:
    """A v2 queue.db (no debug_until, no collaborators or session records) opens as the
    current version with its jobs, and the new tables and column work."""
    path = tmp_path / "queue.db"
    q = JobQueue(path)
    q.submit(wire.JobSpec("/bin/sleep", ("9",)), 2, "ann", 1000, 1000)
    q.close()
    with sqlite3.connect(path) as db:  # back to the version 2 shape
        db.executescript(
            "DROP TABLE ssh_allow; DROP TABLE sessions; DROP TABLE client_keys;"
            "ALTER TABLE jobs DROP COLUMN debug_until;"
            "UPDATE meta SET value = '2' WHERE key = 'schema_version';"
        )
    q = JobQueue(path)
    try:
        assert [r.id for r in q.select(states=("idle",))] == ["1.0", "1.1"]
        assert q.get("1.1").debug_until == 0
        q.allow_ssh("1.1", [1001])
        assert q.ssh_allowed("1.1") == {1001}
        q.record_session("s1", "1.1", 1001, "bob", 1000, "refused", "no")
        assert [x.outcome for x in q.sessions(1000)] == ["refused"]
        (version,) = q.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == "4"
    finally:
        q.close()


def test_a_version_3_queue_is_migrated(tmp_path: pathlib.Path) -> None:
    """A v3 queue.db (session records without forwards, exit status or remote client, no
    client keys) opens as v4 and keeps its records; the new columns are written and read."""
    path = tmp_path / "queue.db"
    q = JobQueue(path)
    q.submit(wire.JobSpec("/bin/sleep", ("9",)), 1, "ann", 1000, 1000)
    q.record_session("s0", "1.0", 1000, "ann", 1000, "granted", starter="n1")
    q.close()
    with sqlite3.connect(path) as db:  # back to the version 3 shape
        db.executescript(
            "DROP TABLE client_keys; ALTER TABLE sessions DROP COLUMN forwards;"
            "ALTER TABLE sessions DROP COLUMN exit_status;"
            "ALTER TABLE sessions DROP COLUMN client_key;"
            "ALTER TABLE sessions DROP COLUMN client_addr;"
            "UPDATE meta SET value = '3' WHERE key = 'schema_version';"
        )
    q = JobQueue(path)
    try:
        (old,) = q.sessions(None)
        assert (old.session_id, old.forwards, old.exit_status) == ("s0", "", -1)
        q.record_session(
            "s1", "1.0", 1000, "ann", 1000, "granted", starter="n1", client_key="SHA256:k",
            client_addr="198.18.0.9",
        )  # fmt: skip
        assert q.session_ended("s1", "n1", 1.0, 2.0, 3, 4, "L:localhost:80", 7)
        new = q.sessions(1000, "1.0")[-1]
        assert (new.forwards, new.exit_status, new.client_key, new.client_addr) == (
            "L:localhost:80", 7, "SHA256:k", "198.18.0.9",
        )  # fmt: skip
        (version,) = q.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == "4"
    finally:
        q.close()
    JobQueue(path).close()  # a second open is a no-op


def test_a_newer_queue_is_refused(tmp_path: pathlib.Path) -> None:
    """A queue.db from a newer broker is refused with a message, not misread."""
    path = tmp_path / "queue.db"
    JobQueue(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueVersionError, match="schema version 99"):
        JobQueue(path)


async def test_bulk_actions_on_a_big_cluster_are_chunked_and_summarised(
    broker: Broker,  # noqa: F811
) -> None:
    """hold, release and rm of a 20,000-job cluster each answer with one summary line and the
    right count, and let other tasks run throughout (no stretch without a checkpoint longer
    than a fraction of a second, where one transaction for all would take several)."""
    cluster = broker.queue.submit(wire.JobSpec("/bin/true"), 20000, "ann", 1000, 1000)
    gaps: list[float] = []
    running = True

    async def other_user() -> None:
        last = time.perf_counter()
        while running:
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_user)
        replies = {}
        for action in ("hold", "release", "rm"):
            reply, _ = await request(broker, wire.Act(action=action, ids=(str(cluster),)))
            assert isinstance(reply, wire.ActReply)
            replies[action] = reply.results
        running = False
    before = {"hold": "idle", "release": "held", "rm": "idle"}
    for action, results in replies.items():
        assert [r.message for r in results] == [
            f"cluster {cluster}: {action} done for 20000 {before[action]} jobs"
        ]
    assert broker.queue.counts() == {"removed": 20000}
    assert max(gaps) < 0.5, max(gaps)
    # Removed jobs are no longer in the queue: acting on one is refused.
    reply, _ = await request(broker, wire.Act(action="hold", ids=(f"{cluster}.5",)))
    assert isinstance(reply, wire.ActReply)
    assert reply.results == (
        wire.ActResult(f"{cluster}.5", False, f"job {cluster}.5 is not in the queue"),
    )


async def test_refusals_of_a_big_cluster_are_listed_up_to_a_bound(
    broker: Broker,  # noqa: F811
) -> None:
    """release of 20,000 idle jobs: 100 refusals listed, the other 19,900 counted in one line."""
    cluster = broker.queue.submit(wire.JobSpec("/bin/true"), 20000, "ann", 1000, 1000)
    reply, _ = await request(broker, wire.Act(action="release", ids=(str(cluster),)))
    assert isinstance(reply, wire.ActReply)
    listed = [r for r in reply.results if r.id.startswith(f"{cluster}.")]
    assert len(listed) == 100
    assert all(not r.ok and "is not held (it is idle)" in r.message for r in listed)
    assert reply.results[-1].message == "and 19900 more jobs refused (not listed)"
    assert len(wire.encode_message(reply)) < 64 << 10
