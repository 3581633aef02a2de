"""``ssh-to-job slurm:N`` against ``srun --jobid=N --overlap``, in one run, on this machine.

Runs as root. Starts the test suite's throw-away Slurm cluster (tests/slurm.py: private
slurm.conf, munged, slurmctld, slurmd), a personal pool whose broker serves ``slurm:`` ids and
whose starter is in Slurm mode, submits ``sleep`` as the bench user, then, interleaved round by
round so that load from elsewhere hits both: the first command into the job (cold), ten repeat
``true`` commands, and a 1 GiB stream out of the job (``head -c 1G /dev/zero``). Prints a
Markdown table (median and spread over the rounds) and removes everything it started.

Not measured here (yet): plain ssh through pam_slurm_adopt (see docs/performance.md).
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

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from slurm import Cluster  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
USER = "stjbench"
GIB = 1 << 30


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
        return pwd.getpwnam(USER)


def _timed(argv: list[str], env: dict[str, str], stdout: int | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(
        argv, env=env, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/tmp"
    )
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed: {r.stderr.decode()[-300:]}")
    return dt


def _spread(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:.3f} ({min(xs):.3f}–{max(xs):.3f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bytes", type=int, default=GIB)
    a = ap.parse_args(argv)
    if os.getuid() != 0:
        print("slurm_compare: run as root", file=sys.stderr)
        return 2
    pw = _user()
    top = pathlib.Path("/tmp") / f"stjbench-slurm-{secrets.token_hex(4)}"
    top.mkdir(mode=0o755)
    cluster = Cluster(top / "slurm")
    pool: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        state = top / "pool"
        state.mkdir(mode=0o755)
        (state / "config.toml").write_text(
            f'[broker]\nslurm = true\nslurm_conf = "{cluster.conf}"\n'
            f'[starter]\nbackend = "slurm"\nname = "{cluster.nodes[0]}"\n'
            f'slurm_conf = "{cluster.conf}"\n'
        )
        root_env = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "STJ_STATE_DIR": str(state),
            "STJ_CONFIG": str(state / "config.toml"),
            "LANG": "C.UTF-8",
        }
        with open(state / "pool.log", "ab") as log:
            pool = subprocess.Popen(
                [f"{BIN}/stj", "pool", "--state-dir", str(state)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=root_env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(
                [f"{BIN}/stj", "status", "--json"], capture_output=True, text=True, env=root_env
            )
            if r.returncode == 0 and any(s["connected"] for s in json.loads(r.stdout)["starters"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the pool's starter did not connect")
            time.sleep(0.2)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        jid = cluster.sbatch(prefix, "-D", "/tmp", "-o", "/dev/null", "--wrap", "sleep 3600")
        cluster.wait_running(jid)
        env = {
            **root_env,
            "HOME": pw.pw_dir,
            "USER": USER,
            "LOGNAME": USER,
            "SHELL": "/bin/bash",
            "SLURM_CONF": str(cluster.conf),
        }
        cmds = {
            "ssh-to-job slurm:N": [*prefix, f"{BIN}/ssh-to-job", f"slurm:{jid}"],
            "srun --jobid=N --overlap": [*prefix, "srun", f"--jobid={jid}", "--overlap"],
        }
        res: dict[str, dict[str, list[float]]] = {
            k: {"cold": [], "ten": [], "mib_s": []} for k in cmds
        }
        for _ in range(a.rounds):
            for name, base in cmds.items():
                res[name]["cold"].append(_timed([*base, "true"], env))
                res[name]["ten"].append(sum(_timed([*base, "true"], env) for _ in range(10)))
                dt = _timed([*base, "head", "-c", str(a.bytes), "/dev/zero"], env)
                res[name]["mib_s"].append(a.bytes / (1 << 20) / dt)
        print(
            f"Slurm {cluster.run(['sinfo', '-V']).stdout.strip()}, {cluster.proctrack}, "
            f"{a.rounds} rounds, {a.bytes >> 20} MiB stream; median (min–max)\n"
        )
        print("| command | first `true` (s) | ten `true` (s) | stream (MiB/s) |")
        print("|---|---|---|---|")
        for name, v in res.items():
            print(
                f"| {name} | {_spread(v['cold'])} | {_spread(v['ten'])} | "
                f"{_spread(v['mib_s']).replace('.000', '')} |"
            )
        return 0
    finally:
        if pool is not None and pool.poll() is None:
            pool.send_signal(signal.SIGTERM)
            try:
                pool.wait(15)
            except subprocess.TimeoutExpired:
                pool.kill()
                pool.wait()
        cluster.stop()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
