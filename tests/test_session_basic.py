"""The product's first promise: ssh-to-job puts the job's owner into the running job."""

from __future__ import annotations

from conftest import Pool, User


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
