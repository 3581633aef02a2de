"""The product's first promise: ssh-to-job puts the job's owner into the running job."""

from __future__ import annotations

import os
import pathlib
import shutil

from conftest import Pool, User, session_entries


def test_command_runs_in_the_job(pool: Pool, users: dict[str, User]) -> None:
    """A one-off command runs as the job's uid, in its scratch dir, with its environment."""
    a = users["a"]
    (job,) = pool.submit(a, "-e", "MARK=hello world", "/bin/sleep", "300")
    info = pool.wait_state(job, "running")
    r = pool.ssh(a, job, 'id -u; pwd; echo "$MARK"; echo "$SSH_TO_JOB_PIDS"; echo "$SSH_TO_JOB_ID"')
    assert r.returncode == 0, r.stderr
    uid, cwd, mark, pids, jid = r.stdout.splitlines()
    assert int(uid) == a.uid
    assert cwd == info["scratch"]
    assert mark == "hello world"
    assert pids.split()[0] == str(info["pids"][0])
    assert jid == job


def test_a_long_tmpdir_does_not_matter(pool: Pool, users: dict[str, User]) -> None:
    """With a TMPDIR far longer than sun_path's 107 bytes, sessions still work: the only unix
    socket the client makes is an abstract one, and session files may live anywhere."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    base = pathlib.Path("/tmp") / f"stjt-long-{a.uid}"
    deep = base.joinpath(*["d" * 40] * 6)
    deep.mkdir(parents=True, exist_ok=True)
    for p in [deep, *deep.parents]:
        if p == base.parent:
            break
        os.chown(p, a.uid, a.gid)
    assert len(str(deep)) > 200
    try:
        r = pool.ssh(a, job, "echo $SSH_TO_JOB_ID", env={"TMPDIR": str(deep)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == job
        assert session_entries(deep / f"ssh-to-job-{a.uid}") == []  # cleaned up after itself
    finally:
        shutil.rmtree(base, ignore_errors=True)
