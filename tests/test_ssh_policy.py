"""Who may ssh into a job: the owner, queue superusers and the collaborators the owner names;
the pool's admin can turn ssh off for the pool or for some users, an owner for one job."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from conftest import SSH_TO_JOB, Pool, User, wait_for


def _running(pool: Pool, user: User, *argv: str) -> str:
    (job,) = pool.submit(user, *argv, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    return job


def test_collaborators_named_at_submit_and_later(pool: Pool, users: dict[str, User]) -> None:
    """--ssh-users lets a named user in; stj ssh-allow adds one later; others stay out; only
    the owner (or a superuser) may name collaborators."""
    a, b, su = users["a"], users["b"], users["su"]
    named = _running(pool, a, "--ssh-users", str(b.name))
    plain = _running(pool, a)
    try:
        r = pool.ssh(b, named, "id -u")
        assert (r.returncode, r.stdout.strip()) == (0, str(a.uid)), r.stderr
        r = pool.ssh(b, plain, "true")
        assert r.returncode == 1
        assert f"job {plain} belongs to {a.name}" in r.stderr
        r = pool.stj(b, "ssh-allow", plain, str(b.name), check=False)
        assert r.returncode == 1
        assert "only its owner or a queue superuser may let others in" in r.stderr
        r = pool.stj(a, "ssh-allow", plain, str(b.name))
        assert f"{b.name} may now ssh into it" in r.stdout
        r = pool.ssh(b, plain, "echo in")
        assert (r.returncode, r.stdout) == (0, "in\n"), r.stderr
        r = pool.stj(su, "ssh-allow", plain, "no-such-user-here", check=False)
        assert r.returncode == 1
        assert "no such user: 'no-such-user-here'" in r.stderr
    finally:
        pool.stj(a, "rm", named, plain)


def test_no_ssh_job_admits_no_one(pool: Pool, users: dict[str, User]) -> None:
    """A job submitted with --no-ssh refuses its owner and superusers alike, with the reason."""
    a, su = users["a"], users["su"]
    job = _running(pool, a, "--no-ssh")
    try:
        for who in (a, su):
            r = pool.ssh(who, job, "true")
            assert r.returncode == 1
            assert f"job {job} was submitted with --no-ssh" in r.stderr
    finally:
        pool.stj(a, "rm", job)


def test_pool_admin_turns_ssh_off(make_pool: Callable[..., Pool], users: dict[str, User]) -> None:
    """broker.allow_ssh = false refuses everyone; ssh_denied_users refuses only those named,
    even for their own jobs."""
    a, b = users["a"], users["b"]
    off = make_pool("allow_ssh = false\n")
    job = _running(off, a)
    r = off.ssh(a, job, "true")
    assert r.returncode == 1
    assert "ssh-to-job is turned off in this pool" in r.stderr
    off.stj(a, "rm", job)
    some = make_pool(f'ssh_denied_users = ["{b.name}"]\n')
    mine, theirs = _running(some, a), _running(some, b)
    r = some.ssh(b, theirs, "true")
    assert r.returncode == 1
    assert f"ssh-to-job is turned off for {b.name} in this pool" in r.stderr
    assert some.ssh(a, mine, "true").returncode == 0
    some.stj(a, "rm", mine)
    some.stj(b, "rm", theirs)


AGENT = "echo sock=${SSH_AUTH_SOCK:-none}"


def test_agent_forwarding_off_by_default_says_so(pool: Pool, users: dict[str, User]) -> None:
    """With allow_agent_forwarding off (the default), ssh -A gets no agent and one line
    saying why, instead of a silent failure."""
    a = users["a"]
    job = _running(pool, a)
    try:
        argv = ["ssh-agent", SSH_TO_JOB, "-ssh", "ssh -A", job, AGENT]
        r = pool.run(a, argv)
        assert (r.returncode, r.stdout) == (0, "sock=none\n"), r
        assert "agent forwarding is off in this pool" in r.stderr
        r = pool.run(a, ["ssh-agent", SSH_TO_JOB, job, AGENT])
        assert "agent forwarding" not in r.stderr
    finally:
        pool.stj(a, "rm", job)


def test_agent_forwarding_when_the_pool_allows_it(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """[starter] allow_agent_forwarding = true: ssh -A brings the user's agent into the session;
    without -A there is none."""
    a = users["a"]
    pool = make_pool("[starter]\nallow_agent_forwarding = true\n")
    job = _running(pool, a)
    r = pool.run(a, ["ssh-agent", SSH_TO_JOB, "-ssh", "ssh -A", job, AGENT + "; ssh-add -l"])
    assert r.stdout.startswith("sock=/"), r
    assert "agent has no identities" in r.stdout + r.stderr, r
    assert "agent forwarding is off" not in r.stderr
    r = pool.run(a, ["ssh-agent", SSH_TO_JOB, job, AGENT])
    assert (r.returncode, r.stdout) == (0, "sock=none\n"), r
    pool.stj(a, "rm", job)


def test_session_records(pool: Pool, users: dict[str, User]) -> None:
    """Every attempt is a durable record: a granted session with when and how many bytes each
    way, a refusal with its reason; owners see their jobs' records, others only their own."""
    a, b, su = users["a"], users["b"], users["su"]
    job = _running(pool, a)
    try:
        r = pool.ssh(a, job, "head -c 100000 /dev/zero", input="x" * 5000)
        assert r.returncode == 0, r.stderr
        assert pool.ssh(b, job, "true").returncode == 1
        want = {"granted": a.name, "refused": b.name}

        def mine() -> list[dict[str, Any]]:
            out = json.loads(pool.stj(a, "history", "--sessions", "--json", job).stdout)
            ended = [x for x in out if x["outcome"] != "granted" or x["ended"]]
            return out if len(ended) == 2 else []

        rows = wait_for("the session's end to be recorded", mine)
        assert {x["outcome"]: x["user"] for x in rows} == want
        granted = next(x for x in rows if x["outcome"] == "granted")
        assert granted["ended"] >= granted["started"] > 0
        assert granted["bytes_out"] > 100000, granted
        assert granted["bytes_in"] > 1000, granted
        refused = next(x for x in rows if x["outcome"] == "refused")
        assert f"job {job} belongs to {a.name}" in refused["reason"]
        theirs = json.loads(pool.stj(b, "history", "--sessions", "--json", job).stdout)
        assert [x["outcome"] for x in theirs] == ["refused"]
        assert len(json.loads(pool.stj(su, "history", "--sessions", "--json", job).stdout)) == 2
        table = pool.stj(a, "history", "--sessions", job).stdout.splitlines()
        assert table[0].split()[:4] == ["SESSION", "JOB", "USER", "OUTCOME"]
        # Two rows; the granted one's exit status under it.
        assert [x.strip() for x in table if x.startswith(" ")] == ["exit status: 0"]
        assert len(table) == 4
        assert granted["exit_status"] == 0
    finally:
        pool.stj(a, "rm", job)
