"""The README's main command: a personal pool, a running job, and a session into it.

Runs the installed ``stj`` and ``ssh-to-job`` exactly as a user would type them, and prints
each command before its output. As root it makes a demo user (jobs never run as root); as an
ordinary user it uses you. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

BIN = pathlib.Path(sys.executable).parent
DEMO_USER = "stjdemo"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ssh-to-job demo")
    ap.add_argument("--state-dir", help="pool state directory (default: a fresh one in /tmp)")
    ap.add_argument(
        "--interactive",
        action="store_true",
        help="end with an interactive shell in the job (needs a terminal)",
    )
    a = ap.parse_args(argv)

    if os.getuid() == 0:
        try:
            pw = pwd.getpwnam(DEMO_USER)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", DEMO_USER], check=True)
            pw = pwd.getpwnam(DEMO_USER)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    else:
        pw = pwd.getpwuid(os.getuid())
        prefix = []
    state = pathlib.Path(a.state_dir or tempfile.mkdtemp(prefix="stj-demo-", dir="/tmp"))
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "STJ_STATE_DIR": str(state),
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb"),
    }

    def run(*argv: str, as_user: bool = True, check: bool = True) -> str:
        shown = " ".join(shlex.quote(x) for x in argv)
        print(f"\n{'$' if as_user else '#'} {shown}", flush=True)
        r = subprocess.run(
            [*(prefix if as_user else []), *argv],
            env=env,
            cwd="/tmp",
            capture_output=True,
            text=True,
            timeout=120,
        )
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        if check and r.returncode != 0:
            raise SystemExit(f"demo: {argv[0]} failed with status {r.returncode}")
        return r.stdout

    log = open(state / "pool.log", "ab")
    print(f"# stj pool --state-dir {state}    (broker + starter; log in {state}/pool.log)")
    pool = subprocess.Popen(
        [str(BIN / "stj"), "pool", "--state-dir", str(state)],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        for _ in range(100):
            r = subprocess.run(
                [str(BIN / "stj"), "status", "--json"], env=env, capture_output=True, text=True
            )
            if r.returncode == 0 and json.loads(r.stdout)["starters"]:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("demo: the pool did not come up; see " + str(state / "pool.log"))
        run("stj", "status", as_user=False)
        script = (
            'echo "job $SSH_TO_JOB_ID starts in $PWD"; i=0; while :; do i=$((i+1)); '
            'echo "tick $i" > progress.txt; sleep 1; done'
        )
        out = run(
            "stj",
            "submit",
            "-e",
            "GREETING=hello from the job's environment",
            "/bin/sh",
            "-c",
            script,
        )
        job = out.split(":", 1)[1].split()[0]
        for _ in range(100):
            q = json.loads(run_quiet(env, "q", "--json", job))
            if q and q[0]["state"] == "running" and q[0]["pids"]:
                break
            time.sleep(0.1)
        time.sleep(1.2)
        run("stj", "q")
        run(
            "ssh-to-job",
            job,
            'echo "I am $(id -un) (uid $(id -u)) in $PWD"; echo "GREETING=$GREETING"; '
            'echo "job pids: $SSH_TO_JOB_PIDS"; ps -o pid,user,args -p "${SSH_TO_JOB_PIDS%% *}"; '
            "cat progress.txt",
        )
        dest = pathlib.Path(tempfile.mkdtemp(prefix="stj-demo-copy-", dir="/tmp"))
        os.chown(dest, pw.pw_uid, pw.pw_gid)
        run("ssh-to-job", "-ssh", "scp", job, "remote:progress.txt", str(dest))
        print(f"(copied: {(dest / 'progress.txt').read_text().strip()})")
        shutil.rmtree(dest, ignore_errors=True)
        if a.interactive and sys.stdin.isatty():
            print(f"\n$ ssh-to-job {job}    (an interactive shell in the job; 'exit' to leave)")
            subprocess.run([*prefix, str(BIN / "ssh-to-job"), job], env=env, check=False)
        run("stj", "rm", job)
        run("stj", "history")
        print("\ndemo: done. Everything above ran real sshd/ssh/scp; no port was opened for it.")
        return 0
    finally:
        pool.terminate()
        try:
            pool.wait(15)
        except subprocess.TimeoutExpired:
            pool.kill()
        log.close()
        if not a.state_dir:
            shutil.rmtree(state, ignore_errors=True)


def run_quiet(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [str(BIN / "stj"), *args], env=env, capture_output=True, text=True, check=True
    ).stdout


if __name__ == "__main__":
    sys.exit(main())
