"""Remote sessions (``ssh-to-job -pool``, relayed by the broker) against local ones, in one run.

Run as root: ``/opt/ssh-to-job/venv/bin/python bench/relay.py [--size-mib 256] [--rounds 5]``.
It makes the user ``stjbench`` if missing, starts its own personal pool in a fresh /tmp state
directory with one ``sleep`` job of that user, registers a client key for it and trusts the
pool CA (as docs/user.md's "From your laptop" says), then measures, interleaving local and
remote so that load from elsewhere hits both:

* session set-up: ``ssh-to-job JOB true`` (local: unix socket and fd passing; remote: TLS to
  the broker's port on 127.0.0.1, a signed request, the broker's splice relay);
* throughput each way: ``head -c SIZE /dev/zero | ssh-to-job JOB 'cat >/dev/null'`` and
  ``ssh-to-job JOB 'head -c SIZE /dev/zero' >/dev/null``;
* the broker's CPU time (user + system, from /proc) per GiB it relayed.

Both paths reach the same sshd over TCP on loopback; the remote one adds the relay hop. It
prints a Markdown table and writes the raw figures as JSON next to it (``--out``). It never
signals a process it did not start, and removes its state directory at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

BIN = pathlib.Path(sys.executable).parent
STJ = str(BIN / "stj")
SSH_TO_JOB = str(BIN / "ssh-to-job")
USER = "stjbench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``, all its threads."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class Run:
    def __init__(self, size: int) -> None:
        self.size = size
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
            pw = pwd.getpwnam(USER)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        self.state = pathlib.Path("/tmp") / f"stjr-{secrets.token_hex(4)}"
        self.state.mkdir(mode=0o755)
        self.xdg = self.state / "laptop"
        self.xdg.mkdir(mode=0o700)
        os.chown(self.xdg, self.uid, self.gid)
        self.pool: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "STJ_STATE_DIR": str(self.state),
            "HOME": self.home,
            "USER": USER,
            "LOGNAME": USER,
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
            "TMPDIR": "/tmp",
            "XDG_CONFIG_HOME": str(self.xdg),
        }

    def sh(self, cmd: str, input: str | None = None) -> str:
        argv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]
        r = subprocess.run(
            [*argv, "sh", "-c", cmd],
            env=self.env(),
            capture_output=True,
            text=True,
            input=input,
            cwd="/tmp",
            timeout=600,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def start(self) -> None:
        log = open(self.state / "pool.log", "ab")
        self.pool = subprocess.Popen(
            [STJ, "pool", "--state-dir", str(self.state), "--slots", "2"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**self.env(), "HOME": "/root", "USER": "root", "LOGNAME": "root"},
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                st = json.loads(self.sh(f"{STJ} status --json"))
                if any(s["connected"] for s in st["starters"]):
                    self.broker_pid = int(st["broker_pid"])
                    break
            except (RuntimeError, ValueError):
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the pool did not start")
        self.addr = (self.state / "broker.addr").read_text().strip()
        out = self.sh(f"{STJ} submit /bin/sleep 3600")
        self.job = out.split(":", 1)[1].split()[0]
        while json.loads(self.sh(f"{STJ} q --json"))[0]["state"] != "running":
            time.sleep(0.2)
        pub = self.sh(f"{STJ} keys show")
        self.sh(f"{STJ} keys add", input=pub)
        ca = self.sh(f"{STJ} pool-ca")
        self.sh(f"{STJ} pool-ca --trust {self.addr} -", input=ca)

    def client(self, remote: bool) -> str:
        return f"{SSH_TO_JOB} -pool {self.addr}" if remote else SSH_TO_JOB

    def setup_time(self, remote: bool) -> float:
        t = time.perf_counter()
        self.sh(f"{self.client(remote)} {self.job} true")
        return time.perf_counter() - t

    def transfer(self, remote: bool, upload: bool) -> tuple[float, float, float]:
        """(MiB/s, broker user and system CPU seconds) of one transfer of ``size`` bytes."""
        c = self.client(remote)
        if upload:
            cmd = f"head -c {self.size} /dev/zero | {c} {self.job} 'cat > /dev/null'"
        else:
            cmd = f"{c} {self.job} 'head -c {self.size} /dev/zero' > /dev/null"
        user, system = cpu_seconds(self.broker_pid)
        t = time.perf_counter()
        self.sh(cmd)
        elapsed = time.perf_counter() - t
        user2, system2 = cpu_seconds(self.broker_pid)
        return self.size / MIB / elapsed, user2 - user, system2 - system

    def close(self) -> None:
        if self.pool is not None and self.pool.poll() is None:
            self.pool.send_signal(signal.SIGTERM)
            try:
                self.pool.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pool.pid, signal.SIGKILL)
                self.pool.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def med(xs: list[float], digits: int = 1) -> str:
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--setups", type=int, default=15)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/relay.py runs as root (it makes a user and runs a pool)", file=sys.stderr)
        return 2
    run = Run(a.size_mib * MIB)
    raw: dict[str, Any] = {"size_mib": a.size_mib, "load": os.getloadavg()}
    try:
        run.start()
        setup: dict[str, list[float]] = {"local": [], "remote": []}
        for _ in range(a.setups):
            for kind in ("local", "remote"):
                setup[kind].append(run.setup_time(kind == "remote") * 1000)
        speed: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        sys_cpu: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            for way in ("upload", "download"):
                for kind in ("local", "remote"):
                    mibs, user, system = run.transfer(kind == "remote", way == "upload")
                    gib = a.size_mib / 1024
                    speed.setdefault(f"{kind} {way}", []).append(mibs)
                    cpu.setdefault(f"{kind} {way}", []).append((user + system) / gib)
                    sys_cpu.setdefault(f"{kind} {way}", []).append(system / gib)
        raw.update(
            setup_ms=setup,
            mib_s=speed,
            broker_cpu_s_per_gib=cpu,
            broker_system_cpu_s_per_gib=sys_cpu,
        )
    finally:
        run.close()
    lines = [
        f"Relay benchmark: {a.size_mib} MiB per transfer, {a.rounds} interleaved rounds, "
        f"{a.setups} set-ups each; load average at start {raw['load'][0]:.2f}.",
        "",
        "| measure | local (fd passing) | remote (-pool, broker relay) | remote / local |",
        "|---|---|---|---|",
        f"| session set-up, ms (median, range) | {med(setup['local'])} | {med(setup['remote'])} "
        f"| {statistics.median(setup['remote']) / statistics.median(setup['local']):.2f} |",
    ]
    for way in ("upload", "download"):
        loc, rem = speed[f"local {way}"], speed[f"remote {way}"]
        ratios = [r / lo for r, lo in zip(rem, loc, strict=True)]
        lines.append(
            f"| {way}, MiB/s | {med(loc)} | {med(rem)} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    for way in ("upload", "download"):
        lines.append(
            f"| broker CPU s per GiB, {way} (system part) | {med(cpu[f'local {way}'], 2)} "
            f"| {med(cpu[f'remote {way}'], 2)} ({med(sys_cpu[f'remote {way}'], 2)}) | |"
        )
    print("\n".join(lines))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
