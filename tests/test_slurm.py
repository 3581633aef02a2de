"""ssh-to-job into Slurm jobs: a real Slurm cluster (tests/slurm.py), real sshd, real users.

One cluster and one pool (broker with ``[broker] slurm``, a starter with ``backend = "slurm"``
named as the Slurm node) serve the whole module; each test submits its own jobs with
``sbatch`` as a test user.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
from conftest import BIN, READ_FROM, ROOT, SERVE_ONCE, STJ, Pool, User, new_state_dir, wait_for
from slurm import Cluster, have_slurm

pytestmark = pytest.mark.skipif(have_slurm() is not None, reason=str(have_slurm()))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A two-node Slurm cluster (two slurmd on this host: Debian builds multiple-slurmd), with
    Slurm's process accounting (so that adoption by slurmstepd shows in ``sstat``)."""
    c = Cluster(new_state_dir() / "slurm", nodes=("n1", "n2"), jobacct="jobacct_gather/linux")
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
    second: subprocess.Popen[bytes] | None = None
    state2 = new_state_dir()
    try:
        p.start()
        # The second node's starter: its own state dir, its certificate from the pool's CA.
        addr = (p.state / "broker.addr").read_text().strip()
        (state2 / "config.toml").write_text(
            f'[broker]\npki_dir = "{p.state}/pki"\n'
            f'[starter]\nbackend = "slurm"\nname = "{cluster.nodes[1]}"\nbroker = "{addr}"\n'
            f'slurm_conf = "{cluster.conf}"\n'
        )
        with open(state2 / "starter.log", "ab") as log:
            second = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "ssh_to_job.starter",
                    "--state-dir",
                    str(state2),
                    "--config",
                    str(state2 / "config.toml"),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=p.env(ROOT),
                start_new_session=True,
            )

        def both() -> bool:
            r = p.stj(ROOT, "status", "--json", check=False)
            starters = json.loads(r.stdout)["starters"] if r.returncode == 0 else []
            return {s["starter_id"] for s in starters if s["connected"]} >= set(cluster.nodes)

        wait_for("both nodes' starters", both, 20)
    except BaseException:
        p.stop()
        raise
    yield p
    if second is not None:
        second.terminate()
        second.wait(15)
    p.stop()
    shutil.rmtree(p.state, ignore_errors=True)
    shutil.rmtree(state2, ignore_errors=True)


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
    node = job_a["batch_host"]
    before = {
        int(line.split()[0])
        for line in cluster.run(["scontrol", "listpids", jid, node]).stdout.splitlines()[1:]
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
        users["a"],
        f"slurm:{jid}",
        f"echo $$; SLURM_CONF={cluster.conf} scontrol listpids {jid} $SLURMD_NODENAME",
    )
    assert r.returncode == 0, r.stderr
    shell = int(r.stdout.split()[0])
    listed = {int(line.split()[0]) for line in r.stdout.splitlines()[2:] if line.strip()}
    if cluster.proctrack == "proctrack/cgroup":
        assert shell in listed, r.stdout
    else:
        pytest.skip("proctrack/linuxproc: Slurm has no container to adopt into")


def test_slurmstepd_adopts_the_session_and_accounts_for_it(
    spool: Pool, cluster: Cluster, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """The session's sshd is adopted by the extern step's slurmstepd (the starter's log says
    so), its shell is in the extern step's pids, and Slurm's accounting (``sstat`` of
    ``N.extern``) counts the CPU the session burns, which a bare cgroup write does not give."""
    jid = str(job_a["job_id"])
    node = job_a["batch_host"]
    conf = f"SLURM_CONF={cluster.conf}"
    r = spool.ssh(
        users["a"],
        f"slurm:{jid}",
        # A busy loop of ~4 s in the background; sstat while it runs (the extern step's
        # accounting keeps only live tasks' usage).
        "echo $$; timeout 4 sh -c 'while :; do :; done' & sleep 3; "
        f"{conf} scontrol listpids {jid}.4294967292 {node}; "
        f"{conf} sstat -n -P -j {jid}.extern -o AveCPU; wait",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    shell = int(lines[0])
    assert shell in {int(ln.split()[0]) for ln in lines[2:-1]}, r.stdout
    h, m, sec = lines[-1].split("-")[-1].split(":")
    assert int(h) * 3600 + int(m) * 60 + float(sec) >= 1, r.stdout
    assert any(
        f"Slurm job {jid}: sshd " in ln and "adopted by slurmstepd" in ln
        for ln in spool.log_text().splitlines()
    ), spool.log_text()


async def test_unreachable_slurmstepd_falls_back_to_writing_cgroups(
    cluster: Cluster, job_a: dict[str, Any]
) -> None:
    """Where the extern step's slurmstepd cannot be reached, the session's process is still
    put into the extern step's cgroups (written by the starter), and it says which way."""
    from ssh_to_job.starter import _slurm

    jid = job_a["job_id"]
    with trio.fail_after(30):
        found = await _slurm.locate(f"slurm:{jid}", job_a["batch_host"], str(cluster.conf))
    if cluster.proctrack != "proctrack/cgroup":
        pytest.skip("proctrack/linuxproc: no extern step cgroups to write")
    assert found.extern
    assert found.spool
    assert found.cgroups
    lost = attrs.evolve(found, spool=str(new_state_dir()))
    group = _slurm.SlurmGroup(lost)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        group.adopt(proc.pid)
        with trio.fail_after(10):
            await group.settle(proc.pid)
        assert group.adopted_by.startswith("cgroup write (no extern step socket"), group.adopted_by
        for d in found.cgroups:
            assert str(proc.pid) in (d / "cgroup.procs").read_text().split()
    finally:
        proc.kill()
        proc.wait()


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
            f"{BIN}/ssh-to-job",
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


def _session_with_sleep(
    pool: Pool, user: User, jid: str, marker: pathlib.Path
) -> subprocess.Popen[str]:
    """An open session into Slurm job ``jid`` whose background ``sleep`` writes its pid to
    ``marker``; the session waits for it."""
    return subprocess.Popen(
        [
            *user.prefix(),
            f"{BIN}/ssh-to-job",
            f"slurm:{jid}",
            f"sleep 1000 & echo $! > {marker}; wait",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pool.env(user),
        cwd="/tmp",
    )


def test_scancel_ends_an_open_session(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """scancel ends a session that is open in the job, and its processes with it."""
    a = users["a"]
    jid = submit(cluster, a, workdir)
    cluster.wait_running(jid)
    marker = workdir / f"pid-{jid}"
    proc = _session_with_sleep(spool, a, jid, marker)
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
    spool: Pool, users: dict[str, User], job_a: dict[str, Any], workdir: pathlib.Path
) -> None:
    """While a session is open, neither the starters nor the session's sshd listen anywhere."""
    a = users["a"]
    jid = job_a["job_id"]
    marker = workdir / f"ppid-{jid}"
    proc = subprocess.Popen(
        [*a.prefix(), f"{BIN}/ssh-to-job", f"slurm:{jid}", f"echo $PPID > {marker}; sleep 30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=spool.env(a),
        cwd="/tmp",
    )
    try:
        text = wait_for("the session", lambda: marker.read_text() if marker.exists() else "")
        session = int(text)
        # The shell's parent is sshd's session process; its parent is the sshd -i we started.
        with open(f"/proc/{session}/stat") as f:
            sshd = int(f.read().rsplit(")", 1)[1].split()[1])
        pids = {session, sshd, *spool.pids("starter")}
        listening = subprocess.run(
            ["ss", "-H", "-l", "-n", "-p", "-t", "-u", "-x", "-w"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        holders = {p for p in pids if f"pid={p}," in listening}
        assert not holders, listening
        assert len(spool.pids("starter")) >= 1
    finally:
        proc.kill()
        proc.wait()


def test_node_selection_in_a_two_node_job(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """The batch host by default; +INDEX and +NODE pick a node of the allocation, where the
    session is adopted into the job too; a node outside the job is refused."""
    a = users["a"]
    jid = submit(cluster, a, workdir, "-N", "2")
    job = cluster.wait_running(jid)
    assert job["batch_host"] == "n1"
    probe = (
        "echo $SLURMD_NODENAME $SLURM_JOB_ID $$; scontrol listpids $SLURM_JOB_ID $SLURMD_NODENAME"
    )
    env = {"SLURM_CONF": str(cluster.conf)}
    for spec, node in ((f"slurm:{jid}", "n1"), (f"slurm:{jid}+1", "n2"), (f"slurm:{jid}+n2", "n2")):
        r = spool.ssh(a, spec, f"SLURM_CONF={cluster.conf}; export SLURM_CONF; {probe}", env=env)
        assert r.returncode == 0, r.stderr
        first, *rest = r.stdout.splitlines()
        name, sjid, shell = first.split()
        assert (name, sjid) == (node, jid)
        if cluster.proctrack == "proctrack/cgroup":
            assert int(shell) in {int(line.split()[0]) for line in rest[1:]}
    refused(spool.ssh(a, f"slurm:{jid}+2", "true"), "no node 2")
    refused(spool.ssh(a, f"slurm:{jid}+elsewhere", "true"), "does not run on elsewhere")
    cluster.run(["scancel", jid])


def test_job_step_environment_cwd_pids_and_node(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """slurm:N.S enters the job with step S's environment, working directory and processes,
    on a node where S runs (not the batch host here), adopted into the job's extern step; the
    ssh-config and rsync spellings name steps too; a node outside the step, a step that never
    ran and a step that has ended are refused in one line."""
    a = users["a"]
    stepdir = workdir / "stepdir"
    stepdir.mkdir(mode=0o777, exist_ok=True)
    stepdir.chmod(0o777)
    jid = submit(
        cluster,
        a,
        workdir,
        "-N",
        "2",
        script=f"srun -N1 -w n2 --chdir={stepdir} --export=ALL,STJ_STEP=s0 sleep 300 & sleep 600",
    )
    cluster.wait_running(jid)

    def step_pids() -> set[int]:
        rows = cluster.run(["scontrol", "listpids", jid, "n2"], check=False).stdout
        return {
            int(w[0])
            for ln in rows.splitlines()[1:]
            if (w := ln.split())[2] == "0" and int(w[0]) > 0
        }

    pids0 = wait_for("step 0 on n2", step_pids)
    conf = f"SLURM_CONF={cluster.conf}"
    r = spool.ssh(
        a,
        f"slurm:{jid}.0",
        "echo $SLURMD_NODENAME $SLURM_JOB_ID $SLURM_STEP_ID $STJ_STEP; pwd; echo $SSH_TO_JOB_PIDS; "
        f"echo $$; {conf} scontrol listpids {jid}.4294967292 n2",
    )
    assert r.returncode == 0, r.stderr + spool.log_text()
    first, cwd, pids, shell, *extern = r.stdout.splitlines()
    assert first.split() == ["n2", jid, "0", "s0"]
    assert cwd == str(stepdir)
    assert {int(p) for p in pids.split()} == pids0
    if cluster.proctrack == "proctrack/cgroup":
        assert int(shell) in {int(ln.split()[0]) for ln in extern[1:]}, r.stdout
    # The same step through ssh-config's host name and rsync's "slurm-" spelling.
    cfg = pathlib.Path(a.home) / ".stj-slurm-ssh-config"
    cfg.write_text(spool.run(a, [STJ, "ssh-config"], check=True).stdout)
    r = spool.run(a, ["ssh", "-F", str(cfg), f"job-slurm-{jid}.0+n2", "echo $SLURM_STEP_ID"])
    assert r.stdout.split() == ["0"], r.stderr
    local = pathlib.Path(new_state_dir()) / "step.txt"
    local.parent.chmod(0o777)
    local.write_text("to the step\n")
    local.chmod(0o644)
    r = spool.run(a, ["rsync", "-e", "ssh-to-job", str(local), f"slurm-{jid}.0:rsync.txt"])
    assert r.returncode == 0, r.stderr
    assert (stepdir / "rsync.txt").read_text() == "to the step\n"
    shutil.rmtree(local.parent, ignore_errors=True)
    refused(spool.ssh(a, f"slurm:{jid}.0+n1", "true"), f"step {jid}.0 does not run on n1")
    refused(spool.ssh(a, f"slurm:{jid}.0+0", "true"), f"step {jid}.0 does not run on n1")
    refused(
        spool.ssh(a, f"slurm:{jid}.7", "true"),
        f"job {jid} has no running step 7 (running: 0, batch)",
    )
    cluster.run(["scancel", f"{jid}.0"])
    wait_for(
        "step 0 to end",
        lambda: f"{jid}.0 " not in cluster.run(["squeue", "-h", "-s", "-o", "%i "]).stdout,
    )
    r = spool.ssh(a, f"slurm:{jid}.0", "true")
    refused(r, f"Slurm job {jid} has no running step 0 (running: batch)")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cluster.run(["scancel", jid])


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports that are free now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_ssh_config_host_names_a_slurm_job(
    spool: Pool, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """With `stj ssh-config`'s block, plain `ssh job-slurm-N` (and job-slurm:N) enters Slurm
    job N as its user; another user's Slurm job is refused in one line."""
    a, b = users["a"], users["b"]
    jid = str(job_a["job_id"])
    cfg = pathlib.Path(a.home) / ".stj-slurm-ssh-config"
    cfg.write_text(spool.run(a, [STJ, "ssh-config"], check=True).stdout)
    for host in (f"job-slurm-{jid}", f"job-slurm:{jid}"):
        r = spool.run(a, ["ssh", "-F", str(cfg), host, "echo $SLURM_JOB_ID $(id -u)"])
        assert r.returncode == 0, r.stderr + spool.log_text()
        assert r.stdout.split() == [jid, str(a.uid)]
    cfg_b = pathlib.Path(b.home) / ".stj-slurm-ssh-config"
    cfg_b.write_text(spool.run(b, [STJ, "ssh-config"], check=True).stdout)
    r = spool.run(b, ["ssh", "-F", str(cfg_b), f"job-slurm-{jid}", "true"])
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"ssh-to-job: Slurm job {jid} belongs to {a.name}; only its owner, a Slurm operator "
        "or a queue superuser may ssh into it"
    ]


def test_local_and_remote_forwards(
    spool: Pool, users: dict[str, User], job_a: dict[str, Any]
) -> None:
    """`ssh-to-job -ssh 'ssh -L ...' slurm:N` reaches a port served inside the job, -D is a
    SOCKS proxy whose connections leave from inside the job, and -R lets the job reach a port
    served on the client's side."""
    a = users["a"]
    jid = str(job_a["job_id"])
    lport, tport, rport, sport, dport, d2port = free_ports(6)
    for forward, reach, via in (
        (f"-L 127.0.0.1:{lport}:127.0.0.1:{tport}", tport, [str(lport)]),
        (f"-D 127.0.0.1:{dport}", d2port, [str(dport), str(d2port)]),
    ):
        served = subprocess.Popen(
            [
                *a.prefix(),
                f"{BIN}/ssh-to-job",
                "-ssh",
                f"ssh -o ExitOnForwardFailure=yes {forward}",
                f"slurm:{jid}",
                shlex.join(["python3", "-c", SERVE_ONCE, str(reach), f"hello {forward}"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=spool.env(a),
            cwd="/tmp",
        )
        try:
            assert served.stdout is not None
            assert served.stdout.readline() == "ready\n"
            got = spool.run(a, [sys.executable, "-c", READ_FROM, *via])
            assert got.stdout.strip() == f"hello {forward}", got.stderr
            served.communicate(timeout=30)
            assert served.returncode == 0
        finally:
            served.kill()
            served.communicate()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_ONCE, str(sport), "hello-R"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        r = spool.ssh(
            a,
            "-ssh",
            f"ssh -o ExitOnForwardFailure=yes -R 127.0.0.1:{rport}:127.0.0.1:{sport}",
            f"slurm:{jid}",
            shlex.join(["python3", "-c", READ_FROM, str(rport)]),
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "hello-R"
    finally:
        server.kill()
        server.communicate()


def test_status_shows_how_each_slurm_starter_tracks_sessions(spool: Pool, cluster: Cluster) -> None:
    """`stj status` names each Slurm starter's session tracking, as Slurm's set-up implies:
    slurm-cgroup with proctrack/cgroup (and PrologFlags=Contain), else process-tree, adopted
    via slurmstepd (libslurm is installed here)."""
    kind = "slurm-cgroup" if cluster.proctrack == "proctrack/cgroup" else "process-tree"
    want = f"{kind} via slurmstepd"
    starters = json.loads(spool.stj(ROOT, "status", "--json").stdout)["starters"]
    got = {s["starter_id"]: s["tracking"] for s in starters if s["connected"]}
    assert got == {node: want for node in cluster.nodes}
    text = spool.stj(ROOT, "status").stdout
    for node in cluster.nodes:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"starter {node} "))
        assert f"Slurm sessions tracked by {want}" in line, text


def test_linuxproc_falls_back_to_process_tree_tracking(
    users: dict[str, User], workdir: pathlib.Path
) -> None:
    """With ProctrackType=proctrack/linuxproc Slurm has no container for sessions: `stj
    status` says process-tree, and scancel still ends the session's processes (the starter's
    pidfd watch of the job)."""
    a = users["a"]
    c = Cluster(new_state_dir() / "slurm-linuxproc", nodes=("l1",), proctrack="proctrack/linuxproc")
    pool: Pool | None = None
    proc: subprocess.Popen[str] | None = None
    try:
        c.start()
        assert c.proctrack == "proctrack/linuxproc"
        pool = Pool(
            new_state_dir(),
            f'[broker]\nslurm = true\nslurm_conf = "{c.conf}"\n'
            f'[starter]\nbackend = "slurm"\nname = "l1"\nslurm_conf = "{c.conf}"\n',
        )
        pool.start()
        starters = json.loads(pool.stj(ROOT, "status", "--json").stdout)["starters"]
        assert [s["tracking"] for s in starters] == ["process-tree via slurmstepd"]
        assert "Slurm sessions tracked by process-tree" in pool.stj(ROOT, "status").stdout
        jid = submit(c, a, workdir)
        c.wait_running(jid)
        marker = workdir / f"lp-{jid}"
        proc = _session_with_sleep(pool, a, jid, marker)
        text = wait_for("the sleep", lambda: marker.read_text().strip() if marker.exists() else "")
        pid = int(text)
        log = pool.log_text().splitlines()
        assert any(f"Slurm job {jid} (uid {a.uid}), tracked by process-tree" in ln for ln in log)
        # slurmstepd still takes the sshd among the extern step's tasks (its accounting).
        assert any(f"Slurm job {jid}: sshd " in ln and "by slurmstepd" in ln for ln in log), log
        # Slurm does not know the session's processes: ending them is the starter's doing.
        listed = c.run(["scontrol", "listpids", jid, "l1"]).stdout.splitlines()[1:]
        assert pid not in {int(ln.split()[0]) for ln in listed}
        c.run(["scancel", jid])
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        wait_for("the session's sleep to die", lambda: not os.path.exists(f"/proc/{pid}"), 15)
        assert f"Slurm job {jid} ended on this node: ending its sessions" in pool.log_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pool is not None:
            pool.stop()
            shutil.rmtree(pool.state, ignore_errors=True)
        c.stop()


def test_repeat_commands_go_through_the_first_sessions_master(
    spool: Pool, cluster: Cluster, users: dict[str, User], workdir: pathlib.Path
) -> None:
    """The first command into a Slurm job makes the master; repeats, in any spelling of the
    job, run in its session with no new session record, while another node's spelling gets a
    session of its own; another user cannot reach the master; scancel ends it and the next
    command is refused as finished."""
    from ssh_to_job.client import _mux

    a, b = users["a"], users["b"]
    mux = {"SSH_TO_JOB_MUX": "1"}
    jid = submit(cluster, a, workdir)
    cluster.wait_running(jid)
    sock = _mux.socket_path(
        pathlib.Path("/tmp") / f"ssh-to-job-{a.uid}",
        str(spool.state / "broker.sock"),
        f"slurm:{jid}",
        ("/bin/bash",),
    )

    def session(spec: str) -> str:
        r = spool.ssh(a, spec, "echo $SSH_TO_JOB_SESSION", env=mux)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip()
        return r.stdout.strip()

    def granted() -> int:
        rows = json.loads(spool.stj(a, "history", "--sessions", "--json").stdout)
        return sum(r["job"] == f"slurm:{jid}" and r["outcome"] == "granted" for r in rows)

    try:
        first = session(f"slurm:{jid}")
        assert sock.is_socket()
        n = granted()
        assert n >= 1
        for spec in (f"slurm:{jid}", f"slurm-{jid}", f"slurm:0{jid}", f"x@slurm-{jid}"):
            assert session(spec) == first
        assert granted() == n
        # The compiled front alone, beside a "Python client" that only exits 97, runs them.
        lone = pathlib.Path(f"/tmp/stj-front-slurm-{os.getpid()}")
        lone.mkdir(mode=0o755)
        try:
            shutil.copy2(BIN / "ssh-to-job", lone / "ssh-to-job")
            (lone / "ssh-to-job-py").write_text("#!/bin/sh\nexit 97\n")
            (lone / "ssh-to-job-py").chmod(0o755)
            for spec in (f"slurm-{jid}", f"slurm:{jid}"):
                argv = [str(lone / "ssh-to-job"), spec, "echo $SSH_TO_JOB_SESSION"]
                r = spool.run(a, argv, env=mux)
                assert (r.returncode, r.stdout.strip()) == (0, first), r.stderr
        finally:
            shutil.rmtree(lone)
        # +0 is the same node, but a spelling of its own: its own session (and master).
        assert session(f"slurm:{jid}+0") != first
        probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        r = spool.run(b, [sys.executable, "-c", probe, str(sock)])
        assert "PermissionError" in r.stderr, r.stderr
        refused(spool.ssh(b, f"slurm:{jid}", "true", env=mux), "belongs to")
    finally:
        cluster.run(["scancel", jid])
    wait_for("the master to end with the job", lambda: not sock.exists(), timeout=30)
    r = spool.ssh(a, f"slurm:{jid}", "true", env=mux)
    assert r.returncode == 1, r.stdout + r.stderr
    # Slurm says "completing" until the job is gone, then "cancelled".
    assert "is completing;" in r.stderr or "cancelled" in r.stderr, r.stderr
