"""Remote clients into Slurm jobs: a laptop network namespace reaches the jobs of a real Slurm
cluster through the broker's TLS port (tests/netns.py, tests/slurm.py).

The cluster host is one namespace (198.18.0.1): munged, slurmctld and a slurmd named ``r1``
run there, with the broker (``[broker] slurm``) and a Slurm-mode starter named as the node;
they are entered with ``nsenter`` so that Slurm and the starter keep the machine's cgroups
(``Host.enter``). The laptop (198.18.0.5) has nothing but ssh-to-job, OpenSSH and its users'
files: a client key registered once on the cluster host, the pool CA. One set-up serves the
module.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from conftest import ROOT, SSH_TO_JOB, STJ, User, new_state_dir, wait_for
from netns import Host, Network, Site, missing_tools
from slurm import Cluster, cgroup_v1_freezer, have_slurm

from ssh_to_job.broker import _slurm

PORT = 9622
NODE = "r1"


class NetnsCluster(Cluster):
    """The test Slurm cluster, every daemon and command inside one host's network namespace
    (its loopback carries Slurm's ports), with the machine's mounts (cgroups)."""

    def __init__(self, d: pathlib.Path, host: Host, nodes: Sequence[str]) -> None:
        super().__init__(d, nodes)
        self.netns_host = host

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        return super()._spawn(name, self.netns_host.enter(argv))

    def run(
        self,
        argv: Sequence[str],
        prefix: Sequence[str] = (),
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        return super().run(argv, self.netns_host.enter(prefix), check, env, timeout)


class SlurmSite(Site):
    """The cluster host (Slurm, broker, Slurm-mode starter) and a laptop."""

    def __init__(self, net: Network, root: pathlib.Path, users: dict[str, User]) -> None:
        super().__init__(net, root)
        self.users = users
        # The machine's own host name: slurmctld checks that it is SlurmctldHost.
        self.host = net.add_host("cluster", "198.18.0.1")
        self.laptop = net.add_host("laptop", "198.18.0.5", hostname="laptop.stj.test")
        self.pool = f"{self.host.address}:{PORT}"
        self.slurm = NetnsCluster(root / "slurm", self.host, (NODE,))
        self.workdir = root / "work"
        self.workdir.mkdir(mode=0o1777)
        self.workdir.chmod(0o1777)
        self.laptop_home: dict[str, pathlib.Path] = {}
        for name in ("a", "b"):
            u = users[name]
            d = root / f"laptop-{name}"
            d.mkdir(mode=0o700)
            os.chown(d, u.uid, u.gid)
            self.laptop_home[name] = d

    def set_up(self) -> None:
        self.slurm.start()
        conf = self.slurm.conf
        self.broker_cfg = self._config(
            "broker",
            f'[broker]\nlisten = "0.0.0.0:{PORT}"\nslurm = true\nslurm_conf = "{conf}"\n',
        )
        self.start("broker", self.host, [STJ, "broker"], self.broker_cfg, mounts=True)
        wait_for("the broker's TLS port", lambda: self.laptop.can_connect(self.host.address, PORT))
        token = self.run(self.host, ROOT, STJ, "token", "create").stdout.strip()
        cfg = self._config(
            "starter",
            f'[starter]\nbackend = "slurm"\nname = "{NODE}"\nslurm_conf = "{conf}"\n',
        )
        argv = [STJ, "starter", "--join", self.pool, "--token", token]
        self.start("starter", self.host, argv, cfg, mounts=True)

        def connected() -> bool:
            r = self.run(self.host, ROOT, STJ, "status", "--json", check=False)
            return r.returncode == 0 and any(
                s["connected"] for s in json.loads(r.stdout)["starters"]
            )

        wait_for("the Slurm-mode starter connected", connected, 30)
        for who in ("a", "b"):
            self.register(who)

    def register(self, who: str) -> None:
        """docs/user.md, "From your laptop": the laptop's client key registered on a host
        of the pool, the pool CA brought to the laptop and trusted there."""
        pub = self.on_laptop(who, STJ, "keys", "show").stdout
        self.run(self.host, self.users[who], STJ, "keys", "add", input=pub)
        ca = self.run(self.host, self.users[who], STJ, "pool-ca").stdout
        self.on_laptop(who, STJ, "pool-ca", "--trust", self.pool, "-", input=ca)

    def on_laptop(
        self, who: str, *argv: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` as ``who`` on the laptop, with their laptop files, no pool config, and a
        full session per command."""
        user = self.users[who]
        env = self.env(user, XDG_CONFIG_HOME=str(self.laptop_home[who]), SSH_TO_JOB_MUX="0")
        env["STJ_CONFIG"] = "/nonexistent/stj.toml"
        return self.run(self.laptop, user, *argv, check=check, input=input, env=env)

    def sbatch(self, who: str, *args: str, script: str = "sleep 600") -> str:
        user = self.users[who]
        return self.slurm.sbatch(
            user.prefix(),
            "-D",
            str(self.workdir),
            "-o",
            "/dev/null",
            *args,
            "--wrap",
            script,
            env={"HOME": user.home},
        )

    def close(self) -> None:
        super().close()
        self.slurm.stop()


@pytest.fixture(scope="module")
def site(users: dict[str, User]) -> Iterator[SlurmSite]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"network namespaces need {', '.join(missing)}")
    if have_slurm() is not None:
        pytest.skip(str(have_slurm()))
    root = new_state_dir()
    net = Network()
    s = SlurmSite(net, root, users)
    try:
        s.set_up()
        yield s
    finally:
        s.close()
        net.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def job(site: SlurmSite) -> dict[str, Any]:
    """A running batch job of user a, with a file to fetch and a mark in its environment."""
    jid = site.sbatch(
        "a",
        "--export=ALL,STJ_MARK=from-batch",
        script="head -c 300000 /dev/urandom > data.bin; sleep 600",
    )
    return site.slurm.wait_running(jid)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ssh-to-job: "), r.stderr
    return lines[0]


def test_laptop_session_is_the_slurm_jobs(site: SlurmSite, job: dict[str, Any]) -> None:
    """From the laptop, ssh-to-job -pool B:P slurm:N runs as the job's uid, in its cwd and its
    batch step's environment, adopted into the job; scp, sftp and rsync fetch its file; the session
    is recorded with the laptop's key and address and its bytes went through the splice relay."""
    a = site.users["a"]
    jid = str(job["job_id"])
    conf = site.slurm.conf
    r = site.on_laptop(
        "a",
        SSH_TO_JOB,
        "-pool",
        site.pool,
        f"slurm:{jid}",
        "id -u; pwd; echo $SLURM_JOB_ID; echo $STJ_MARK; echo $$; "
        f"SLURM_CONF={conf} scontrol listpids {jid} {NODE}",
    )
    uid, cwd, sjid, mark, shell, *listpids = r.stdout.splitlines()
    assert (int(uid), cwd, sjid, mark) == (a.uid, str(site.workdir), jid, "from-batch")
    # nsenter keeps the cgroups that `ip netns exec` would hide: Slurm tracks by cgroup here
    # wherever it does on the machine itself, and the session is in the job's.
    assert site.slurm.proctrack == "proctrack/cgroup" or not cgroup_v1_freezer()
    if site.slurm.proctrack == "proctrack/cgroup":
        assert int(shell) in {int(line.split()[0]) for line in listpids[1:]}, r.stdout
    out = site.root / "fetched"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    pool = ["-pool", site.pool]
    site.on_laptop(
        "a", SSH_TO_JOB, *pool, "-ssh", "scp", f"slurm:{jid}", "remote:data.bin", f"{out}/scp"
    )
    site.on_laptop(
        "a",
        SSH_TO_JOB,
        *pool,
        "-ssh",
        "sftp -b -",
        f"slurm:{jid}",
        input=f"get data.bin {out}/sftp\n",
    )
    site.on_laptop(
        "a", "rsync", "-e", shlex.join([SSH_TO_JOB, *pool]), f"slurm-{jid}:data.bin", f"{out}/rsync"
    )
    original = (site.workdir / "data.bin").read_bytes()
    assert (out / "scp").read_bytes() == original
    assert (out / "sftp").read_bytes() == original
    assert (out / "rsync").read_bytes() == original
    sessions = json.loads(site.run(site.host, a, STJ, "history", "--sessions", "--json").stdout)
    granted = [s for s in sessions if s["job"] == f"slurm:{jid}" and s["outcome"] == "granted"]
    assert len(granted) == 4
    assert {s["client_addr"] for s in granted} == {site.laptop.address}
    assert all(s["client_key"].startswith("SHA256:") for s in granted)
    assert "(spliced, not copied)" in site.log("broker").read_text()


def test_another_user_pending_and_finished_jobs_are_refused(
    site: SlurmSite, job: dict[str, Any]
) -> None:
    """From the laptop as on the cluster: a registered user who does not own the job is
    refused in one line naming its owner; a pending job says so and -auto-retry waits until
    Slurm starts it; a finished job says so."""
    jid = str(job["job_id"])
    line = _one_line(
        site.on_laptop("b", SSH_TO_JOB, "-pool", site.pool, f"slurm:{jid}", "true", check=False)
    )
    assert f"Slurm job {jid} belongs to {site.users['a'].name}" in line
    held = site.sbatch("a", "--hold")
    line = _one_line(
        site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, f"slurm:{held}", "true", check=False)
    )
    assert f"Slurm job {held} is pending" in line
    assert "-auto-retry" in line
    a = site.users["a"]
    env = site.env(a, XDG_CONFIG_HOME=str(site.laptop_home["a"]), SSH_TO_JOB_MUX="0")
    waiting = site.laptop.popen(
        [
            *a.prefix(),
            SSH_TO_JOB,
            "-pool",
            site.pool,
            "-auto-retry",
            f"slurm:{held}",
            "echo $SLURM_JOB_ID",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd="/tmp",
    )
    assert waiting.stderr is not None
    assert "is idle; waited" in waiting.stderr.readline()
    site.slurm.run(["scontrol", "release", held])
    out, err = waiting.communicate(timeout=60)
    assert (waiting.returncode, out.strip()) == (0, held), err
    site.slurm.run(["scancel", held])
    site.slurm.wait_gone(held)
    line = _one_line(
        site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, f"slurm:{held}", "true", check=False)
    )
    assert f"slurm:{held} is cancelled" in line


def test_plain_ssh_job_slurm_n_through_ssh_config(site: SlurmSite, job: dict[str, Any]) -> None:
    """With stj ssh-config -pool on the laptop, plain ssh reaches job-slurm-N (also
    job-slurm:N, +NODE and +INDEX): ssh itself checks the session's host certificate against
    the pool's @cert-authority line, so the certificate names the Slurm job's host, and
    nothing is pinned."""
    jid = str(job["job_id"])
    block = site.on_laptop("a", STJ, "ssh-config", "-pool", site.pool).stdout
    cfg = site.laptop_home["a"] / "ssh_config"
    cfg.write_text(block)
    cfg.chmod(0o644)
    hosts = (
        f"job-slurm-{jid}",
        f"job-slurm:{jid}",
        f"job-slurm-{jid}+{NODE}",
        f"job-slurm-{jid}+0",
    )
    for host in hosts:
        r = site.on_laptop("a", "ssh", "-F", str(cfg), host, "echo $SLURM_JOB_ID; pwd")
        assert r.stdout.split() == [jid, str(site.workdir)], host
    assert not (site.laptop_home["a"] / "ssh-to-job" / "known_hosts").exists()
    out = site.root / "fetched-ssh"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    site.on_laptop("a", "scp", "-F", str(cfg), f"job-slurm-{jid}:data.bin", f"{out}/scp")
    assert (out / "scp").read_bytes() == (site.workdir / "data.bin").read_bytes()


def _job(nodes: tuple[str, ...], batch: str) -> _slurm.SlurmJob:
    return _slurm.SlurmJob(1235, 1000, "u", "RUNNING", "None", batch, nodes)


def test_host_certificate_names_are_the_session_s_job_and_node_only() -> None:
    """A Slurm session's host certificate names its job as asked and as Slurm numbers it
    (array task and job id, a step with its number), bare only on the default node, and its
    own node by name and by index (lowercased too, as ssh compares): never another job or
    another node."""
    two = _job(("n1", "N2"), "n1")
    names = _slurm.host_names(_slurm.parse_target("slurm:1234_7"), two, "n1")
    assert set(names) == {
        f"job-slurm{sep}{j}{s}"
        for sep in "-:"
        for j in ("1234_7", "1235")
        for s in ("", "+n1", "+0")
    }
    names = _slurm.host_names(_slurm.parse_target("slurm-1235+1"), two, "N2")
    assert set(names) == {f"job-slurm{sep}1235+{n}" for sep in "-:" for n in ("N2", "1", "n2")}
    # A job step: its names carry the step; asked with no node, the session is on the node
    # the broker chose for the step (here not the batch host), so the bare name is valid.
    names = _slurm.host_names(_slurm.parse_target("slurm:1235.3"), two, "N2")
    assert set(names) == {
        f"job-slurm{sep}1235.3{n}" for sep in "-:" for n in ("", "+N2", "+1", "+n2")
    }
