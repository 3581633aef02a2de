"""The pool's job queue (issue 2): submit, q, history, rm/hold/release, suspend, status, output.

Real pools, real uids: every job here is a process the starter ran as its owner, and every
assertion reads what that process saw (its uid, groups, directory and environment, which it
printed to its own stdout) or what the kernel says about it (/proc).
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import pathlib
import pwd
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT, Pool, User, wait_for

#: A user of our own with a supplementary group, so "and groups" has something to prove.
GROUPED_USER = "stjtgrp"
EXTRA_GROUP = "stjtextra"


def proc_state(pid: int) -> str:
    """The /proc state letter of ``pid``; 'gone' when it no longer exists."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2]


def dead(pid: int) -> bool:
    return proc_state(pid) in ("gone", "Z", "X")


def stopped(pid: int) -> bool:
    """True if ``pid`` is SIGSTOPped ('T') or sits in a frozen cgroup v2."""
    if proc_state(pid) == "T":
        return True
    try:
        line = next(
            x
            for x in pathlib.Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            if x.startswith("0::")
        )
    except (OSError, StopIteration):
        return False
    mounts = pathlib.Path("/proc/self/mounts").read_text().splitlines()
    root = next((m.split()[1] for m in mounts if m.split()[2] == "cgroup2"), None)
    if root is None:
        return False
    events = pathlib.Path(root) / line[3:].lstrip("/") / "cgroup.events"
    try:
        return "frozen 1" in events.read_text().splitlines()
    except OSError:
        return False


def output(pool: Pool, user: User, job: str, stderr: bool = False) -> str:
    return pool.stj(user, "output", job, *(["--stderr"] if stderr else [])).stdout


def submit_cluster(pool: Pool, user: User, *argv: str) -> tuple[int, list[str]]:
    """Submit with the real CLI; return the cluster and the job ids it printed."""
    r = pool.stj(user, "submit", *argv)
    m = re.fullmatch(r"submitted (\d+) job\(s\) to cluster (\d+): ([\d. ]+)\n", r.stdout)
    assert m, r.stdout
    return int(m[2]), m[3].split()


def all_job_ids(pool: Pool) -> set[str]:
    return set(pool.jobs()) | set(pool.jobs(history=True))


def rm_quietly(pool: Pool, *ids: str) -> None:
    pool.stj(ROOT, "rm", *ids, check=False)


@pytest.fixture(scope="module")
def grouped(users: dict[str, User]) -> User:
    """A user whose group list holds a supplementary group besides its own."""
    subprocess.run(["groupadd", "-f", EXTRA_GROUP], check=True)
    try:
        pwd.getpwnam(GROUPED_USER)
        subprocess.run(["usermod", "-aG", EXTRA_GROUP, GROUPED_USER], check=True)
    except KeyError:
        subprocess.run(
            ["useradd", "-m", "-s", "/bin/bash", "-G", EXTRA_GROUP, GROUPED_USER], check=True
        )
    pw = pwd.getpwnam(GROUPED_USER)
    return User(GROUPED_USER, pw.pw_uid, pw.pw_gid, pw.pw_dir)


IDENTITY = "id -u; id -g; id -G; pwd; stat -c '%u %a' .; env"


def parse_identity(text: str) -> tuple[int, int, set[int], str, str, dict[str, str]]:
    uid, gid, groups, cwd, mode, *env_lines = text.splitlines()
    env = dict(line.partition("=")[::2] for line in env_lines)
    return int(uid), int(gid), {int(g) for g in groups.split()}, cwd, mode, env


def test_submit_runs_procs_as_owner_in_scratch_with_env(pool: Pool, grouped: User) -> None:
    """`stj submit -n 3 -e --initialdir` makes C.0-C.2, run as the owner's uid, gid and groups,
    each in its own scratch directory, with the submitted environment plus SSH_TO_JOB_*."""
    iwd = str(pool.state)
    argv = [
        "-n",
        "3",
        "-e",
        "GREETING=hello world",
        "-e",
        "EMPTY=",
        "--initialdir",
        iwd,
        "/bin/sh",
        "-c",
        IDENTITY,
    ]
    cluster, ids = submit_cluster(pool, grouped, *argv)
    assert ids == [f"{cluster}.0", f"{cluster}.1", f"{cluster}.2"]
    want_groups = set(os.getgrouplist(GROUPED_USER, grouped.gid))
    extra_gid = grp.getgrnam(EXTRA_GROUP).gr_gid
    assert extra_gid in want_groups
    scratches = set()
    for job in ids:
        info = pool.wait_state(job, "completed")
        assert (info["exit_code"], info["exit_signal"]) == (0, None), info
        assert info["owner"] == GROUPED_USER
        assert info["owner_uid"] == grouped.uid
        assert info["initialdir"] == iwd
        uid, gid, groups, cwd, mode, env = parse_identity(output(pool, grouped, job))
        assert (uid, gid) == (grouped.uid, grouped.gid)
        assert groups == want_groups
        assert cwd == info["scratch"]
        assert pathlib.Path(cwd).parent == pool.state / "execute"
        assert mode == f"{grouped.uid} 700"
        scratches.add(cwd)
        assert env["GREETING"] == "hello world"
        assert env["EMPTY"] == ""
        assert env["SSH_TO_JOB_ID"] == job
        assert env["SSH_TO_JOB_SCRATCH_DIR"] == cwd
        assert env["SSH_TO_JOB_IWD"] == iwd
        assert env["USER"] == GROUPED_USER
        # Nothing of the submitter's or the starter's own environment leaks in.
        assert "STJ_STATE_DIR" not in env
        assert "STJ_CONFIG" not in env
        # The scratch directory goes with the job.
        assert not pathlib.Path(cwd).exists()
    assert len(scratches) == 3


def test_submit_file_sets_every_key(pool: Pool, users: dict[str, User]) -> None:
    """A TOML submit file's executable, arguments, environment, initialdir, count and
    hold_on_failure all take effect: two jobs that exit 3 end held (kept for debugging), and
    their output can be read."""
    a = users["a"]
    d = pool.state / "subfile"
    d.mkdir(mode=0o755)
    sub = d / "job.toml"
    sub.write_text(
        'executable = "/bin/sh"\n'
        'arguments = ["-c", "echo \\"$GREETING\\" \\"$1\\"; echo \\"$SSH_TO_JOB_IWD\\"; exit 3",'
        ' "sh", "arg one"]\n'
        'environment = { GREETING = "hi from toml" }\n'
        f'initialdir = "{d}"\n'
        "count = 2\n"
        "hold_on_failure = true\n"
    )
    sub.chmod(0o644)
    cluster, ids = submit_cluster(pool, a, "-f", str(sub))
    assert ids == [f"{cluster}.0", f"{cluster}.1"]
    for job in ids:
        info = pool.wait_state(job, "held")
        assert info["hold_reason"].startswith("debug hold: the job failed with exit status 3")
        assert info["exit_code"] == 3
        assert info["executable"] == "/bin/sh"
        assert info["args"][-1] == "arg one"
        assert output(pool, a, job) == f"hi from toml arg one\n{d}\n"
    pool.stj(a, "rm", str(cluster))
    hist = pool.jobs(history=True)
    assert [hist[j]["state"] for j in ids] == ["removed", "removed"]


BAD_SUBMIT_FILES = [
    ('executable = "/bin/true\n', "is not valid TOML"),
    ('executable = "/bin/true"\nqueue = 3\n', "unknown key(s) ['queue']"),
    ("executable = 5\n", "'executable' (a string) is required"),
    ('arguments = ["x"]\n', "'executable' (a string) is required"),
    ('executable = "/bin/true"\narguments = [1, 2]\n', "'arguments' must be"),
    ('executable = "/bin/true"\nenvironment = { A = 1 }\n', "'environment' must be"),
    ('executable = "/bin/true"\nenvironment = "A=1"\n', "'environment' must be"),
    ('executable = "/bin/true"\ncount = "3"\n', "'count' must be a positive integer"),
    ('executable = "/bin/true"\ncount = 0\n', "'count' must be a positive integer"),
    ('executable = "/bin/true"\ninitialdir = 7\n', "'initialdir' must be a string"),
    ('executable = "/bin/true"\nhold_on_failure = "yes"\n', "'hold_on_failure' must be"),
]


def test_malformed_submit_input_is_refused_and_queues_nothing(
    pool: Pool, users: dict[str, User]
) -> None:
    """Every malformed submit file (bad TOML, unknown key, wrong type) and bad submit argument
    exits 2 with a message naming the problem, and no job and no cluster number is used up."""
    a = users["a"]
    before = all_job_ids(pool)
    first, _ = submit_cluster(pool, a, "/bin/true")
    d = pool.state / "badfiles"
    d.mkdir(mode=0o755)
    for i, (text, message) in enumerate(BAD_SUBMIT_FILES):
        f = d / f"bad{i}.toml"
        f.write_text(text)
        f.chmod(0o644)
        r = pool.stj(a, "submit", "-f", str(f), check=False)
        assert (r.returncode, r.stdout) == (2, ""), (text, r)
        assert message in r.stderr, (text, r.stderr)
        assert str(f) in r.stderr, (text, r.stderr)
        assert "Traceback" not in r.stderr
    for argv, message in (
        (["-f", str(d / "missing.toml")], "cannot read"),
        (["-e", "NOEQUALS", "/bin/true"], "NAME=VALUE"),
        (["no-such-program-here"], "not found on PATH"),
        ([], "give an executable"),
    ):
        r = pool.stj(a, "submit", *argv, check=False)
        assert (r.returncode, r.stdout) == (2, ""), (argv, r)
        assert message in r.stderr, (argv, r.stderr)
    after, _ = submit_cluster(pool, a, "/bin/true")
    assert after == first + 1
    assert all_job_ids(pool) - before == {f"{first}.0", f"{after}.0"}


def test_q_lists_id_owner_state_times_and_command(pool: Pool, users: dict[str, User]) -> None:
    """`stj q --nobatch` shows id, owner, state, submission time, run time and command of each
    job, to anyone; `--json` gives the same jobs with their pids, and ids filter the listing."""
    a, b = users["a"], users["b"]
    t0 = time.time()
    _, (running,) = submit_cluster(pool, a, "/bin/sleep", "120")
    _, (held,) = submit_cluster(pool, b, "/bin/sleep", "121")
    try:
        pool.stj(b, "hold", "--reason", "wait for me", held)
        info = pool.wait_state(running, "running")
        time.sleep(1.1)  # so the run time is at least one second
        text = pool.stj(b, "q", "--nobatch").stdout
        header, *rows = text.splitlines()
        assert header.split() == ["ID", "OWNER", "STATE", "SUBMITTED", "RUN_TIME", "SSH", "CMD"]
        row = next(r for r in rows if r.startswith(running + " ")).split()
        assert row[:3] == [running, "stjta", "running"]
        assert re.fullmatch(r"\d\d/\d\d \d\d:\d\d:\d\d", f"{row[3]} {row[4]}")
        m = re.fullmatch(r"0\+00:00:(\d\d)", row[5])
        assert m, row
        assert int(m[1]) >= 1, row
        assert row[-2:] == ["sleep", "120"]
        at = next(i for i, r in enumerate(rows) if r.startswith(held + " "))
        assert rows[at].split()[1:3] == ["stjtb", "held"]
        assert rows[at].split()[-2:] == ["sleep", "121"]
        assert rows[at + 1].split() == ["hold", "reason:", "wait", "for", "me"]
        assert re.fullmatch(r"\d+ jobs: (\d+ \w+(, )?)+", rows[-1]), rows[-1]
        listed = {j["id"]: j for j in json.loads(pool.stj(b, "q", "--json").stdout)}
        j = listed[running]
        assert (j["owner"], j["owner_uid"], j["state"]) == ("stjta", a.uid, "running")
        assert (j["executable"], j["args"]) == ("/bin/sleep", ["120"])
        assert t0 - 1 <= j["submitted"] <= j["started"] <= time.time()
        assert j["pids"] == info["pids"]
        assert len(j["pids"]) == 1
        status = pathlib.Path(f"/proc/{j['pids'][0]}/status").read_text()
        assert re.search(rf"^Uid:\s+{a.uid}\s", status, re.M)
        assert listed[held]["hold_reason"] == "wait for me"
        only = json.loads(pool.stj(b, "q", "--json", running).stdout)
        assert [x["id"] for x in only] == [running]
    finally:
        rm_quietly(pool, running, held)


def test_history_records_exit_codes_and_signals(pool: Pool, users: dict[str, User]) -> None:
    """Finished jobs leave the queue for `stj history`, which shows the exit code or the
    signal that ended each one."""
    a = users["a"]
    _, (code,) = submit_cluster(pool, a, "/bin/sh", "-c", "exit 7")
    _, (sig,) = submit_cluster(pool, a, "/bin/sh", "-c", "kill -TERM $$")
    c = pool.wait_state(code, "completed")
    s = pool.wait_state(sig, "completed")
    assert (c["exit_code"], c["exit_signal"]) == (7, None)
    assert (s["exit_code"], s["exit_signal"]) == (None, 15)
    assert c["started"] <= c["finished"]
    live = pool.jobs()
    assert code not in live
    assert sig not in live
    rows = {line.split()[0]: line.split() for line in pool.stj(a, "history").stdout.splitlines()}
    assert rows["ID"][5] == "EXIT"
    assert rows[code][2] == "completed"
    assert rows[code][6] == "7"
    assert rows[sig][2] == "completed"
    assert rows[sig][6:8] == ["sig", "15"]


def test_rm_hold_release_by_cluster_and_proc(pool: Pool, users: dict[str, User]) -> None:
    """hold/release/rm act on one proc (`C.P`) or a whole cluster (`C`): a held job's processes
    are gone and it keeps its reason; a released one runs again; rm ends them all."""
    a = users["a"]
    cluster, (j0, j1) = submit_cluster(pool, a, "-n", "2", "/bin/sleep", "120")
    try:
        (p0,) = pool.wait_state(j0, "running")["pids"]
        (p1,) = pool.wait_state(j1, "running")["pids"]
        r = pool.stj(a, "hold", "--reason", "debug me", j0)
        assert f"job {j0}: hold done" in r.stdout
        info = pool.wait_state(j0, "held")
        assert info["hold_reason"] == "debug me"
        wait_for(f"pid {p0} of held job to go", lambda: dead(p0))
        assert pool.job(j1)["state"] == "running"
        assert not dead(p1)
        wait_for(f"{j0} to be evicted", lambda: not pool.job(j0)["pids"])
        pool.stj(a, "release", j0)
        (p0b,) = pool.wait_state(j0, "running")["pids"]
        assert p0b != p0
        assert not dead(p0b)

        r = pool.stj(a, "hold", str(cluster))
        assert f"job {j0}: hold done" in r.stdout
        assert f"job {j1}: hold done" in r.stdout
        for job, pid in ((j0, p0b), (j1, p1)):
            assert pool.wait_state(job, "held")["hold_reason"] == "held by stjta"
            wait_for(f"pid {pid} to go", lambda pid=pid: dead(pid))  # type: ignore[misc]
            wait_for(f"{job} to be evicted", lambda job=job: not pool.job(job)["pids"])  # type: ignore[misc]
        r = pool.stj(a, "release", str(cluster))
        assert r.stdout.count("release done") == 2
        pids = [pool.wait_state(j, "running")["pids"][0] for j in (j0, j1)]

        r = pool.stj(a, "rm", str(cluster))
        assert r.stdout.count("rm done") == 2
        for job, pid in zip((j0, j1), pids, strict=True):
            info = pool.wait_state(job, "removed")
            assert info["hold_reason"] == "removed by stjta"
            wait_for(f"pid {pid} to go", lambda pid=pid: dead(pid))  # type: ignore[misc]
        # Acting on a finished job is refused: it is no longer in the queue.
        r = pool.stj(a, "hold", j0, check=False)
        assert r.returncode == 1
        assert f"job {j0} is not in the queue" in r.stderr
    finally:
        rm_quietly(pool, str(cluster))


def test_status_shows_starters_slots_and_placement(pool: Pool, users: dict[str, User]) -> None:
    """`stj status` names the connected starter, its slots, and which jobs run on it."""
    a = users["a"]
    _, (job,) = submit_cluster(pool, a, "/bin/sleep", "120")
    try:
        pool.wait_state(job, "running")
        st = json.loads(pool.stj(a, "status", "--json").stdout)
        assert st["broker_pid"] == pool.pids("broker")[0]
        (starter,) = st["starters"]
        assert starter["slots"] == 8
        assert starter["connected"] is True
        assert job in starter["jobs"]
        assert starter["busy"] == len(starter["jobs"])
        assert st["jobs_running"] >= 1
        assert pool.job(job)["starter"] == starter["starter_id"]
        text = pool.stj(a, "status").stdout
        assert f"broker pid {st['broker_pid']}:" in text
        line = next(x for x in text.splitlines() if x.startswith("starter "))
        assert f"starter {starter['starter_id']} (127.0.0.1:" in line
        assert f"{starter['busy']}/8 slots busy" in line
        assert job in line.split()
    finally:
        rm_quietly(pool, job)


def test_output_shows_stdout_and_stderr_while_running_and_after(
    pool: Pool, users: dict[str, User]
) -> None:
    """`stj output ID [--stderr]` shows what a job wrote so far while it runs, and all of it
    after it finished."""
    a = users["a"]
    script = "echo out-1; echo err-1 >&2; while [ ! -e go ]; do sleep 0.05; done; echo out-2"
    _, (job,) = submit_cluster(pool, a, "/bin/sh", "-c", script)
    try:
        info = pool.wait_state(job, "running")
        wait_for("first output", lambda: output(pool, a, job) == "out-1\n")
        assert output(pool, a, job, stderr=True) == "err-1\n"
        pathlib.Path(info["scratch"], "go").touch()
        pool.wait_state(job, "completed")
        assert output(pool, a, job) == "out-1\nout-2\n"
        assert output(pool, a, job, stderr=True) == "err-1\n"
    finally:
        rm_quietly(pool, job)


def test_bare_uid_without_passwd_entry_runs_a_job(pool: Pool, users: dict[str, User]) -> None:
    """A uid with no passwd entry submits, and its job runs as that uid in its own scratch."""
    bare = users["bare"]
    _, (job,) = submit_cluster(pool, bare, "/bin/sh", "-c", 'id -u; id -g; pwd; echo "$HOME"')
    info = pool.wait_state(job, "completed")
    assert info["exit_code"] == 0
    assert info["owner"] == f"uid{bare.uid}"
    assert output(pool, bare, job).splitlines() == [
        str(bare.uid),
        str(bare.gid),
        info["scratch"],
        info["scratch"],
    ]


def test_job_tree_suspends_resumes_and_dies_as_a_whole(pool: Pool, users: dict[str, User]) -> None:
    """suspend stops the job's main process and the grandchild it forked, continue resumes
    both, and rm kills both."""
    a = users["a"]
    script = (
        "( while :; do echo g >> g.ticks; sleep 0.05; done ) & echo $!; "
        "while :; do echo m >> m.ticks; sleep 0.05; done"
    )
    _, (job,) = submit_cluster(pool, a, "/bin/sh", "-c", script)
    try:
        info = pool.wait_state(job, "running")
        (main,) = info["pids"]
        child = int(wait_for("the grandchild's pid", lambda: output(pool, a, job).strip()))
        assert child != main
        assert not dead(child)
        scratch = pathlib.Path(info["scratch"])

        def sizes() -> tuple[int, int]:
            return ((scratch / "m.ticks").stat().st_size, (scratch / "g.ticks").stat().st_size)

        wait_for("both to tick", lambda: all(sizes()))
        pool.stj(a, "suspend", job)
        assert pool.job(job)["state"] == "suspended"
        wait_for("main and grandchild to stop", lambda: stopped(main) and stopped(child), 5)
        frozen = sizes()
        time.sleep(0.5)
        assert sizes() == frozen
        r = pool.stj(a, "suspend", job, check=False)
        assert r.returncode == 1
        assert "is suspended, not running" in r.stderr

        pool.stj(a, "continue", job)
        assert pool.job(job)["state"] == "running"
        wait_for(
            "both to tick again",
            lambda: all(n > f for n, f in zip(sizes(), frozen, strict=True)),
            5,
        )
        assert not stopped(main)
        assert not stopped(child)

        pool.stj(a, "rm", job)
        wait_for("main and grandchild to die", lambda: dead(main) and dead(child), 5)
        assert pool.wait_state(job, "removed")["state"] == "removed"
    finally:
        rm_quietly(pool, job)


def test_one_slot_runs_jobs_one_at_a_time_in_submit_order(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """With one slot, jobs wait idle for their turn and run first-in first-out, one at a time."""
    pool = make_pool(slots=1)
    a, b = users["a"], users["b"]
    # Each job runs until the test lets it end, so what the queue shows in between is certain.
    script = "while [ ! -e go ]; do sleep 0.05; done"
    _, first = submit_cluster(pool, a, "-n", "2", "/bin/sh", "-c", script)
    _, second = submit_cluster(pool, b, "/bin/sh", "-c", script)
    order = [*first, *second]
    for i, job in enumerate(order):
        info = pool.wait_state(job, "running")
        everything = {**pool.jobs(history=True), **pool.jobs()}
        states = {j: everything[j]["state"] for j in order}
        assert states == {
            j: "completed" if k < i else "running" if k == i else "idle"
            for k, j in enumerate(order)
        }
        pathlib.Path(info["scratch"], "go").touch()
        pool.wait_state(job, "completed")
    hist = pool.jobs(history=True)
    runs: list[dict[str, Any]] = [hist[j] for j in order]
    assert [r["exit_code"] for r in runs] == [0, 0, 0]
    for before, after in itertools.pairwise(runs):
        assert before["started"] < before["finished"] <= after["started"], (before, after)


def test_no_one_acts_on_another_users_jobs(pool: Pool, users: dict[str, User]) -> None:
    """rm, hold, release, suspend, continue and output of someone else's job are refused with a
    message saying whose it is; the queue superuser from the config and root may act."""
    a, b, su, bare = users["a"], users["b"], users["su"], users["bare"]
    cluster, (job,) = submit_cluster(pool, a, "/bin/sleep", "120")
    try:
        (pid,) = pool.wait_state(job, "running")["pids"]
        for who in (b, bare):
            for action in ("rm", "hold", "suspend", "continue", "release"):
                for target in (job, str(cluster)):
                    r = pool.stj(who, action, target, check=False)
                    assert r.returncode == 1, (who, action, r)
                    assert (
                        f"job {job} belongs to stjta; only its owner or a queue superuser "
                        f"may {action} it"
                    ) in r.stderr, r.stderr
            r = pool.stj(who, "output", job, check=False)
            assert r.returncode == 1
            assert f"job {job} belongs to stjta" in r.stderr
        info = pool.job(job)
        assert info["state"] == "running"
        assert info["pids"] == [pid]
        assert not dead(pid)
        # Held by someone else (the superuser): the owner may not release it either way round.
        pool.stj(su, "hold", job)
        assert pool.wait_state(job, "held")["hold_reason"] == "held by stjtsu"
        r = pool.stj(b, "release", job, check=False)
        assert r.returncode == 1
        assert "belongs to stjta" in r.stderr
        wait_for(f"{job} to be evicted", lambda: not pool.job(job)["pids"])
        pool.stj(su, "release", job)
        pool.wait_state(job, "running")
        pool.stj(ROOT, "rm", job)
        assert pool.wait_state(job, "removed")["hold_reason"] == "removed by root"
    finally:
        rm_quietly(pool, job)
