"""A real one-node Slurm cluster for the Slurm tests, started and stopped by the test run.

Debian's ``slurm-wlm`` and ``munge`` (``./dev`` installs them) run from a temporary directory:
a private ``slurm.conf`` reached through ``SLURM_CONF`` (``/etc/slurm`` is never read), a
private ``munged`` with its own key and socket (clients find it through ``AuthInfo=socket=``),
``slurmctld -D`` and ``slurmd -D`` as our own children on high loopback ports. Only those pids
are ever signalled. Process tracking is ``proctrack/cgroup`` where the host's cgroups let Slurm
use it (cgroup v1 controllers, as on this hybrid-hierarchy container), else
``proctrack/linuxproc``; ``Cluster.proctrack`` says which one came up. A test may ask for one
(``proctrack=``), for Slurm's accounting (``jobacct=``) or for no extern steps
(``contain=False``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

MUNGED = "/usr/sbin/munged"


def have_slurm() -> str | None:
    """Why this host cannot run the Slurm tests, or None if it can."""
    for tool in (MUNGED, "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (./dev setup installs slurm-wlm and munge)"
    return None


def _free_ports(n: int) -> int:
    """A base port with ``n`` free consecutive ports above it, in the high range."""
    for _ in range(50):
        base = 31000 + secrets.randbelow(25000)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range for Slurm")


def cgroup_v1_freezer() -> bool:
    """Whether Slurm's cgroup/v1 plugin can track processes here (a freezer hierarchy)."""
    try:
        mounts = pathlib.Path("/proc/self/mounts").read_text().split("\n")
    except OSError:
        return False
    return any(
        len(f := m.split()) > 3 and f[2] == "cgroup" and "freezer" in f[3].split(",")
        for m in mounts
    )


class Cluster:
    """One controller and one (or more, with ``nodes``) slurmd on this host."""

    def __init__(
        self,
        d: pathlib.Path,
        nodes: Sequence[str] = (),
        proctrack: str = "",
        jobacct: str = "jobacct_gather/none",
        contain: bool = True,
    ) -> None:
        self.d = d
        #: The ProctrackType asked for ("": cgroup where possible, else linuxproc).
        self.want_proctrack = proctrack
        self.jobacct = jobacct
        self.contain = contain
        self.host = socket.gethostname().split(".")[0]
        self.nodes = list(nodes) or [self.host]
        self.conf = d / "slurm.conf"
        self.munge_socket = d / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.proctrack = ""

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "SLURM_CONF": str(self.conf),
            "LANG": "C.UTF-8",
        }
        env.update(extra or {})
        return env

    # -- start

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.d / f"{name}.out", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(mode=0o755)
        key = self.d / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        state = self.d / "munge-state"
        state.mkdir(mode=0o700)
        self._spawn(
            "munged",
            [
                MUNGED,
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={state}/munged.log",
                f"--pid-file={state}/munged.pid",
                f"--seed-file={state}/munged.seed",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start: {self.tail('munged.out')}")
            time.sleep(0.02)

    def _write_conf(self, proctrack: str, base: int) -> None:
        cpus = os.cpu_count() or 1
        with open("/proc/meminfo") as f:
            mem_mb = int(f.readline().split()[1]) // 1024
        node_lines = []
        for i, node in enumerate(self.nodes):
            # Several slurmd on one host (Debian builds with --enable-multiple-slurmd): each
            # has its own name and port; they share this host's address.
            node_lines.append(
                f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 "
                f"Port={base + 2 + i} CPUs={cpus} RealMemory={mem_mb // (2 * len(self.nodes))} "
                "State=UNKNOWN"
            )
        task = "task/cgroup" if proctrack == "proctrack/cgroup" else "task/none"
        self.conf.write_text(
            f"""\
ClusterName=stjtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={base}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.d}/ctld
SlurmdSpoolDir={self.d}/spool-%n
SlurmctldPidFile={self.d}/slurmctld.pid
SlurmdPidFile={self.d}/slurmd-%n.pid
SlurmctldLogFile={self.d}/slurmctld.log
SlurmdLogFile={self.d}/slurmd-%n.log
ProctrackType={proctrack}
TaskPlugin={task}
{"PrologFlags=Contain" if self.contain else ""}
JobAcctGatherType={self.jobacct}
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=2
{chr(10).join(node_lines)}
PartitionName=test Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP \
 OverSubscribe=FORCE:4
"""
        )
        (self.d / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n"
            "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
        )

    def start(self) -> None:
        self.d.mkdir(parents=True, exist_ok=True)
        self.d.chmod(0o755)
        (self.d / "ctld").mkdir(exist_ok=True)
        self._start_munge()
        base = _free_ports(2 + len(self.nodes))
        tries = ["proctrack/cgroup", "proctrack/linuxproc"]
        if not cgroup_v1_freezer():
            tries = tries[1:]
        if self.want_proctrack:
            tries = [self.want_proctrack]
        why = ""
        for proctrack in tries:
            self._write_conf(proctrack, base)
            why = self._start_daemons()
            if not why:
                self.proctrack = proctrack
                return
            self._stop_daemons()
            shutil.rmtree(self.d / "ctld", ignore_errors=True)
            (self.d / "ctld").mkdir()
        raise RuntimeError(f"the test Slurm cluster did not come up: {why}")

    def _start_daemons(self) -> str:
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["/usr/sbin/slurmd", "-D", "-N", node])
        deadline = time.monotonic() + 30
        states: list[str] = []
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                return f"{dead} exited: " + " | ".join(self.tail(f"{n}.out") for n in dead)
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            states = r.stdout.split()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states):
                return ""
            time.sleep(0.2)
        return f"nodes not idle within 30 s ({states}): {self.tail('slurmctld.log')}"

    # -- use

    def run(
        self,
        argv: Sequence[str],
        prefix: Sequence[str] = (),
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*prefix, *argv],
            capture_output=True,
            text=True,
            env=self.env(env),
            timeout=timeout,
            check=False,
            cwd="/tmp",
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr}")
        return r

    def sbatch(self, prefix: Sequence[str], *args: str, env: dict[str, str] | None = None) -> str:
        """Submit as the user ``prefix`` switches to; the job id (``1234``, ``1234_7``...)."""
        r = self.run(["sbatch", "--parsable", *args], prefix=prefix, env=env)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, Any]:
        """``squeue --json`` of one job ({} once Slurm has forgotten it)."""
        r = self.run(["squeue", "--json", f"--jobs={job_id}"], check=False)
        try:
            jobs = json.loads(r.stdout).get("jobs", [])
        except ValueError:
            return {}
        # Debian's 22.05 squeue --json ignores --jobs and lists every job: pick ours.
        for j in jobs:
            names = {str(j["job_id"]), f"{j.get('array_job_id')}_{j.get('array_task_id')}"}
            if job_id in names:
                return dict(j)
        return {}

    def wait_running(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """Wait until the job runs and its batch script is up on its node."""
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("job_state") == "RUNNING":
                jid = str(job["job_id"])
                node = str(job.get("batch_host") or self.nodes[0])
                pids = self.run(["scontrol", "listpids", jid, node], check=False).stdout
                if any(line.split()[2:4] == ["batch", "0"] for line in pids.splitlines()[1:]):
                    return job
            time.sleep(0.1)
        raise AssertionError(
            f"Slurm job {job_id} did not start: {job}\n{self.tail('slurmctld.log')}"
        )

    def wait_gone(self, job_id: str, timeout: float = 30) -> str:
        """Wait until the job has ended; its final state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = str(self.job(job_id).get("job_state", ""))
            if state not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING"):
                return state
            time.sleep(0.1)
        raise AssertionError(f"Slurm job {job_id} is still {state}")

    def tail(self, name: str, n: int = 1500) -> str:
        try:
            return (self.d / name).read_text(errors="replace")[-n:]
        except OSError:
            return f"({name} missing)"

    # -- stop

    def _stop_daemons(self) -> None:
        for name in [n for n in self.procs if n != "munged"][::-1]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                for line in self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                    self.run(["scancel", line], check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if not self.run(["squeue", "-h", "-o", "%i %T"], check=False).stdout.strip():
                        break
                    time.sleep(0.2)
        self._stop_daemons()
        munged = self.procs.pop("munged", None)
        if munged is not None and munged.poll() is None:
            munged.send_signal(signal.SIGTERM)
            try:
                munged.wait(10)
            except subprocess.TimeoutExpired:
                munged.kill()
                munged.wait()
        shutil.rmtree(self.d, ignore_errors=True)
