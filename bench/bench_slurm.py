"""The Slurm phase of ``./dev bench --slurm``: three ways into one running Slurm job, one run.

``ssh-to-job slurm:N`` (a personal pool whose broker asks Slurm and whose starter is in Slurm
mode), ``srun --jobid=N --overlap``, and plain ``ssh`` into the node through
``pam_slurm_adopt`` (Debian's ``libpam-slurm-adopt``): for each, the first command of a burst
(cold), ten repeat ``true`` commands and a 1 GiB stream out of the job, interleaved round by
round so that load from elsewhere hits all three. Before timing anything it checks that each
path really lands in the job (the session's shell in ``scontrol listpids`` and in the job's
cgroup), and the report says so.

The cluster is the test suite's (tests/slurm.py ``Cluster``: private slurm.conf, munged,
slurmctld, slurmd, ``proctrack/cgroup`` with ``PrologFlags=Contain`` where the host allows).
The pam path needs a listening sshd on the node; it listens on the loopback of a network
namespace made for this phase only (``ip netns add``, removed at the end), so no port opens in
the machine's own namespace, and it runs in a private mount namespace where a directory of ours
is bind-mounted over ``/etc/pam.d`` (OpenSSH 9.2 takes its PAM service name from its program
name and has no ``PAMServiceName``; a bind mount leaves the host's /etc/pam.d untouched). The
sshd stays on this host, beside the slurmd, as pam_slurm_adopt requires.

Never: write to /etc (pam.d, slurm, ssh), signal a process it did not start (only the pids of
its own Popen objects), or leave its namespace, pool, cluster or directories behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import pwd
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from slurm import Cluster, have_slurm  # noqa: E402

Json = dict[str, Any]

#: Where Debian's libpam-slurm-adopt puts the module (usrmerge makes both paths one).
PAM_MODULES = ("/usr/lib/security/pam_slurm_adopt.so", "/lib/security/pam_slurm_adopt.so")
SSHD = "/usr/sbin/sshd"
GIB = 1 << 30
STJ = "ssh-to-job slurm:N"
SRUN = "srun --jobid=N --overlap"
PAM = "ssh + pam_slurm_adopt"
METHODS = (STJ, SRUN, PAM)
#: Not a method: ssh through ssh-to-job's master without the client in front (see measure).
MASTER = "ssh-to-job's master alone"


def pam_module() -> str | None:
    return next((p for p in PAM_MODULES if os.path.exists(p)), None)


def pam_service_file(module: str, node: str) -> str:
    """The PAM stack of the namespace's sshd: public keys only, then pam_slurm_adopt.

    ``action_adopt_failure=deny`` (the module's default is ``allow``) makes a login that could
    not be adopted fail, so no figure can come from an unadopted session; the caller-id RPC
    goes to a slurmd at the source address, which inside the namespace is nobody, so the module
    falls back to the user's only job on the node (``action_unknown=newest`` if there were
    more). ``nodename`` because several slurmd share this host's name.
    """
    return (
        "auth     required pam_deny.so\n"
        f"account  required {module} action_no_jobs=deny action_unknown=newest "
        f"action_adopt_failure=deny action_generic_failure=deny nodename={node}\n"
        "password required pam_deny.so\n"
        "session  required pam_permit.so\n"
    )


def parse_listpids(text: str) -> dict[int, str]:
    """``scontrol listpids`` output as {pid: step} (``extern``, ``batch``, ``0``...)."""
    out: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3 and f[0].isdigit():
            out[int(f[0])] = f[2]
    return out


def adoption_of(text: str, job: str) -> Json:
    """What the check command printed (its pid, its cgroups, listpids): is it in the job?"""
    lines = text.splitlines()
    pid = next((int(x[4:]) for x in lines if x.startswith("pid=") and x[4:].isdigit()), 0)
    cgroups = [x for x in lines if f"/job_{job}/" in x and x.count(":") >= 2]
    header = next((i for i, x in enumerate(lines) if x.split()[:2] == ["PID", "JOBID"]), None)
    steps = parse_listpids("\n".join(lines[header:])) if header is not None else {}
    step = steps.get(pid, "")
    return {
        "pid": pid,
        "step": step,
        "cgroup": cgroups[0].split(":", 2)[2] if cgroups else "",
        "in_job": bool(step) and bool(cgroups),
        "extern": step == "extern" and any("/step_extern" in c for c in cgroups),
    }


def _summary(xs: Sequence[float]) -> Json:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {
        "n": len(s),
        "median": statistics.median(s),
        "p25": q[0],
        "p75": q[2],
        "min": s[0],
        "max": s[-1],
    }


class SlurmRig:
    """The cluster, the job, the Slurm pool and the namespace's sshd, for one bench run."""

    def __init__(
        self,
        d: pathlib.Path,
        user: pwd.struct_passwd,
        tok: str,
        bindir: pathlib.Path,
        client_options: dict[str, str],
        log: Callable[[str], None],
    ) -> None:
        self.d = d
        self.user = user
        self.tok = tok
        self.bin = bindir
        self.client_options = client_options
        self.log = log
        # A node name of our own: its cgroups (slurm_<node>) and the starter's name cannot
        # collide with another cluster or pool on this host.
        self.node = f"stjb{tok}"
        self.cluster = Cluster(d / "cluster", nodes=[self.node])
        self.pool_dir = d / "pool"
        self.pam_dir = d / "pam"
        self.netns = f"stjb-{tok}"
        self.netns_made = False
        self.port = 2222
        self.pool: subprocess.Popen[bytes] | None = None
        self.sshd: subprocess.Popen[bytes] | None = None
        self.job = ""
        self.version = ""
        self.methods: tuple[str, ...] = METHODS
        self.pam_unavailable = ""

    # -- set-up

    def start(self) -> str | None:
        """Bring everything up; return why it cannot run here, or None."""
        why = have_slurm()
        if why:
            return why
        self.d.mkdir(mode=0o755, parents=True)
        self.d.chmod(0o755)
        self.cluster.start()
        self.version = "Slurm " + self.cluster.run(["sinfo", "-V"]).stdout.strip().split()[-1]
        self.log(f"  Slurm cluster up ({self.cluster.proctrack}), node {self.node}")
        self._start_pool()
        prefix = self.as_user([])
        self.job = self.cluster.sbatch(
            prefix, "-D", "/tmp", "-o", "/dev/null", "--wrap", "sleep 7200"
        )
        self.cluster.wait_running(self.job)
        # The other two paths are measured even where the pam one cannot be set up.
        module = pam_module()
        missing = [t for t in ("ip", "nsenter", "unshare", "mount") if not shutil.which(t)]
        if module is None:
            self.pam_unavailable = "pam_slurm_adopt.so is missing (libpam-slurm-adopt)"
        elif missing:
            self.pam_unavailable = f"{', '.join(missing)} missing"
        else:
            try:
                self._start_pam_sshd(module)
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                self.pam_unavailable = f"the namespace's sshd could not be set up: {exc}"
        if self.pam_unavailable:
            self.log(f"  {PAM} not measured: {self.pam_unavailable}")
            self.methods = (STJ, SRUN)
        return None

    def as_user(self, argv: Sequence[str]) -> list[str]:
        pw = self.user
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *argv]

    def _start_pool(self) -> None:
        self.pool_dir.mkdir(mode=0o755)
        conf = self.cluster.conf
        (self.pool_dir / "config.toml").write_text(
            f'[broker]\nslurm = true\nslurm_conf = "{conf}"\n'
            f'[starter]\nbackend = "slurm"\nname = "{self.node}"\nslurm_conf = "{conf}"\n'
        )
        env = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "STJ_STATE_DIR": str(self.pool_dir),
            "STJ_CONFIG": str(self.pool_dir / "config.toml"),
            "LANG": "C.UTF-8",
            "HOME": "/root",
        }
        with open(self.pool_dir / "pool.log", "ab") as log:
            self.pool = subprocess.Popen(
                [str(self.bin / "stj"), "pool", "--state-dir", str(self.pool_dir)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd="/tmp",
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(
                [str(self.bin / "stj"), "status", "--json"], capture_output=True, text=True, env=env
            )
            if r.returncode == 0 and any(s["connected"] for s in json.loads(r.stdout)["starters"]):
                return
            if time.monotonic() > deadline or self.pool.poll() is not None:
                tail = (self.pool_dir / "pool.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"the Slurm pool's starter did not connect:\n{tail}")
            time.sleep(0.2)

    def _keygen(self, name: str) -> str:
        path = self.pam_dir / name
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True
        )
        return (self.pam_dir / f"{name}.pub").read_text().strip()

    def _start_pam_sshd(self, module: str) -> None:
        p = self.pam_dir
        p.mkdir(mode=0o755)
        (p / "pam.d").mkdir(mode=0o755)
        (p / "pam.d" / "sshd").write_text(pam_service_file(module, self.node))
        host_pub = self._keygen("host_key")
        # The user's throw-away key: made here, owned by the bench user, gone with the run.
        user_pub = self._keygen("id")
        os.chown(p / "id", self.user.pw_uid, self.user.pw_gid)
        (p / "authorized_keys").write_text(user_pub + "\n")
        (p / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        # StrictModes no: the key files sit under /tmp, which sshd's path check refuses.
        (p / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {p}/host_key
UsePAM yes
PidFile none
StrictModes no
AuthorizedKeysFile {p}/authorized_keys
AllowUsers {self.user.pw_name}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
        extra = "".join(f"  {k} {v}\n" for k, v in self.client_options.items())
        # The client side as ssh-to-job's own generated config has it (same Ciphers line).
        (p / "ssh_config").write_text(f"""\
Host node
  HostName 127.0.0.1
  Port {self.port}
  User {self.user.pw_name}
  UserKnownHostsFile "{p}/known_hosts"
  GlobalKnownHostsFile "{p}/known_hosts"
  StrictHostKeyChecking yes
  CheckHostIP no
  UpdateHostKeys no
  IdentityFile "{p}/id"
  IdentitiesOnly yes
  IdentityAgent none
  PreferredAuthentications publickey
  BatchMode yes
  ControlMaster no
  ControlPath none
  LogLevel ERROR
{extra}""")
        for f in ("ssh_config", "known_hosts", "id.pub"):
            os.chown(p / f, self.user.pw_uid, self.user.pw_gid)
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self.netns_made = True
        subprocess.run(
            ["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        # unshare execs sh, sh execs nsenter, nsenter (net only, no --fork) execs sshd: the
        # Popen's pid is sshd's own, which is the only pid we signal.
        script = 'mount --bind "$1" /etc/pam.d && exec nsenter --net="$2" "$3" -D -e -f "$4"'
        with open(p / "sshd.log", "ab") as log:
            self.sshd = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "sh",
                    str(p / "pam.d"),
                    f"/run/netns/{self.netns}",
                    SSHD,
                    str(p / "sshd_config"),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                # pam_slurm_adopt runs inside sshd and finds the cluster through this.
                env={**self.cluster.env(), "SLURM_CONF": str(self.cluster.conf)},
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while "Server listening" not in (p / "sshd.log").read_text(errors="replace"):
            if time.monotonic() > deadline or self.sshd.poll() is not None:
                raise RuntimeError(
                    "the namespace's sshd did not start: "
                    + (p / "sshd.log").read_text(errors="replace")[-800:]
                )
            time.sleep(0.05)

    # -- the three paths

    def in_netns(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def argv(self, method: str, command: str, shell: bool = False) -> list[str]:
        """``command`` through ``method``; ssh runs it with the login shell, srun without a
        shell unless ``shell`` (the timed commands are plain argv words)."""
        if method == STJ:
            return [str(self.bin / "ssh-to-job"), f"slurm:{self.job}", command]
        if method == SRUN:
            words = ["/bin/sh", "-c", command] if shell else shlex.split(command)
            return ["srun", f"--jobid={self.job}", "--overlap", *words]
        return ["ssh", "-F", str(self.pam_dir / "ssh_config"), "node", command]

    def env(self, method: str) -> dict[str, str]:
        if method == STJ:
            # As shipped: the first command of a burst is a full session whose ssh stays as
            # the job's ControlMaster, and the next ones go through it.
            return {
                "STJ_STATE_DIR": str(self.pool_dir),
                "STJ_CONFIG": str(self.pool_dir / "config.toml"),
                "SSH_TO_JOB_MUX": "1",
            }
        if method == SRUN:
            return {"SLURM_CONF": str(self.cluster.conf)}
        return {}

    def check_command(self) -> str:
        return (
            "echo pid=$$; cat /proc/$$/cgroup; "
            f"SLURM_CONF={self.cluster.conf} scontrol listpids {self.job} {self.node}"
        )

    def master_socket(self) -> pathlib.Path:
        """Where the bench user's ssh-to-job master for the Slurm job listens (client/_mux)."""
        from ssh_to_job.client import _mux

        base = pathlib.Path("/tmp") / f"ssh-to-job-{self.user.pw_uid}"
        return _mux.socket_path(
            base, str(self.pool_dir / "broker.sock"), f"slurm:{self.job}", ("/bin/bash",)
        )

    def master_argv(self, command: str) -> list[str]:
        """``command`` through the live master alone, as client/_mux's fast path runs a
        repeat (which today takes native job ids only: see measure)."""
        from ssh_to_job.client import _mux

        return _mux.command_argv(["ssh"], _mux.config_path(self.master_socket()), [command])

    def end_master(self) -> None:
        """Stop the bench user's ssh-to-job master for the Slurm job, so a burst starts cold."""
        sock = self.master_socket()
        if sock.exists():
            subprocess.run(
                self.as_user(["ssh", "-F", "none", "-S", str(sock), "-O", "exit", "x"]),
                capture_output=True,
                timeout=20,
                check=False,
            )
            deadline = time.monotonic() + 10
            while sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    # -- tear-down

    def stop(self) -> None:
        try:
            if self.job:
                self.end_master()
        except (OSError, subprocess.SubprocessError, ImportError):
            pass
        for proc in (self.sshd, self.pool):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.sshd = self.pool = None
        if self.netns_made:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
            self.netns_made = False
        self.cluster.stop()
        # slurmd leaves its empty per-node cgroups (slurm_<node>) behind; the node's name is
        # this run's own, so they are ours to remove (rmdir takes only empty ones).
        for top in pathlib.Path("/sys/fs/cgroup").glob(f"*/slurm_{self.node}"):
            for sub in sorted(top.rglob("*"), key=lambda x: -len(x.parts)):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


Worker = Callable[[Json, dict[str, str], list[str]], Json]


def measure(rig: SlurmRig, worker: Worker, rounds: int, stream_reps: int, size: int) -> Json:
    """The phase's figures. ``worker(args, env, prefix)`` runs bench_worker's ``times`` mode
    as the bench user, behind ``prefix`` (the namespace's ``nsenter`` for the pam path)."""
    out: Json = {
        "version": rig.version,
        "proctrack": rig.cluster.proctrack,
        "node": rig.node,
        "job": rig.job,
        "rounds": rounds,
        "stream_bytes": size,
        "pam_sshd": ""
        if rig.pam_unavailable
        else f"sshd on 127.0.0.1:{rig.port} in network namespace {rig.netns}",
        "pam_unavailable": rig.pam_unavailable,
    }
    methods = rig.methods
    k = len(methods)

    def prefix(m: str) -> list[str]:
        return rig.in_netns([]) if m == PAM else []

    # Does each path land in the job? One full session each (no master), outside the timing.
    adoption: Json = {}
    outdir = rig.d / "check"
    outdir.mkdir(mode=0o700)
    os.chown(outdir, rig.user.pw_uid, rig.user.pw_gid)
    for i, m in enumerate(methods):
        dest = outdir / f"{i}.out"
        cmd = {
            "argv": rig.argv(m, rig.check_command(), shell=True),
            "stdout": str(dest),
            "timeout": 60,
        }
        env = {**rig.env(m), "SSH_TO_JOB_MUX": "0"}
        r = worker({"cmds": {m: cmd}, "reps": 1}, env, prefix(m))["runs"][m][0]
        text = dest.read_text(errors="replace") if dest.exists() else ""
        rec = adoption_of(text, rig.job)
        if r["rc"] != 0:
            rec["error"] = r["stderr"].strip()[-300:]
        adoption[m] = rec
    out["adoption"] = adoption

    rig.log("  adoption: " + ", ".join(f"{m} {a.get('step') or '-'}" for m, a in adoption.items()))
    per: dict[str, Json] = {
        m: {"first": [], "repeat": [], "ten": [], "fail": []} for m in (*methods, MASTER)
    }
    for rnd in range(rounds):
        order = methods[rnd % k :] + methods[: rnd % k]
        for m in order:
            if m == STJ:
                rig.end_master()
            cmds = {m: {"argv": rig.argv(m, "true"), "timeout": 60}}
            runs = worker({"cmds": cmds, "reps": 11}, rig.env(m), prefix(m))["runs"][m]
            ok = [r["wall"] for r in runs if r["rc"] == 0]
            per[m]["fail"].extend(r["stderr"].strip()[-200:] for r in runs if r["rc"] != 0)
            if len(ok) == len(runs):
                per[m]["first"].append(ok[0])
                per[m]["repeat"].extend(ok[1:])
                per[m]["ten"].append(sum(ok[1:]))
            if m == STJ and rig.master_socket().exists():
                # client/_mux's fast path recognises only native ids (cluster.proc), so a
                # `slurm:N` repeat starts the whole Python client before it finds the master:
                # the same ten commands through the master alone show what that costs.
                cmds = {MASTER: {"argv": rig.master_argv("true"), "timeout": 60}}
                runs = worker({"cmds": cmds, "reps": 10}, {}, [])["runs"][MASTER]
                per[MASTER]["fail"].extend(r["stderr"].strip()[-200:] for r in runs if r["rc"] != 0)
                ok = [r["wall"] for r in runs if r["rc"] == 0]
                per[MASTER]["repeat"].extend(ok)
                if len(ok) == len(runs):
                    per[MASTER]["ten"].append(sum(ok))
        rig.log(f"  round {rnd + 1}/{rounds} of cold + ten repeats done")
    rig.end_master()
    streams: dict[str, list[float]] = {m: [] for m in methods}
    stream_fail: dict[str, list[str]] = {m: [] for m in methods}
    command = f"head -c {size} /dev/zero"
    for rep in range(stream_reps):
        for m in methods[rep % k :] + methods[: rep % k]:
            # Full sessions: a stream through the master would be a different path.
            cmds = {m: {"argv": rig.argv(m, command), "timeout": 600}}
            env = {**rig.env(m), "SSH_TO_JOB_MUX": "0"}
            r = worker({"cmds": cmds, "reps": 1}, env, prefix(m))["runs"][m][0]
            if r["rc"] == 0:
                streams[m].append(size / (1 << 20) / r["wall"])
            else:
                stream_fail[m].append(r["stderr"].strip()[-200:])
        rig.log(f"  stream {rep + 1}/{stream_reps} done")
    out["master_alone"] = {
        "repeat": _summary(per[MASTER]["repeat"]),
        "ten_in_a_row": _summary(per[MASTER]["ten"]),
        "failed": len(per[MASTER]["fail"]),
        "errors": sorted(set(per[MASTER]["fail"]))[:2],
    }
    out["methods"] = {
        m: {
            "first": _summary(per[m]["first"]),
            "repeat": _summary(per[m]["repeat"]),
            "ten_in_a_row": _summary(per[m]["ten"]),
            "failed": len(per[m]["fail"]),
            "errors": sorted(set(per[m]["fail"]))[:2],
            "stream_mib_s": _summary(streams[m]),
            "stream_failed": len(stream_fail[m]),
            "stream_errors": sorted(set(stream_fail[m]))[:2],
        }
        for m in methods
    }
    # The targets table (bench_report.targets) compares repeat commands with srun from here.
    srun_all = per[SRUN]["first"] + per[SRUN]["repeat"]
    out["times"] = {"srun --overlap true": {"wall": _summary(srun_all)}}
    return out
