"""ssh-to-job into Slurm jobs: a real Slurm cluster (tests/slurm.py), real sshd, real users.

One cluster and one pool (broker with ``[broker] slurm``, a starter with ``backend = "slurm"``
named as the Slurm node) serve the whole module; each test submits its own jobs with
``sbatch`` as a test user.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Pool, User, new_state_dir, wait_for
from slurm import Cluster, have_slurm

pytestmark = pytest.mark.skipif(have_slurm() is not None, reason=str(have_slurm()))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A one-node Slurm cluster for this module."""
    c = Cluster(new_state_dir() / "slurm")
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def spool(users: dict[str, User], cluster: Cluster) -> Iterator[Pool]:
    """A pool whose broker asks Slurm and whose starter enters the node's Slurm jobs."""
    su = users["su"].name
    config = (
        f'[broker]\nsuperusers = ["{su}"]\nslurm = true\nslurm_conf = "{cluster.conf}"\n'
        f'[starter]\nbackend = "slurm"\nname = "{cluster.nodes[0]}"\n'
        f'slurm_conf = "{cluster.conf}"\n'
    )
    p = Pool(new_state_dir(), config)
    try:
        p.start()
    except BaseException:
        p.stop()
        raise
    yield p
    p.stop()
    shutil.rmtree(p.state, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(users: dict[str, User]) -> pathlib.Path:
    """A directory the test users' jobs run in."""
    d = new_state_dir() / "work"
    d.mkdir(mode=0o1777)
    d.chmod(0o1777)
    return d


def refused(r: subprocess.CompletedProcess[str], *texts: str) -> None:
    """``r`` is a refusal (exit status 1) whose message has every one of ``texts``."""
    assert r.returncode == 1, r.stdout + r.stderr
    for text in texts:
        assert text in r.stderr


def submit(
    cluster: Cluster, user: User, workdir: pathlib.Path, *args: str, script: str = "sleep 300"
) -> str:
    return cluster.sbatch(
        user.prefix(),
        "-D",
        str(workdir),
        "-o",
        "/dev/null",
        *args,
        "--wrap",
        script,
        env={"HOME": user.home},
    )


@pytest.fixture(scope="module")
def job_a(cluster: Cluster, users: dict[str, User], workdir: pathlib.Path) -> dict[str, Any]:
    """A running batch job of user a, shared by the read-only tests."""
    jid = submit(
        cluster, users["a"], workdir, "--export=ALL,STJ_MARK=from-batch", script="sleep 600"
    )
    return cluster.wait_running(jid)


def test_session_is_the_jobs_user_env_and_cwd(
    spool: Pool, users: dict[str, User], job_a: dict[str, Any], workdir: pathlib.Path
) -> None:
    """A session runs as the job's uid, with the batch step's environment and the job's cwd."""
    jid = job_a["job_id"]
    r = spool.ssh(
        users["a"],
        f"slurm:{jid}",
        "id -u; echo $SLURM_JOB_ID; echo $SLURM_JOB_NODELIST; echo $STJ_MARK; pwd; "
        "echo $SSH_TO_JOB_PIDS",
    )
    assert r.returncode == 0, r.stderr + spool.log_text()
    uid, sjid, nodelist, mark, cwd, pids = r.stdout.splitlines()
    assert int(uid) == users["a"].uid
    assert sjid == str(jid)
    assert nodelist == job_a["nodes"]
    assert mark == "from-batch"
    assert cwd == str(workdir)
    listed = {int(p) for p in pids.split()}
    assert listed
    assert all(
        os.stat(f"/proc/{p}").st_uid in (users["a"].uid, 0)
        for p in listed
        if os.path.exists(f"/proc/{p}")
    )


def test_pids_match_scontrol_listpids(
    spool: Pool, cluster: Cluster, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """SSH_TO_JOB_PIDS lists the processes Slurm lists for the job on this node."""
    jid = str(job_a["job_id"])
    before = {
        int(line.split()[0])
        for line in cluster.run(["scontrol", "listpids", jid]).stdout.splitlines()[1:]
        if int(line.split()[0]) > 0
    }
    r = spool.ssh(users["a"], f"slurm:{jid}", "echo $SSH_TO_JOB_PIDS")
    assert r.returncode == 0, r.stderr
    assert {int(p) for p in r.stdout.split()} == before


def test_session_is_adopted_into_the_job(
    spool: Pool, cluster: Cluster, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """The session's own shell is one of the job's processes for Slurm (scontrol listpids)."""
    jid = str(job_a["job_id"])
    r = spool.ssh(
        users["a"], f"slurm:{jid}", f"echo $$; SLURM_CONF={cluster.conf} scontrol listpids {jid}"
    )
    assert r.returncode == 0, r.stderr
    shell = int(r.stdout.split()[0])
    listed = {int(line.split()[0]) for line in r.stdout.splitlines()[2:] if line.strip()}
    if cluster.proctrack == "proctrack/cgroup":
        assert shell in listed, r.stdout
    else:
        pytest.skip("proctrack/linuxproc: Slurm has no container to adopt into")


def test_files_scp_sftp_rsync(
    spool: Pool, users: dict[str, User], job_a: dict[str, Any], workdir: pathlib.Path
) -> None:
    """scp, sftp and rsync reach the job's working directory."""
    a = users["a"]
    jid = job_a["job_id"]
    local = pathlib.Path(new_state_dir()) / "f.txt"
    local.parent.chmod(0o777)
    local.write_text("payload\n")
    local.chmod(0o644)
    r = spool.ssh(a, "-ssh", "scp", f"slurm:{jid}", str(local), "remote:scp.txt")
    assert r.returncode == 0, r.stderr
    assert (workdir / "scp.txt").read_text() == "payload\n"
    r = spool.ssh(a, "-ssh", "sftp", f"slurm:{jid}", input=f"put {local} sftp.txt\n")
    assert r.returncode == 0, r.stderr
    assert (workdir / "sftp.txt").read_text() == "payload\n"
    r = spool.run(a, ["rsync", "-e", "ssh-to-job", str(local), f"slurm-{jid}:rsync.txt"])
    assert r.returncode == 0, r.stderr
    assert (workdir / "rsync.txt").read_text() == "payload\n"
    shutil.rmtree(local.parent, ignore_errors=True)


def test_another_user_is_refused_naming_the_owner(
    spool: Pool, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """User b may not enter a's job; the message names the job's owner. A superuser may."""
    jid = job_a["job_id"]
    r = spool.ssh(users["b"], f"slurm:{jid}", "true")
    assert r.returncode == 1
    assert "belongs to stjta" in r.stderr
    r = spool.ssh(users["su"], f"slurm:{jid}", "id -u")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == users["a"].uid


def test_pending_finished_and_unknown(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """A held (pending) job says so, a finished job says so, an unknown one says so."""
    a = users["a"]
    held = submit(cluster, a, workdir, "--hold")
    r = spool.ssh(a, f"slurm:{held}", "true")
    refused(r, "pending", "-auto-retry")
    cluster.run(["scancel", held])
    cluster.wait_gone(held)
    r = spool.ssh(a, f"slurm:{held}", "true")
    refused(r, "cancelled")
    r = spool.ssh(a, "slurm:999999", "true")
    refused(r, "does not know job 999999")


def test_auto_retry_waits_for_a_pending_job(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """-auto-retry waits while the job is pending and connects once Slurm starts it."""
    a = users["a"]
    jid = submit(cluster, a, workdir, "--hold")
    proc = subprocess.Popen(
        [
            *a.prefix(),
            spool.env(a)["PATH"].split(":")[0] + "/ssh-to-job",
            "-auto-retry",
            f"slurm:{jid}",
            "echo $SLURM_JOB_ID",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=spool.env(a),
        cwd="/tmp",
    )
    time.sleep(2)
    assert proc.poll() is None
    cluster.run(["scontrol", "release", jid])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == jid
    cluster.run(["scancel", jid])


def test_scancel_ends_an_open_session(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """scancel ends a session that is open in the job, and its processes with it."""
    a = users["a"]
    jid = submit(cluster, a, workdir)
    cluster.wait_running(jid)
    marker = workdir / f"pid-{jid}"
    proc = subprocess.Popen(
        [
            *a.prefix(),
            spool.env(a)["PATH"].split(":")[0] + "/ssh-to-job",
            f"slurm:{jid}",
            f"sleep 1000 & echo $! > {marker}; wait",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=spool.env(a),
        cwd="/tmp",
    )
    pid = wait_for("the session's sleep", lambda: marker.exists() and marker.read_text().strip())
    assert os.path.exists(f"/proc/{pid}")
    cluster.run(["scancel", jid])
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    wait_for("the session's sleep to die", lambda: not os.path.exists(f"/proc/{pid}"), 15)


def test_array_task(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """An array task is named as Slurm names it (JOB_TASK) and has its own environment."""
    a = users["a"]
    arr = submit(cluster, a, workdir, "--array=3-4")
    cluster.wait_running(f"{arr}_4")
    r = spool.ssh(a, f"slurm:{arr}_4", "echo $SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [arr, "4"]
    r = spool.ssh(a, f"slurm:{arr}", "true")
    refused(r, "is an array")
    cluster.run(["scancel", arr])


def test_no_listening_port_on_the_node(
    spool: Pool, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """Neither the starter nor a session's sshd listens on any port."""
    jid = job_a["job_id"]
    r = spool.ssh(users["a"], f"slurm:{jid}", "cat /proc/$PPID/status | grep ^PPid; echo $PPID")
    assert r.returncode == 0, r.stderr
    starter = spool.pids("starter")
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for pid in starter:
        assert f"pid={pid}," not in listening
    assert "sshd" not in listening or all(f"pid={p}," not in listening for p in starter)


def test_node_selection(spool: Pool, users: dict[str, User], job_a: dict[str, Any]) -> None:
    """Index 0 and the node's name pick the batch host; a node outside the job is refused."""
    jid = job_a["job_id"]
    node = job_a["batch_host"]
    for spec in (f"slurm:{jid}+0", f"slurm:{jid}+{node}"):
        r = spool.ssh(users["a"], spec, "echo $SLURMD_NODENAME")
        assert r.returncode == 0, r.stderr
    r = spool.ssh(users["a"], f"slurm:{jid}+1", "true")
    refused(r, "no node 1")
    r = spool.ssh(users["a"], f"slurm:{jid}+elsewhere", "true")
    refused(r, "does not run on elsewhere")
