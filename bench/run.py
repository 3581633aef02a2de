"""``./dev bench``: ssh-to-job against plain OpenSSH, in one run, on this machine.

Runs as root. Makes a non-root bench user, a personal pool in a fresh /tmp state directory, and
the *floor*: plain ``ssh`` with ``ProxyCommand /usr/sbin/sshd -i -f <config>`` as the same
user, with the same key types, key exchange (OpenSSH's default) and cipher preference as the
product's generated configs. Every timing is taken by ``bench_worker.py`` running as that user,
with the product and the floor interleaved so that noise from other load hits both. Writes
``<out>/<timestamp>.json`` (every raw figure) and ``<out>/<timestamp>.md`` (the tables).

It must never touch processes it did not start (other pools may be running on this machine),
and it removes what it made: the pool, its state directory, the data files, the Slurm daemons.
docs/performance.md explains the method and the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import pwd
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ssh_to_job.starter._session import sshd_config

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
#: The venv whose product we measure (the one running us: ./dev bench uses $VENV/bin/python).
VENV = pathlib.Path(sys.executable).parent.parent
USER = "stjbench"
SSHD = "/usr/sbin/sshd"
#: The product's client preference (client/ssh_to_job.py); read from the product when possible.
DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
    "aes128-ctr,aes256-ctr"
)
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Slurm's figure from shared/openssh-notes.md, used when --slurm is not given.
SRUN_NOTES_MS = 34.0

Json = dict[str, Any]


# ---------------------------------------------------------------------------- small helpers


def summary(xs: Sequence[float]) -> Json:
    """Median and spread of a sample (quartiles by linear interpolation)."""
    if not xs:
        return {"n": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {
        "n": len(s),
        "median": statistics.median(s),
        "p25": q(0.25),
        "p75": q(0.75),
        "p99": q(0.99),
        "min": s[0],
        "max": s[-1],
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> Json:
    """Run i of the product over run i of the floor (they ran back to back)."""
    return summary([x / y for x, y in zip(a, b, strict=False) if y > 0])


def zeros(path: pathlib.Path, mib: int) -> list[str]:
    """A command that writes ``mib`` MiB of zeros to ``path``."""
    return ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "status=none"]


def cpu_busy(window: float = 1.0) -> float:
    """The machine's busy share of all cores over ``window`` seconds, from /proc/stat."""

    def sample() -> tuple[int, int]:
        f = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
        return sum(f), idle

    t0, i0 = sample()
    time.sleep(window)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


def settle(limit: float = 90.0, quiet: float = 0.15) -> tuple[float, float]:
    """Wait (up to ``limit`` s) until two 1-second windows in a row are under ``quiet`` busy;
    (seconds waited, the busy share of the last window)."""
    t0 = time.monotonic()
    calm = 0
    busy = cpu_busy()
    while time.monotonic() - t0 < limit:
        calm = calm + 1 if busy < quiet else 0
        if calm >= 2:
            break
        busy = cpu_busy()
    return time.monotonic() - t0, busy


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) in seconds, from /proc/<pid>/stat."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return (0.0, 0.0)
    f = text.rsplit(")", 1)[1].split()
    # fields after the comm: state is f[0], so utime (14th field) is f[11]
    return ((int(f[11]) + int(f[12])) / CLK_TCK, (int(f[13]) + int(f[14])) / CLK_TCK)


def proc_mem(pid: int) -> Json:
    """VmRSS and VmHWM (peak RSS since start or the last reset) in MiB."""
    out: Json = {}
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs; root only)."""
    try:
        pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def sh(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)


def first_line(argv: Sequence[str], stream: str = "stdout") -> str:
    try:
        r = sh(argv, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (r.stdout if stream == "stdout" else r.stderr) or r.stdout or r.stderr
    return text.strip().splitlines()[0] if text.strip() else ""


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.quick: bool = a.quick
        self.tok = secrets.token_hex(4)
        self.state = pathlib.Path(f"/tmp/stjb-{self.tok}")
        self.floor = self.state / "floor"
        self.data = pathlib.Path(f"/dev/shm/stjb-{self.tok}")
        self.pool: subprocess.Popen[bytes] | None = None
        self.broker_pid = 0
        self.starter_pid = 0
        self.job = ""
        self.jobs20: list[str] = []
        self.idle_job = ""
        self.results: Json = {"phases": {}, "errors": {}}
        self.t_start = time.monotonic()
        self.pw: pwd.struct_passwd | None = None
        self.size = (256 if self.quick else 1024) * MIB
        self.slurm: Any = None
        self.bin = VENV / "bin"

    # -- running things as the bench user

    @property
    def user(self) -> pwd.struct_passwd:
        assert self.pw is not None
        return self.pw

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "STJ_STATE_DIR": str(self.state),
            "STJ_CONFIG": str(self.state / "config.toml"),
            "HOME": self.user.pw_dir,
            "USER": USER,
            "LOGNAME": USER,
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
            "TMPDIR": "/tmp",
            # Cold sessions everywhere but in the repeat phase, which turns the master on.
            "SSH_TO_JOB_MUX": "0",
        }

    def as_user(self, argv: Sequence[str]) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.user.pw_uid}",
            f"--regid={self.user.pw_gid}",
            "--init-groups",
            *argv,
        ]

    def run_user(
        self, argv: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return sh(
            self.as_user(argv), env={**self.env(), **(env or {})}, cwd="/tmp", timeout=timeout
        )

    def worker(
        self, mode: str, args: Json, timeout: float = 600, env: dict[str, str] | None = None
    ) -> Json:
        r = self.run_user(
            [str(self.bin / "python"), str(self.state / "bench_worker.py"), mode, json.dumps(args)],
            timeout=timeout,
            env=env,
        )
        if r.returncode != 0:
            raise BenchError(f"worker {mode} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        result: Json = json.loads(r.stdout)
        return result

    def stj(self, *args: str, timeout: float = 120) -> str:
        r = self.run_user([str(self.bin / "stj"), *args], timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"stj {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def log(self, msg: str) -> None:
        print(f"[bench {time.monotonic() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- floor and product command lines

    def ssh_to_job(self, *args: str) -> list[str]:
        return [str(self.bin / "ssh-to-job"), *args]

    def floor_ssh(self, *args: str, prog: str = "ssh") -> list[str]:
        return [prog, "-F", str(self.floor / "ssh_config"), *args]

    def floor_tcp(self, *command: str) -> list[str]:
        """``command`` (which reads ssh_config_tcp) with the floor's sshd over loopback TCP."""
        f = self.floor
        wrapper = [str(self.bin / "python"), "-I", str(self.state / "tcp_floor.py")]
        return [*wrapper, str(f / "sshd_config"), str(f / "sshd.log"), "--", *command]

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        if os.getuid() != 0:
            raise SystemExit("bench: run as root (it creates a bench user and runs real uids)")
        for tool in ("ssh", SSHD, "scp", "rsync", "setpriv", "ssh-keygen"):
            if not shutil.which(tool):
                raise SystemExit(f"bench: {tool} not found; run ./dev setup first")
        try:
            self.pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
            self.pw = pwd.getpwnam(USER)
        pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.state.mkdir(mode=0o755)
        self.state.chmod(0o755)
        for script in ("bench_worker.py", "tcp_floor.py"):
            shutil.copy(HERE / script, self.state / script)
            (self.state / script).chmod(0o644)
        self._snapshot_venv()
        self._make_data()
        self._make_floor()
        self._start_pool()

    def _snapshot_venv(self) -> None:
        """Measure a private copy of the installed product.

        Other people's ``./dev test`` reinstalls the shared venv whenever it runs; a copy
        (1 s, byte for byte, .pyc files included) keeps one product version for the whole run.
        A venv is relocatable but for its scripts' ``#!`` lines, which we rewrite.
        """
        copy = self.state / "venv"
        check = (
            "import ssh_to_job.client.ssh_to_job, ssh_to_job.client.stj, ssh_to_job.broker, "
            "ssh_to_job.starter; from ssh_to_job import preload; "
            "preload.check_shim()"
        )
        for _attempt in range(5):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(VENV, copy, symlinks=True)
            old = f"#!{VENV}/bin/"
            for script in (copy / "bin").iterdir():
                if script.is_symlink() or not script.is_file():
                    continue
                data = script.read_bytes()
                if data.startswith(old.encode()):
                    script.write_bytes(f"#!{copy}/bin/".encode() + data[len(old) :])
            self.bin = copy / "bin"
            ok = all((self.bin / t).exists() for t in ("ssh-to-job", "stj"))
            if ok and sh([str(self.bin / "python"), "-c", check], cwd="/tmp").returncode == 0:
                return
            time.sleep(3)  # a reinstall was under way: try again
        raise BenchError(f"could not take a working copy of {VENV}")

    def _make_data(self) -> None:
        uid, gid = self.user.pw_uid, self.user.pw_gid
        self.data.mkdir(mode=0o700)
        os.chown(self.data, uid, gid)
        self.src = self.data / "src"
        self.dst = self.data / "dst"
        self.empty = self.data / "empty"
        self.empty.write_bytes(b"")
        chunk = os.urandom(MIB)  # incompressible, and no compression is negotiated anyway
        with open(self.src, "wb") as f:
            for i in range(self.size // MIB):
                # vary each MiB so nothing downstream can dedupe
                f.write(i.to_bytes(8, "little") + chunk[8:])
        for p in (self.src, self.empty):
            os.chown(p, uid, gid)
            p.chmod(0o600)

    def _product_client_options(self) -> dict[str, str]:
        """Ciphers/KexAlgorithms/... lines of the product's generated ssh config."""
        try:
            from ssh_to_job.client import ssh_to_job as product

            text = product.ssh_config(pathlib.Path("/x"), "u", "a", "p", None, False)
        except Exception as exc:
            self.results["errors"]["client_config"] = f"cannot read the product's config: {exc}"
            return {"Ciphers": DEFAULT_CIPHERS}
        opts: dict[str, str] = {}
        for line in text.splitlines():
            words = line.split(None, 1)
            if len(words) == 2 and words[0] in (
                "Ciphers",
                "KexAlgorithms",
                "MACs",
                "HostKeyAlgorithms",
                "Compression",
            ):
                opts[words[0]] = words[1]
        return opts

    def _make_floor(self) -> None:
        """Keys and configs for plain OpenSSH as the bench user, mirroring the product's."""
        f = self.floor
        f.mkdir(mode=0o700)
        os.chown(f, self.user.pw_uid, self.user.pw_gid)
        for name in ("host_key", "id"):
            r = self.run_user(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(f / name)]
            )
            if r.returncode != 0:
                raise BenchError(f"ssh-keygen: {r.stderr}")
        (f / "authorized_keys").write_text((f / "id.pub").read_text())
        host_pub = (f / "host_key.pub").read_text().strip()
        (f / "known_hosts").write_text(f"floor {host_pub}\n")
        # The starter's own sshd_config (same function, same files), less the job's SetEnv.
        (f / "sshd_config").write_text(sshd_config(f, USER, {}, forwarding=True, debug=False))
        extra = "".join(f"  {k} {v}\n" for k, v in self._product_client_options().items())
        # The client config ssh-to-job generates (client/ssh_to_job.py), with sshd -i as proxy.
        (f / "ssh_config").write_text(f"""\
Host *
  User {USER}
  HostKeyAlias floor
  UserKnownHostsFile "{f}/known_hosts"
  GlobalKnownHostsFile "{f}/known_hosts"
  StrictHostKeyChecking yes
  CheckHostIP no
  UpdateHostKeys no
  IdentityFile "{f}/id"
  IdentitiesOnly yes
  IdentityAgent none
  PreferredAuthentications publickey
  PasswordAuthentication no
  KbdInteractiveAuthentication no
  GSSAPIAuthentication no
  BatchMode yes
  ProxyCommand {SSHD} -i -e -f "{f}/sshd_config" 2>>"{f}/sshd.log"
  ControlMaster no
  ControlPath none
  ForwardAgent no
  ServerAliveInterval 30
  LogLevel ERROR
{extra}""")
        # The same, but over a loopback TCP connection (tcp_floor.py): ssh-to-job's transport.
        from ssh_to_job.client import ssh_to_job as product

        fdpass = pathlib.Path(product.__file__).parent / "stj-fdpass"
        tcp = (
            (f / "ssh_config")
            .read_text()
            .replace(
                f'  ProxyCommand {SSHD} -i -e -f "{f}/sshd_config" 2>>"{f}/sshd.log"\n',
                f'  ProxyCommand {fdpass} "$STJB_TCP_NAME"\n  ProxyUseFdpass yes\n',
            )
        )
        if "ProxyUseFdpass" not in tcp:
            raise BenchError("could not derive the TCP floor's ssh_config from the floor's")
        (f / "ssh_config_tcp").write_text(tcp)
        for p in f.iterdir():
            os.chown(p, self.user.pw_uid, self.user.pw_gid)
        r = self.run_user(self.floor_ssh("floor", "true"), timeout=30)
        if r.returncode != 0:
            raise BenchError(f"the floor does not work: {r.stderr.strip()}")
        r = self.run_user(self.floor_tcp("ssh", "-F", str(f / "ssh_config_tcp"), "floor", "true"))
        if r.returncode != 0:
            raise BenchError(f"the floor over TCP does not work: {r.stderr.strip()}")

    def _start_pool(self) -> None:
        slots = 21
        # A unique starter name: the starter's cgroup is named after it, and a second starter
        # with the same name (another pool on this host) would treat ours as leftovers.
        (self.state / "config.toml").write_text(
            # The queue phase puts 100,000 jobs of one user in the queue.
            f'[broker]\nmax_jobs_per_user = 200000\n[starter]\nname = "stjbench-{self.tok}"\n'
            f"slots = {slots}\n" + "".join(f"{line}\n" for line in self.a.starter_option)
        )
        log = open(self.state / "pool.log", "ab")
        self.pool = subprocess.Popen(
            [
                str(self.bin / "stj"),
                "pool",
                "--state-dir",
                str(self.state),
                "--config",
                str(self.state / "config.toml"),
                "--slots",
                str(slots),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd="/tmp",
            env={**self.env(), "HOME": "/root", "USER": "root", "LOGNAME": "root"},
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = sh([str(self.bin / "stj"), "status", "--json"], env=self.env(), timeout=20)
            if r.returncode == 0 and json.loads(r.stdout)["starters"]:
                self.broker_pid = json.loads(r.stdout)["broker_pid"]
                break
            if self.pool.poll() is not None:
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"the pool did not start:\n{self.pool_log()}")
        if not self.broker_pid:
            raise BenchError(f"the pool did not start:\n{self.pool_log()}")
        for pid in children_of(self.pool.pid):
            if "ssh_to_job.starter " in cmdline(pid):
                self.starter_pid = pid
        # One job for single-job figures, twenty more for the spread ones: all 21 slots busy,
        # so anything submitted later stays idle (the queue figures rely on that).
        out = self.stj("submit", "-n", "1", "/bin/sleep", "7200")
        self.job = out.split(":", 1)[1].split()[0]
        out = self.stj("submit", "-n", "20", "/bin/sleep", "7200")
        cluster = out.split("cluster", 1)[1].split(":")[0].strip()
        self.jobs20 = [f"{cluster}.{p}" for p in range(20)]
        self._wait_running([self.job, *self.jobs20])
        self.results["pool"] = {
            "broker_pid": self.broker_pid,
            "starter_pid": self.starter_pid,
            "slots": slots,
            "job": self.job,
        }

    def _wait_running(self, ids: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = json.loads(self.stj("q", "--json"))
            running = {j["id"] for j in jobs if j["state"] == "running" and j["pids"]}
            if set(ids) <= running:
                return
            time.sleep(0.2)
        raise BenchError(f"jobs did not start: {ids}\n{self.pool_log()}")

    def pool_log(self) -> str:
        try:
            return (self.state / "pool.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def teardown(self) -> None:
        if self.slurm is not None:
            self.slurm.stop()
        if self.pool is not None and self.pool.poll() is None:
            kids = children_of(self.pool.pid)
            self.pool.send_signal(signal.SIGTERM)
            try:
                self.pool.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pool.pid, signal.SIGKILL)
                self.pool.wait()
            for pid in kids:  # the broker and starter we started, should they outlive it
                if f"--state-dir {self.state} " in cmdline(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if not self.a.keep:
            shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.data, ignore_errors=True)

    # ------------------------------------------------------------------ measurement helpers

    @contextmanager
    def daemons(self, into: Json) -> Iterator[None]:
        """Broker and starter CPU and peak RSS over the block (peaks reset at its start)."""
        pids = {"broker": self.broker_pid, "starter": self.starter_pid}
        before = {k: proc_cpu(p) for k, p in pids.items()}
        rss0 = {k: proc_mem(p).get("VmRSS", 0.0) for k, p in pids.items()}
        reset = all(reset_hwm(p) for p in pids.values())
        t0 = time.perf_counter()
        yield
        wall = time.perf_counter() - t0
        for k, p in pids.items():
            cpu, kids = proc_cpu(p)
            mem = proc_mem(p)
            into[k] = {
                "cpu_s": cpu - before[k][0],
                "children_cpu_s": kids - before[k][1],
                "rss_before_mib": rss0[k],
                "rss_after_mib": mem.get("VmRSS"),
                "peak_rss_mib": mem.get("VmHWM") if reset else None,
            }
        into["wall_s"] = wall

    @contextmanager
    def perf_dsos(self, into: Json | None) -> Iterator[None]:
        """With ``perf`` (./dev bench installs linux-perf): sample the broker and the starter
        over the block and put each one's CPU share by shared object into ``into["perf"]``
        (the interpreter: our code, trio and attrs; libcrypto: TLS handshakes and signatures;
        the kernel: sockets). Nothing when ``into`` is None or perf cannot sample here."""
        perf = shutil.which("perf")
        if into is None or perf is None:
            yield
            return
        data = {k: self.state / f"perf-{k}.data" for k in ("broker", "starter")}
        pids = {"broker": self.broker_pid, "starter": self.starter_pid}
        procs = {
            k: subprocess.Popen(
                [perf, "record", "-q", "-F", "499", "-o", str(data[k]), "-p", str(pids[k])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for k in pids
        }
        try:
            yield
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGINT)
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        out: Json = {}
        for k, path in data.items():
            rep = sh(
                [perf, "report", "-i", str(path), "--sort", "dso", "--stdio", "-g", "none"],
                timeout=120,
            )
            shares: dict[str, float] = {}
            for line in rep.stdout.splitlines():
                m = re.match(r"\s*([0-9.]+)%\s+(\S+)", line)
                if m and not line.lstrip().startswith("#"):
                    shares[m[2]] = float(m[1])
            if shares:
                out[k] = shares
            path.unlink(missing_ok=True)
        if out:
            into["perf"] = out

    def guard(self, name: str, fn: Any) -> None:
        """Run one phase; a failure is recorded in the results, and the others still run."""
        if self.a.only and name not in self.a.only:
            return
        self.log(f"phase {name}")
        # What the phase before left running (200 sessions ending, the starter removing their
        # directories and cgroups) must not land in this one's figures.
        waited, busy = settle()
        self.results.setdefault("settle_at_phase_start", {})[name] = {
            "waited_s": round(waited, 1),
            "busy": round(busy, 3),
        }
        # Other people's work on a shared machine shows here first.
        self.results.setdefault("loadavg_at_phase_start", {})[name] = os.getloadavg()[0]
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:
            self.log(f"phase {name} failed: {exc}")
            self.results["errors"][name] = "".join(
                traceback.format_exception_only(type(exc), exc)
            ).strip()[-2000:]
        self.results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 1)

    # ------------------------------------------------------------------ phases

    def phase_versions(self) -> None:
        cpu = ""
        try:
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem_kb = 0
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
        os_name = ""
        try:
            for line in pathlib.Path("/etc/os-release").read_text().splitlines():
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip('"')
        except OSError:
            pass
        try:
            from importlib.metadata import version

            product = version("ssh-to-job")
        except Exception:
            product = "?"
        git = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
        self.results["machine"] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "hostname": platform.node(),
            "kernel": platform.release(),
            "os": os_name,
            "cpu": cpu,
            "cores": os.cpu_count(),
            "mem_gib": round(mem_kb / 1024 / 1024, 1),
            "aes_ni": " aes " in pathlib.Path("/proc/cpuinfo").read_text(),
            "loadavg_start": os.getloadavg(),
        }
        self.results["versions"] = {
            "openssh": first_line(["ssh", "-V"], "stderr"),
            "rsync": first_line(["rsync", "--version"]),
            "python": platform.python_version(),
            "product": f"ssh-to-job {product} (checkout {git}{'+dirty' if dirty.stdout else ''};"
            f" installed in {VENV}, measured from a copy)",
        }

    def phase_algorithms(self) -> None:
        """What ssh actually negotiated, for the product and for the floor (ssh -v)."""
        pat = re.compile(
            r"kex: (algorithm|host key algorithm|server->client cipher|"
            r"client->server cipher): (\S+)"
        )
        out: Json = {}
        for name, argv in (
            ("ssh-to-job", self.ssh_to_job("-debug", self.job, "true")),
            ("floor", self.floor_ssh("-v", "floor", "true")),
        ):
            r = self.run_user(argv, timeout=60, env={"SHELL": "/bin/sh"})
            found = dict(pat.findall(r.stderr))
            found["rc"] = r.returncode
            out[name] = found
        same = {k: v for k, v in out["floor"].items() if k != "rc"} == {
            k: v for k, v in out["ssh-to-job"].items() if k != "rc"
        }
        out["same"] = same
        self.results["phases"]["algorithms"] = out
        if not same:
            self.log(f"WARNING: product and floor negotiate different algorithms: {out}")

    def phase_setup_time(self) -> None:
        reps = 10 if self.quick else 25
        cmds = {
            "ssh-to-job": {"argv": self.ssh_to_job(self.job, "true")},
            "floor": {"argv": self.floor_ssh("floor", "true"), "env": {"SHELL": "/bin/sh"}},
            "ssh-to-job curve25519": {
                "argv": self.ssh_to_job(
                    "-ssh", "ssh -o KexAlgorithms=curve25519-sha256", self.job, "true"
                )
            },
            "floor curve25519": {
                "argv": self.floor_ssh("-o", "KexAlgorithms=curve25519-sha256", "floor", "true"),
                "env": {"SHELL": "/bin/sh"},
            },
        }
        res = self.worker("times", {"cmds": cmds, "reps": reps})["runs"]
        self.results["phases"]["setup"] = self._times_result(res)

        # Where the time goes: process start-ups, then the session rebuilt phase by phase.
        where = "import ssh_to_job.client as c, os; print(os.path.dirname(c.__file__))"
        fdproxy = sh([str(self.bin / "python"), "-c", where]).stdout.strip() + "/_fdproxy.py"
        py = str(self.bin / "python")
        start_cmds = {
            "python -c pass": {"argv": [py, "-c", "pass"]},
            "python -I -S -c pass": {"argv": [py, "-I", "-S", "-c", "pass"]},
            "ssh-to-job -help (interpreter + imports)": {"argv": self.ssh_to_job("-help")},
            "imports + default session key (client.ssh_to_job.generate_key)": {
                "argv": [py, "-c", "import ssh_to_job.client.ssh_to_job as m; m.generate_key('')"]
            },
            "ProxyCommand helper start (_fdproxy.py, no argument)": {
                "argv": [py, "-I", "-S", fdproxy]
            },
            "sshd exec (sshd -V)": {"argv": [SSHD, "-V"]},
            "ssh exec (ssh -V)": {"argv": ["ssh", "-V"]},
        }
        st = self.worker("times", {"cmds": start_cmds, "reps": 5 if self.quick else 10})["runs"]
        startup = {k: summary([r["wall"] for r in v]) for k, v in st.items()}
        bd = self.worker("breakdown", {"job": self.job, "reps": 8 if self.quick else 20})
        imp = self.worker("importtime", {"code": "import ssh_to_job.client.ssh_to_job", "reps": 5})
        self.results["phases"]["setup_breakdown"] = {
            "startup": startup,
            "phases": {k: summary(v) for k, v in bd["phases"].items()},
            "importtime": imp,
        }

    def _times_result(self, res: dict[str, list[Json]]) -> Json:
        out: Json = {}
        for name, runs in res.items():
            walls = [r["wall"] for r in runs if r["rc"] == 0]
            fails = [r for r in runs if r["rc"] != 0]
            out[name] = {
                "wall": summary(walls),
                "raw": [round(w, 5) for w in walls],
                "cpu": summary([r["cpu"] for r in runs]),
                "failed": len(fails),
                "errors": sorted({r["stderr"].strip()[-200:] for r in fails})[:3],
            }
        names = list(res)
        for n in names:
            fl = "floor" + n[len("ssh-to-job") :] if n.startswith("ssh-to-job") else None
            if fl in res:
                out[n]["ratio"] = paired_ratio(out[n]["raw"], out[fl]["raw"])
        return out

    def _end_master(self) -> None:
        """Stop the bench user's repeat-command master for the job, so a round starts cold."""
        from ssh_to_job.client import _mux

        base = pathlib.Path("/tmp") / f"ssh-to-job-{self.user.pw_uid}"
        sock = _mux.socket_path(base, str(self.state / "broker.sock"), self.job, ("/bin/bash",))
        if sock.exists():
            self.run_user(["ssh", "-F", "none", "-S", str(sock), "-O", "exit", "x"], timeout=20)
            deadline = time.monotonic() + 10
            while sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def _repeat_front(self, mux: dict[str, str]) -> Json:
        """Repeat commands through one live master, interleaved A B C A B C: the compiled
        front (``ssh-to-job``, as shipped), the Python client alone (``ssh-to-job-py``, what
        ran before the front), and the bare ``ssh -F <master's config>`` both of them exec."""
        from ssh_to_job.client import _mux

        base = pathlib.Path("/tmp") / f"ssh-to-job-{self.user.pw_uid}"
        sock = _mux.socket_path(base, str(self.state / "broker.sock"), self.job, ("/bin/bash",))
        made = self.run_user(self.ssh_to_job(self.job, "true"), env=mux)
        if made.returncode != 0 or not sock.exists():
            return {"error": "no master: " + made.stderr[-300:]}
        cmds = {
            "front": {"argv": self.ssh_to_job(self.job, "true"), "env": mux},
            "python client": {
                "argv": [str(self.bin / "ssh-to-job-py"), self.job, "true"],
                "env": mux,
            },
            "ssh alone": {"argv": ["ssh", "-F", _mux.config_path(sock), "ssh-to-job", "true"]},
        }
        res = self.worker("times", {"cmds": cmds, "reps": 10 if self.quick else 20})["runs"]
        out: Json = {}
        for name, runs in res.items():
            walls = [r["wall"] for r in runs if r["rc"] == 0]
            out[name] = {
                "wall": summary(walls),
                "raw": [round(w, 5) for w in walls],
                "cpu": summary([r["cpu"] for r in runs]),
                "failed": sum(1 for r in runs if r["rc"] != 0),
            }
        out["front"]["ratio_to_python"] = paired_ratio(
            out["front"]["raw"], out["python client"]["raw"]
        )
        self.log(
            f"  repeat through one master: front {out['front']['wall'].get('median', 0) * 1000:.1f}"
            f" ms, Python client {out['python client']['wall'].get('median', 0) * 1000:.1f} ms, "
            f"ssh alone {out['ssh alone']['wall'].get('median', 0) * 1000:.1f} ms"
        )
        return out

    def phase_repeat(self) -> None:
        """Ten commands in a row into one job: the product as shipped (the first a full
        session, the next nine through its ControlMaster), the product with the master off
        (SSH_TO_JOB_MUX=0: ten full sessions), and the floor (ten plain ssh logins)."""
        rounds = 2 if self.quick else 3
        mux = {"SSH_TO_JOB_MUX": "1"}
        cmds = {
            "ssh-to-job": {"argv": self.ssh_to_job(self.job, "true"), "env": mux},
            "ssh-to-job, no master": {
                "argv": self.ssh_to_job(self.job, "true"),
                "env": {"SSH_TO_JOB_MUX": "0"},
            },
            "floor": {"argv": self.floor_ssh("floor", "true"), "env": {"SHELL": "/bin/sh"}},
        }
        merged: dict[str, list[Json]] = {k: [] for k in cmds}
        totals: dict[str, list[float]] = {k: [] for k in cmds}
        first: list[float] = []
        repeats: list[float] = []
        repeat_cpu: list[float] = []
        for _ in range(rounds):
            self._end_master()
            res = self.worker("times", {"cmds": cmds, "reps": 10, "order": "block"})["runs"]
            for k, v in res.items():
                merged[k].extend(v)
                totals[k].append(sum(r["wall"] for r in v))
            ok = [r for r in res["ssh-to-job"] if r["rc"] == 0]
            if ok:
                first.append(ok[0]["wall"])
                repeats.extend(r["wall"] for r in ok[1:])
                repeat_cpu.extend(r["cpu"] for r in ok[1:])
        out = self._times_result(merged)
        out["front"] = self._repeat_front(mux)
        self._end_master()
        for k in totals:
            out[k]["ten_in_a_row"] = summary(totals[k])
        out["ssh-to-job"]["first"] = summary(first)
        out["ssh-to-job"]["repeat"] = summary(repeats)
        out["ssh-to-job"]["repeat_cpu"] = summary(repeat_cpu)
        self.results["phases"]["repeat"] = out
        self.log(
            f"  repeat: first {summary(first).get('median', 0) * 1000:.0f} ms, then "
            f"{summary(repeats).get('median', 0) * 1000:.1f} ms each (no master: "
            f"{out['ssh-to-job, no master']['wall'].get('median', 0) * 1000:.0f} ms)"
        )

    def phase_throughput(self) -> None:
        reps = self.a.rounds or (2 if self.quick else 4)
        src, dst, empty, j = str(self.src), str(self.dst), str(self.empty), self.job
        rm = ["rm", "-f", dst]
        fcfg = str(self.floor / "ssh_config")
        tcfg = str(self.floor / "ssh_config_tcp")
        CFG = "@CFG@"  # where each floor's ssh_config goes
        floor_env = {"SHELL": "/bin/sh"}
        cases: dict[str, tuple[Json, Json, Json]] = {}

        # Each run that writes the data file starts on memory freed a moment ago (see
        # _memory_probe): without it, the first of a pair writes into long-freed memory and
        # the second into what the first just freed, which on a VM is up to 4x faster.
        warm = self.data / "warm"
        warm_first = [
            "sh",
            "-c",
            f"rm -f {shlex.quote(dst)}; {shlex.join(zeros(warm, self.size // MIB + 64))}; "
            f"rm -f {shlex.quote(str(warm))}",
        ]

        def case(name: str, prod: list[str], floor: list[str], stdin: str | None = None) -> None:
            """``floor``: the floor's command, with CFG where its ssh_config goes."""
            writes = name.endswith(" data") and not name.startswith("cat ")
            before = warm_first if writes else rm
            common: Json = {"stdin": stdin, "before": before, "timeout": 300}
            pipes = [a.replace(CFG, fcfg) for a in floor]
            tcp = [a.replace(CFG, tcfg) for a in floor]
            cases[name] = (
                {"argv": prod, **common},
                {"argv": pipes, **common, "env": floor_env},
                {"argv": self.floor_tcp(*tcp), **common, "env": floor_env},
            )

        for size_name, path in (("data", src), ("empty", empty)):
            case(
                f"cat down {size_name}",
                self.ssh_to_job(j, f"cat {path}"),
                ["ssh", "-F", CFG, "floor", f"cat {path}"],
            )
            case(
                f"cat up {size_name}",
                self.ssh_to_job(j, "cat > /dev/null"),
                ["ssh", "-F", CFG, "floor", "cat > /dev/null"],
                stdin=path,
            )
            case(
                f"scp down {size_name}",
                self.ssh_to_job("-ssh", "scp", j, f"remote:{path}", dst),
                ["scp", "-F", CFG, f"floor:{path}", dst],
            )
            case(
                f"scp up {size_name}",
                self.ssh_to_job("-ssh", "scp", j, path, f"remote:{dst}"),
                ["scp", "-F", CFG, path, f"floor:{dst}"],
            )
            case(
                f"rsync down {size_name}",
                ["rsync", "-e", "ssh-to-job", f"{j}:{path}", dst],
                ["rsync", "-e", f"ssh -F {CFG}", f"floor:{path}", dst],
            )
            case(
                f"rsync up {size_name}",
                ["rsync", "-e", "ssh-to-job", path, f"{j}:{dst}"],
                ["rsync", "-e", f"ssh -F {CFG}", path, f"floor:{dst}"],
            )
        cmds: Json = {}
        for name, (p, f, t) in cases.items():
            cmds[f"ssh-to-job {name}"] = p
            cmds[f"floor {name}"] = f
            cmds[f"floor-tcp {name}"] = t
        # Warm the page cache (both sides read the same tmpfs file anyway).
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=False)
        # Each round reverses the order of the last, so that no path always goes first.
        res = self.worker(
            "times", {"cmds": cmds, "reps": reps, "order": "alternate"}, timeout=2700
        )["runs"]
        out: Json = {"bytes": self.size, "cases": {}}
        for name in cases:
            if not name.endswith(" data"):
                continue
            base = name[: -len(" data")]
            row: Json = {}
            for who in ("ssh-to-job", "floor", "floor-tcp"):
                runs = [r for r in res[f"{who} {name}"] if r["rc"] == 0]
                empties = [r["wall"] for r in res[f"{who} {base} empty"] if r["rc"] == 0]
                setup = statistics.median(empties) if empties else 0.0
                rates = [self.size / MIB / r["wall"] for r in runs]
                # Only where set-up is under half the wall time: otherwise noise in the
                # subtraction swamps the figure.
                stream = [
                    self.size / MIB / (r["wall"] - setup) for r in runs if r["wall"] > 2 * setup
                ]
                bad = [r["stderr"].strip()[-200:] for r in res[f"{who} {name}"] if r["rc"] != 0]
                row[who] = {
                    "mib_s": summary(rates),
                    "raw": [round(x, 1) for x in rates],
                    "stream_mib_s": summary(stream),
                    "setup_s": setup,
                    "failed": len(bad),
                    "errors": bad[:2],
                }
            row["ratio"] = paired_ratio(row["ssh-to-job"]["raw"], row["floor"]["raw"])
            row["ratio_tcp"] = paired_ratio(row["ssh-to-job"]["raw"], row["floor-tcp"]["raw"])
            row["tcp_to_pipes"] = paired_ratio(row["floor-tcp"]["raw"], row["floor"]["raw"])
            sp, sf, st = (
                row[w]["stream_mib_s"].get("median") for w in ("ssh-to-job", "floor", "floor-tcp")
            )
            row["stream_ratio"] = sp / sf if sp and sf else None
            row["stream_ratio_tcp"] = sp / st if sp and st else None
            out["cases"][base] = row
        out["memory"] = self._memory_probe()
        self.results["phases"]["throughput"] = out
        sh(["rm", "-f", dst])

    def _memory_probe(self, rounds: int = 2, idle: float = 10.0) -> Json:
        """Writing the data file's size into tmpfs: on memory freed ``idle`` seconds ago and
        on memory freed just before. On a VM whose balloon reports free pages to the host
        (virtio_balloon free page reporting, a few seconds after a free), the first costs a
        host fault per page; on bare metal the two are alike. The throughput phase's cases
        that write the data file all start on just-freed memory."""
        scratch = self.data / "probe"
        write = zeros(scratch, self.size // MIB)
        cold: list[float] = []
        hot: list[float] = []
        for _ in range(rounds):
            for into in (cold, hot):
                if into is cold:
                    time.sleep(idle)
                t0 = time.perf_counter()
                sh(write, timeout=120)
                into.append(time.perf_counter() - t0)
                scratch.unlink(missing_ok=True)
        return {
            "idle_s": idle,
            "long_freed_s": summary(cold),
            "just_freed_s": summary(hot),
            "reporting": pathlib.Path("/sys/module/page_reporting").exists(),
        }

    def phase_concurrency(self) -> None:
        levels = self.a.sessions or ([50, 200] if self.quick else [50, 100, 200])
        hold = "echo ok; exec cat > /dev/null"
        out: Json = {"one job": {}, "20 jobs": {}, "floor": {}}
        targets = {
            "one job": [self.ssh_to_job(self.job, hold)],
            "20 jobs": [self.ssh_to_job(j, hold) for j in self.jobs20],
        }
        self.results["phases"]["concurrency"] = out
        for n in levels:
            for name, argvs in targets.items():
                self._settle()
                rec: Json = {}
                with self.daemons(rec):
                    r = self.worker(
                        "concurrent", {"n": n, "argvs": argvs, "timeout": 240}, timeout=420
                    )
                r["setup"] = summary(r["setup"])
                rec.update(r)
                daemon_cpu = sum(
                    rec[d]["cpu_s"] + rec[d]["children_cpu_s"] for d in ("broker", "starter")
                )
                rec["cpu_per_session_s"] = r["client_cpu_per_session"] + daemon_cpu / n
                out[name][str(n)] = rec
                self.log(
                    f"  {n} sessions into {name}: {r['ok']}/{n} ok, p50 "
                    f"{r['setup'].get('median', 0):.2f}s p99 {r['setup'].get('p99', 0):.2f}s"
                )
            self._settle()
            r = self.worker(
                "concurrent",
                {"n": n, "argvs": [self.floor_ssh("floor", hold)], "timeout": 240},
                timeout=420,
                env={"SHELL": "/bin/sh"},
            )
            r["setup"] = summary(r["setup"])
            r["cpu_per_session_s"] = r["client_cpu_per_session"]  # sshd is ssh's grandchild
            out["floor"][str(n)] = r
            self.log(
                f"  {n} floor sessions: {r['ok']}/{n} ok, p50 {r['setup'].get('median', 0):.2f}s"
            )

    def _settle(self, timeout: float = 30) -> None:
        """Wait until the starter has no session processes left (the last run's are gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any("sshd" in cmdline(p) for p in children_of(self.starter_pid)):
                break
            time.sleep(0.2)
        time.sleep(0.5)

    def phase_memory_idle(self) -> None:
        self._settle()
        time.sleep(1)
        self.results["phases"]["memory_idle"] = {
            "broker": proc_mem(self.broker_pid),
            "starter": proc_mem(self.starter_pid),
            "jobs_running": 21,
        }

    def phase_broker(self) -> None:
        out: Json = {}
        self.results["phases"]["broker"] = out
        # One more job: every slot is busy, so it stays idle (the refusal target).
        sub = self.stj("submit", "/bin/sleep", "7200")
        self.idle_job = sub.split(":", 1)[1].split()[0]
        secs = 3.0 if self.quick else 5.0
        for kind, job, threads in (
            ("status", "", 4),
            ("refusal", self.idle_job, 4),
            ("grant", self.job, 1),
            ("grant", self.job, 4),
            ("grant", self.job, 16),
        ):
            self._settle()
            rec: Json = {}
            # The busiest grant run also says where the daemons' CPU goes, library by library.
            profile = kind == "grant" and threads == 16
            with self.daemons(rec), self.perf_dsos(rec if profile else None):
                r = self.worker(
                    "broker_load", {"kind": kind, "job": job, "threads": threads, "seconds": secs}
                )
            r["latency"] = summary(r["latency"])
            rec.update(r)
            if r["ok"]:
                rec["broker_cpu_per_op_ms"] = rec["broker"]["cpu_s"] / r["ok"] * 1000
                rec["starter_cpu_per_op_ms"] = rec["starter"]["cpu_s"] / r["ok"] * 1000
            out[f"{kind} x{threads}"] = rec
            self.log(f"  {kind} with {threads} thread(s): {r['rate']:.0f}/s ({r['failed']} failed)")

    def phase_queue(self) -> None:
        out: Json = {}
        self.results["phases"]["queue"] = out
        q_reps = 3
        stj = str(self.bin / "stj")
        status = json.loads(self.stj("status", "--json"))
        live = status["jobs_idle"] + status["jobs_running"] + status["jobs_held"]
        for label, count in (("10k", 10_000 - live), ("100k", 90_000)):
            rec: Json = {}
            with self.daemons(rec):
                r = self.worker(
                    "times",
                    {
                        "cmds": {
                            "submit": {
                                "argv": [stj, "submit", "-n", str(count), "/bin/sleep", "7200"],
                                "timeout": 600,
                            }
                        },
                        "reps": 1,
                    },
                )["runs"]["submit"][0]
            if r["rc"] != 0:
                raise BenchError(f"bulk submit failed: {r['stderr']}")
            status = json.loads(self.stj("status", "--json"))
            total = status["jobs_idle"] + status["jobs_running"] + status["jobs_held"]
            rec["submitted"] = count
            rec["submit_s"] = r["wall"]
            rec["jobs_per_s"] = count / r["wall"]
            rec["queue_size"] = total
            # The three views: per cluster (the default), every job, every job as JSON.
            for key, extra in (("q", []), ("q_nobatch", ["--nobatch"]), ("q_json", ["--json"])):
                qrec: Json = {}
                with self.daemons(qrec):
                    res = self.worker(
                        "times",
                        {
                            "cmds": {"stj q": {"argv": [stj, "q", *extra], "timeout": 600}},
                            "reps": q_reps if extra else 3 * q_reps,
                        },
                    )["runs"]["stj q"]
                qrec["wall"] = summary([x["wall"] for x in res if x["rc"] == 0])
                qrec["client_cpu"] = summary([x["cpu"] for x in res])
                qrec["failed"] = sum(1 for x in res if x["rc"] != 0)
                qrec["reps"] = len(res)
                rec[key] = qrec
            rec["broker_rss_after_mib"] = proc_mem(self.broker_pid).get("VmRSS")
            out[label] = rec
            self.log(
                f"  queue {total}: submit {rec['jobs_per_s']:.0f} jobs/s, stj q "
                f"{rec['q']['wall'].get('median', 0) * 1000:.0f} ms, --nobatch "
                f"{rec['q_nobatch']['wall'].get('median', 0):.2f} s, --json "
                f"{rec['q_json']['wall'].get('median', 0):.2f} s, broker "
                f"{rec['broker_rss_after_mib']:.0f} MiB"
            )
        # One job at a time: the CLI as a user types it, and the broker alone.
        res = self.worker(
            "times",
            {
                "cmds": {"stj submit": {"argv": [stj, "submit", "/bin/sleep", "7200"]}},
                "reps": 10 if self.quick else 20,
            },
        )["runs"]["stj submit"]
        out["single_cli"] = summary([x["wall"] for x in res if x["rc"] == 0])
        rec = {}
        with self.daemons(rec):
            r = self.worker(
                "broker_load", {"kind": "submit", "job": "", "threads": 1, "seconds": 3.0}
            )
        r["latency"] = summary(r["latency"])
        rec.update(r)
        out["single_inprocess"] = rec

    def phase_slurm(self) -> None:
        """ssh-to-job slurm:N, srun --overlap and ssh through pam_slurm_adopt (bench_slurm.py)."""
        import bench_slurm

        out: Json = {}
        self.results["phases"]["slurm"] = out
        self.slurm = bench_slurm.SlurmRig(
            self.state / "slurm",
            self.user,
            self.tok,
            self.bin,
            self._product_client_options(),
            self.log,
        )
        why = self.slurm.start()
        if why:
            out["unavailable"] = why
            return

        def work(args: Json, env: dict[str, str], prefix: list[str]) -> Json:
            worker = [str(self.bin / "python"), str(self.state / "bench_worker.py")]
            r = sh(
                [*prefix, *self.as_user([*worker, "times", json.dumps(args)])],
                env={**self.env(), **env},
                cwd="/tmp",
                timeout=1800,
            )
            if r.returncode != 0:
                raise BenchError(f"worker times failed ({r.returncode}):\n{r.stderr[-3000:]}")
            result: Json = json.loads(r.stdout)
            return result

        rounds = self.a.rounds or (2 if self.quick else 3)
        out.update(bench_slurm.measure(self.slurm, work, rounds, rounds, bench_slurm.GIB))

    # ------------------------------------------------------------------ driver

    def run(self) -> int:
        self.phase_versions()
        self.setup()
        self.log(
            f"pool in {self.state}; job {self.job}; data {self.size // MIB} MiB in {self.data}"
        )
        self.guard("memory_idle", self.phase_memory_idle)
        self.guard("algorithms", self.phase_algorithms)
        self.guard("setup", self.phase_setup_time)
        self.guard("repeat", self.phase_repeat)
        self.guard("throughput", self.phase_throughput)
        self.guard("concurrency", self.phase_concurrency)
        self.guard("broker", self.phase_broker)
        self.guard("queue", self.phase_queue)
        if self.a.slurm:
            self.guard("slurm", self.phase_slurm)
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./dev bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, 256 MiB instead of 1 GiB, 50 and 200 sessions",
    )
    ap.add_argument(
        "--slurm",
        action="store_true",
        help="also run a one-node Slurm cluster and compare ssh-to-job slurm:N with "
        "srun --overlap and ssh through pam_slurm_adopt",
    )
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default=None,
        help="comma-separated phases (memory_idle, algorithms, setup, repeat, "
        "throughput, concurrency, broker, queue, slurm)",
    )
    ap.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="concurrency levels (default 50,100,200; quick: 50,200)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="throughput rounds (default 4; quick: 2), and the Slurm phase's (default 3; quick: 2)",
    )
    ap.add_argument(
        "--starter-option",
        action="append",
        default=[],
        metavar="KEY = VALUE",
        help="an extra [starter] line for the bench pool's config, to measure a path apart "
        "(e.g. 'use_shim = false', 'use_cgroups = false'); repeatable",
    )
    ap.add_argument("--keep", action="store_true", help="keep the state directory")
    a = ap.parse_args(argv)
    if a.only and "slurm" in a.only:
        a.slurm = True
    from bench_report import write_report

    bench = Bench(a)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(a.out)
    rc = 1
    try:
        rc = bench.run()
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        bench.log(f"failed: {exc}")
        bench.results["errors"]["setup"] = str(exc)[-3000:]
    except KeyboardInterrupt:
        bench.log("interrupted")
        bench.results["errors"]["interrupted"] = "yes"
    finally:
        bench.teardown()
    bench.results["mode"] = "quick" if a.quick else "full"
    bench.results["starter_options"] = a.starter_option
    bench.results["runtime_s"] = round(time.monotonic() - bench.t_start, 1)
    if "machine" in bench.results:
        bench.results["machine"]["loadavg_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"{stamp}.json"
    jpath.write_text(json.dumps(bench.results, indent=1, default=str) + "\n")
    mpath = out / f"{stamp}.md"
    mpath.write_text(write_report(bench.results))
    print(mpath.read_text())
    print(f"bench: wrote {jpath} and {mpath}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
