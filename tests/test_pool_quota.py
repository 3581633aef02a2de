"""Issue 9, quotas and bulk actions (real processes): per-user job and submit-size limits, a
cluster's spec stored once, and rm of a 20,000-job cluster that neither stalls other users nor
fails on its reply."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from typing import Any

from conftest import ROOT, Pool, User


def _db(pool: Pool) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{pool.state / 'queue.db'}?mode=ro", uri=True)


def test_per_user_job_quota_and_submit_size(make_pool: Any, users: dict[str, User]) -> None:
    """Past max_jobs_per_user a submit is refused with the numbers and the setting's name, other
    users are not affected; a submit over max_submit_bytes is refused the same way."""
    pool: Pool = make_pool("max_jobs_per_user = 5\nmax_submit_bytes = 2048\n", slots=1)
    a, b = users["a"], users["b"]
    cluster_ids = pool.submit(a, "-n", "2", "/bin/sleep", "300", count=2)
    try:
        pool.submit(a, "-n", "3", "/bin/true", count=3)
        r = pool.stj(a, "submit", "/bin/true", check=False)
        assert r.returncode == 1
        assert "limit of 5" in r.stderr
        assert "max_jobs_per_user" in r.stderr
        pool.submit(b, "/bin/true")
        r = pool.stj(b, "submit", "/bin/echo", "x" * 3000, check=False)
        assert r.returncode == 1
        assert "max_submit_bytes" in r.stderr
    finally:
        pool.stj(ROOT, "rm", cluster_ids[0].split(".")[0], check=False)


def test_a_clusters_spec_is_stored_once(make_pool: Any, users: dict[str, User]) -> None:
    """count=2000 with a 100 KiB argument stores the spec once, not 2000 times."""
    pool: Pool = make_pool("max_jobs_per_user = 100000\n", slots=1)
    a = users["a"]
    big = "y" * (100 << 10)
    r = pool.stj(a, "submit", "-n", "2000", "/bin/echo", big)
    cluster = int(r.stdout.split(":", 1)[1].split()[0].split(".")[0])
    try:
        with _db(pool) as db:
            (n_specs,) = db.execute(
                "SELECT COUNT(DISTINCT spec_id) FROM jobs WHERE cluster = ?", (cluster,)
            ).fetchone()
            (size,) = db.execute(
                "SELECT SUM(LENGTH(spec)) FROM specs WHERE id IN"
                " (SELECT spec_id FROM jobs WHERE cluster = ?)",
                (cluster,),
            ).fetchone()
        assert n_specs == 1
        assert size < 2 * len(big)
    finally:
        pool.stj(ROOT, "rm", str(cluster), check=False)


def test_rm_of_a_big_cluster_keeps_others_served_and_counts(
    make_pool: Any, users: dict[str, User]
) -> None:
    """`stj rm` of a 20,000-job cluster answers with the right count in a small reply, while
    another user's `stj q` keeps answering within a second."""
    pool: Pool = make_pool("max_jobs_per_user = 100000\n", slots=2)
    a, b = users["a"], users["b"]
    r = pool.stj(a, "submit", "-n", "20000", "/bin/sleep", "300")
    cluster = r.stdout.split(":", 1)[1].split()[0].split(".")[0]
    (mine,) = pool.submit(b, "/bin/sleep", "300")
    latencies: list[float] = []
    done = threading.Event()

    def query_loop() -> None:
        while not done.is_set():
            start = time.monotonic()
            q = pool.stj(b, "q", "--nobatch", "--owner", "stjtb")
            latencies.append(time.monotonic() - start)
            assert mine in q.stdout

    t = threading.Thread(target=query_loop)
    t.start()
    try:
        time.sleep(0.5)
        start = time.monotonic()
        rm = pool.stj(a, "rm", cluster)
        rm_took = time.monotonic() - start
        time.sleep(0.3)
    finally:
        done.set()
        t.join(30)
    removed = sum(int(n) for n in re.findall(r"rm done for (\d+) \w+ jobs", rm.stdout))
    removed += len(re.findall(rf"job {cluster}\.\d+: rm done", rm.stdout))
    assert removed == 20000, rm.stdout
    assert len(rm.stdout) < 4096
    assert latencies
    assert max(latencies) < 1.0, (max(latencies), rm_took)
    with _db(pool) as db:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE cluster = ? AND state = 'removed'", (int(cluster),)
        ).fetchone()
    assert n == 20000
    pool.stj(ROOT, "rm", mine)


def test_owner_filter_with_a_non_ascii_digit(pool: Pool, users: dict[str, User]) -> None:
    """`stj q --owner ²` ('²'.isdigit() is true) lists nothing instead of an internal error."""
    r = pool.stj(users["a"], "q", "--owner", "²", "--json")
    assert json.loads(r.stdout) == []
    r = pool.stj(users["a"], "q", "--owner", "99999999999999999999999", "--json")
    assert json.loads(r.stdout) == []
