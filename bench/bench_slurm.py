"""A throw-away one-node Slurm cluster on localhost, for ``./dev bench --slurm``.

Installs Debian's slurm-wlm and munge when missing, writes a private slurm.conf (reached through
``SLURM_CONF``, so /etc/slurm is never touched), starts munged (unless one already answers),
slurmctld and slurmd in the foreground as our own children, and stops exactly those. Every step
that cannot work here returns the reason as text instead of a number: the report says why.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

PACKAGES = ("slurm-wlm", "munge")


def _run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, **kw)


class Slurm:
    def __init__(
        self, d: pathlib.Path, user: pwd.struct_passwd, log: Callable[[str], None]
    ) -> None:
        self.d = d
        self.user = user
        self.log = log
        self.conf = d / "slurm.conf"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.jobid = ""
        self.version = ""
        self.node = socket.gethostname().split(".")[0]

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    # -- set-up

    def _install(self) -> str | None:
        def installed(p: str) -> bool:
            return "ok installed" in _run(["dpkg-query", "-W", "-f=${Status}", p]).stdout

        missing = [p for p in ("slurmctld", "slurmd", "slurm-client", "munge") if not installed(p)]
        if not missing:
            return None
        self.log(f"  installing {' '.join(PACKAGES)} (missing: {' '.join(missing)})")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            timeout=600,
            env=env,
        )
        if r.returncode != 0:
            _run(["apt-get", "update", "-qq"], timeout=300, env=env)
            r = _run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                timeout=600,
                env=env,
            )
        if r.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-300:]}"
        return None

    def _munge(self) -> str | None:
        def works() -> bool:
            try:
                cred = _run(["munge", "-n"], timeout=10)
                return (
                    cred.returncode == 0
                    and _run(["unmunge"], input=cred.stdout, timeout=10).returncode == 0
                )
            except (OSError, subprocess.TimeoutExpired):
                return False

        if works():
            return None  # someone's munged already answers; share it
        key = pathlib.Path("/etc/munge/munge.key")
        try:
            mpw = pwd.getpwnam("munge")
        except KeyError:
            return "the munge package created no munge user"
        if not key.exists():
            r = _run(["mungekey", "--create", "--keyfile", str(key)])
            if r.returncode != 0:
                return f"mungekey failed: {r.stderr.strip()}"
            os.chown(key, mpw.pw_uid, mpw.pw_gid)
            key.chmod(0o600)
        for dname in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            p = pathlib.Path(dname)
            p.mkdir(exist_ok=True)
            os.chown(p, mpw.pw_uid, mpw.pw_gid)
        log = open(self.d / "munged.log", "ab")
        self.procs.append(
            subprocess.Popen(
                [
                    "setpriv",
                    f"--reuid={mpw.pw_uid}",
                    f"--regid={mpw.pw_gid}",
                    "--init-groups",
                    "/usr/sbin/munged",
                    "--foreground",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        log.close()
        for _ in range(50):
            if works():
                return None
            time.sleep(0.1)
        return "munged did not start: " + (self.d / "munged.log").read_text(errors="replace")[-300:]

    def _write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        with open("/proc/meminfo") as f:
            mem_mb = int(f.readline().split()[1]) // 1024
        base = 20000 + secrets.randbelow(20000)
        for sub in ("ctld", "spool"):
            (self.d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=stjbench
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={base}
SlurmdPort={base + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.d}/ctld
SlurmdSpoolDir={self.d}/spool
SlurmctldPidFile={self.d}/slurmctld.pid
SlurmdPidFile={self.d}/slurmd.pid
SlurmctldLogFile={self.d}/slurmctld.log
SlurmdLogFile={self.d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb // 2} State=UNKNOWN
PartitionName=bench Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self.conf.chmod(0o644)
        self.d.chmod(0o755)

    def start(self) -> str | None:
        """Bring the cluster up; return why it cannot run, or None."""
        self.d.mkdir(parents=True, exist_ok=True)
        for step in (self._install, self._munge):
            why = step()
            if why:
                return why
        pkg = _run(["dpkg-query", "-W", "-f=${Version}", "slurm-client"]).stdout.strip()
        self.version = f"Slurm {pkg} (Debian slurm-wlm)"
        self._write_conf()
        env = {**os.environ, **self.env()}
        for argv in (
            ["slurmctld", "-D", "-f", str(self.conf)],
            ["slurmd", "-D", "-f", str(self.conf), "-N", self.node],
        ):
            log = open(self.d / f"{argv[0]}.out", "ab")
            self.procs.append(
                subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=log,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            log.close()
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs[-2:]):
                break
            state = _run(["sinfo", "-h", "-o", "%T"], env=env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return None
            time.sleep(0.5)
        tails = "; ".join(
            f"{n}: {(self.d / n).read_text(errors='replace').strip()[-300:]}"
            for n in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log")
            if (self.d / n).exists()
        )
        return f"the one-node cluster did not come up (node state {state!r}); {tails}"

    def submit_sleep(self) -> str:
        """A running batch job owned by the bench user, for ``srun --jobid --overlap``."""
        env = {**os.environ, **self.env(), "HOME": self.user.pw_dir}
        r = _run(
            [
                "setpriv",
                f"--reuid={self.user.pw_uid}",
                f"--regid={self.user.pw_gid}",
                "--init-groups",
                "sbatch",
                "--parsable",
                "-o",
                "/dev/null",
                "-D",
                "/tmp",
                "--wrap",
                "sleep 1800",
            ],
            env=env,
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr.strip()}")
        self.jobid = r.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = _run(["squeue", "-h", "-j", self.jobid, "-o", "%T"], env=env).stdout.strip()
            if st == "RUNNING":
                return self.jobid
            time.sleep(0.3)
        raise RuntimeError(f"Slurm job {self.jobid} did not start (state {st!r})")

    def stop(self) -> None:
        if self.jobid:
            _run(["scancel", self.jobid], env={**os.environ, **self.env()})
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        shutil.rmtree(self.d, ignore_errors=True)
