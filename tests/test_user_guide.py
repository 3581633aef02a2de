"""docs/user.md, tried as written: every command of its ``sh`` blocks, in order, by a new user.

The user (``stjtug``, with a home of its own) starts its personal pool with ``stj pool &`` as the
guide says and runs each command through bash in its home, the guide's job ids replaced by the
ones its own submits got. The steps below are the guide's commands word for word; a test checks
they are exactly the commands the guide's ``sh`` blocks hold, so the guide and this walk-through
cannot drift apart. Interactive commands (a login, sftp, ``stj submit -i``, ``--persist``) run
in a real pty (pexpect).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pexpect
import pytest
from conftest import STJ, User, _ensure_user, wait_for

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "user.md"
TIMEOUT = 30
#: Sections whose commands need more than one host; they are tried by their own tests.
ELSEWHERE: dict[str, str] = {}
#: Commands that cannot run here, and why.
CANNOT: dict[str, str] = {
    "ssh-to-job -X 32.0 xterm": "no X server or xterm on the test host (X11 requests: "
    "test_session_records.py)",
}


def guide_commands(text: str) -> list[tuple[str, str]]:
    """(section heading, command) for each command of the guide's ``sh`` blocks and each
    example of its option tables, in order: comments dropped, ``a ; b`` split in two, output
    examples (lines that are all comment) left out."""
    out: list[tuple[str, str]] = []
    heading = ""
    in_sh = False
    for line in text.splitlines():
        if not in_sh and line.startswith("#"):
            heading = line.lstrip("#").strip()
            continue
        example = _TABLE_EXAMPLE.match(line)
        if not in_sh and example:
            out.append((heading, example[1]))
            continue
        if line.startswith("```"):
            in_sh = not in_sh and line.strip() == "```sh"
            continue
        if not in_sh or line.lstrip().startswith("#") or not line.strip():
            continue
        for part in _strip_comment(line).split(" ; "):
            if part.strip():
                out.append((heading, part.strip()))
    return out


#: A row of an options table whose example column is one command.
_TABLE_EXAMPLE = re.compile(r"\| [^|]+ \| `((?:ssh-to-job|stj) [^`]*)` \|")


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


class Walk:
    """The new user, its pool and the jobs the guide's ids stand for."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.home = pathlib.Path(user.home)
        self.ids: dict[str, str] = {}
        self.pool: subprocess.Popen[bytes] | None = None
        self.env = {
            "PATH": f"{os.path.dirname(STJ)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": user.home,
            "USER": str(user.name),
            "LOGNAME": str(user.name),
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "TERM": "xterm",
        }

    def sub(self, cmd: str) -> str:
        """The command with the guide's job ids (and its example paths/ports) made real."""
        for path, real in (("/srv/pool", str(self.state)), ("8888", str(self.port))):
            cmd = cmd.replace(path, real)
        cmd = re.sub(r"job-(\d+)", lambda m: "job-" + self.ids.get(m[1], m[1]), cmd)
        return re.sub(
            r"(?<![\w./=~-])(\d+)(?=(?:\.\d+)*(?:[\s:'\"]|$))",
            lambda m: self.ids.get(m[1], m[1]),
            cmd,
        )

    @property
    def state(self) -> pathlib.Path:
        return self.home / ".local/state/ssh-to-job"

    port = 0

    def bash(
        self, cmd: str, input: str | None = None, raw: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command of the guide (``raw``: one with real job ids) in bash, as the user."""
        r = subprocess.run(
            [*self.user.prefix(), "/bin/bash", "-c", cmd if raw else self.sub(cmd)],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
            input=input,
            check=False,
        )
        return r

    def ok(self, cmd: str, input: str | None = None, raw: bool = False) -> str:
        r = self.bash(cmd, input, raw)
        assert r.returncode == 0, (
            f"{cmd!r} -> {self.sub(cmd)!r} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        )
        return r.stdout

    def pty(self, cmd: str, raw: bool = False) -> Any:
        return pexpect.spawn(
            self.user.prefix()[0] if self.user.prefix() else "/bin/bash",
            [*self.user.prefix()[1:], "/bin/bash", "-c", cmd if raw else self.sub(cmd)],
            env=self.env,
            cwd=str(self.home),
            encoding="utf-8",
            timeout=TIMEOUT,
            dimensions=(30, 120),
        )

    def submitted(self, cmd: str, doc_cluster: str) -> list[str]:
        out = self.ok(cmd)
        m = re.search(r"to cluster (\d+): ([0-9. ]+)", out)
        assert m, out
        self.ids[doc_cluster] = m[1]
        return m[2].split()

    def job(self, jid: str) -> dict[str, Any]:
        jobs: list[dict[str, Any]] = json.loads(self.ok(f"stj q --json {jid}", raw=True))
        return jobs[0] if jobs else {}

    def wait(self, jid: str, state: str) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            job = self.job(jid)
            return job if job.get("state") == state else None

        try:
            return wait_for(f"{jid} {state}", probe)
        except AssertionError as exc:
            exc.add_note(self.ok("stj q") + self.ok(f"stj history {jid}", raw=True))
            raise


def _interact(child: Any, typed: str, expect: str) -> None:
    child.sendline(typed)
    child.expect(expect)


def _detach(child: Any) -> None:
    child.send("\x02d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _steps(w: Walk) -> list[tuple[str, Callable[[str], object]]]:
    """The guide's commands (exactly as written) and how each is tried and checked."""

    def pool(cmd: str) -> None:
        w.pool = subprocess.Popen(
            [*w.user.prefix(), "/bin/bash", "-c", cmd.rstrip("&").strip()],
            env=w.env,
            cwd=w.home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(
            "the personal pool's starter",
            lambda: (
                (r := w.bash("stj status --json")).returncode == 0
                and any(s["connected"] for s in json.loads(r.stdout)["starters"])
            ),
            timeout=TIMEOUT,
        )

    def submit_7(cmd: str) -> None:
        assert len(w.submitted(cmd, "7")) == 1

    def submit_8(cmd: str) -> None:
        ids = w.submitted(cmd, "8")
        assert len(ids) == 3
        job = w.wait(ids[0], "running")
        env = pathlib.Path(f"/proc/{job['pids'][0]}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=4" in env

    def submit_file(cmd: str) -> None:
        assert len(w.submitted(cmd, "9")) == 4

    def q(cmd: str) -> None:
        rows = [line.split() for line in w.ok(cmd).splitlines() if line.strip()]
        assert rows[0][0] == "CLUSTER", rows
        # One line per cluster: cluster 8's three jobs counted (TOTAL, after the two words of
        # SUBMITTED) on one line.
        (row,) = [r for r in rows if r[0] == w.ids["8"]]
        assert row[8] == "3", row

    def q_nobatch(cmd: str) -> None:
        out = w.ok(cmd)
        assert all(f"{w.ids['8']}.{i}" in out for i in range(3)), out

    def q_json(cmd: str) -> None:
        jobs = json.loads(w.ok(cmd))
        assert [j["id"] for j in jobs] == [f"{w.ids['8']}.{i}" for i in range(3)]

    def hold(cmd: str) -> None:
        w.ok(cmd)
        job = w.job(w.sub("8.2"))
        assert (job["state"], "look at it later" in job["hold_reason"]) == ("held", True)

    def rm_8(cmd: str) -> None:
        w.ok(cmd)
        assert w.job(w.sub("8.0")) == {}
        # Not in the guide: free the slots for what follows.
        w.ok(f"stj rm {w.ids['7']} {w.ids['9']}", raw=True)

    def submit_i(cmd: str) -> None:
        child = w.pty(cmd)
        _interact(child, 'echo "in:$SSH_TO_JOB_ID:$((20+22))"', r"in:(\d+\.0):42")
        jid = child.match[1]
        child.sendline("exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        if "--keep" in cmd:
            assert w.job(jid)["state"] == "running"
            w.ok(f"stj rm {jid}", raw=True)
        else:
            assert w.job(jid) == {}

    def submit_i_cmd(cmd: str) -> None:
        assert w.ok(cmd).strip() == "run.sh /scratch --small"

    def flaky(cmd: str) -> None:
        (jid,) = w.submitted(cmd, "41")
        w.wait(jid, "held")

    def look(cmd: str) -> None:
        assert "boom" in w.ok(cmd)

    def release(cmd: str) -> None:
        w.ok(cmd)
        w.wait(w.sub("41.0"), "held")  # it failed again, and is kept again

    def time_limit(cmd: str) -> None:
        w.submitted(cmd, "52")

    def q_again(cmd: str) -> None:
        rows = [line.split() for line in w.ok(cmd).splitlines() if line.strip()]
        assert any(r[0] == w.ids["52"] for r in rows[1:]), rows

    def q_nobatch_52(cmd: str) -> None:
        assert f"{w.ids['52']}.0" in w.ok(cmd)
        w.ok(f"stj rm {w.ids['52']}", raw=True)  # not in the guide: its slot is needed

    def need_32() -> None:
        """Not in the guide: the job its sessions go into, with files to copy."""
        if "32" in w.ids:
            return
        (jid,) = w.submitted(
            "stj submit /bin/sh -c 'echo data > out.dat; mkdir -p out results; "
            "echo o > out/o.txt; echo r > results/r.txt; echo first line > log.txt; "
            "exec sleep 600'",
            "32",
        )
        w.wait(jid, "running")
        wait_for("its files", lambda: w.bash("ssh-to-job 32 test -e out/o.txt").returncode == 0)

    def scp_down(cmd: str) -> None:
        w.ok(cmd)
        assert (w.home / "out.dat").read_text() == "data\n"

    def scp_up(cmd: str) -> None:
        w.ok(cmd)
        where = "inbox/" if "inbox" in cmd else ""
        assert w.ok(f"ssh-to-job 32 'cat \"{where}local file.txt\"'") == "local\n"

    def scp_r(cmd: str) -> None:
        w.ok(cmd)
        assert (w.home / "results/r.txt").read_text() == "r\n"

    def sftp(cmd: str) -> None:
        child = w.pty(cmd)
        _interact(child, "ls", r"sftp> ")
        child.expect("out.dat")
        child.sendline("bye")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0

    def sftp_batch(cmd: str) -> None:
        (w.home / "out.dat").unlink()
        w.ok(cmd)
        assert (w.home / "out.dat").read_text() == "data\n"

    def rsync(cmd: str) -> None:
        shutil.rmtree(w.home / "out", ignore_errors=True)
        w.ok(cmd)
        if "./in/" in cmd:
            assert w.ok("ssh-to-job 32 cat in/i.txt") == "i\n"
        else:
            assert (w.home / "out/o.txt").read_text() == "o\n"

    def ssh_config(cmd: str) -> None:
        w.ok(cmd)
        assert "Host job-" in (w.home / ".ssh/config").read_text()

    def ssh_job(cmd: str) -> None:
        child = w.pty(cmd)
        _interact(child, 'echo "via:$SSH_TO_JOB_ID"', rf"via:{w.ids['32']}\.0")
        child.sendline("exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0

    def ssh_forward(cmd: str) -> None:
        # Both ends are on this one host: the job's server needs a port of its own.
        there = _free_port()
        child = w.pty(cmd.replace("8888:localhost:8888", f"8888:localhost:{there}"))
        try:
            listen = (
                f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {there})); "
                "s.listen(); c, _ = s.accept(); c.sendall(b'fwd\\n')"
            )
            child.sendline(f'timeout 20 /usr/bin/python3 -c "{listen}" &')
            got = wait_for("the forward", lambda: _read_port(w.port), timeout=20)
            assert got == b"fwd\n"
            child.sendline("exit")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)

    def login(cmd: str) -> None:
        need_32()
        child = w.pty(cmd)
        try:
            child.expect(r"welcome to job [0-9.]+ on")
            if '"ssh -A"' in cmd:
                child.expect("agent forwarding is off in this pool")
            _interact(child, 'echo "login:$SSH_TO_JOB_ID:$((3*3))"', r"login:[0-9.]+:9")
            child.sendline("exit")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 0

    def tail_f(cmd: str) -> None:
        need_32()
        child = w.pty(cmd)
        try:
            child.expect("first line")
        finally:
            child.close(force=True)

    def no_pool(cmd: str) -> None:
        # A remote pool whose CA this user never trusted: one line, nothing trusted on first use.
        r = w.bash(cmd)
        assert r.returncode == 1, r
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("ssh-to-job: no pool CA for cm.example.org:9620"), r

    def auto_retry(cmd: str) -> None:
        (jid,) = w.submitted("stj submit /bin/sleep 600", "33")
        login(cmd)  # idle at first, or already running: either way it gets in
        w.ok(f"stj rm {jid}", raw=True)

    def remove_on_interrupt(cmd: str) -> None:
        (jid,) = w.submitted("stj submit /bin/sleep 600", "removed")
        w.wait(jid, "running")
        # A job of its own, not the 32.0 the rest of the guide uses.
        child = w.pty(w.sub(cmd).replace(f"{w.ids['32']}.0", jid), raw=True)
        try:
            child.expect("welcome to job")
            os.kill(child.pid, signal.SIGTERM)
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert w.job(jid) == {}

    def debug(cmd: str) -> None:
        r = w.bash(cmd)
        assert (r.returncode, "ssh-to-job: asking broker" in r.stderr) == (0, True), r

    def persist(cmd: str) -> None:
        need_32()
        child = w.pty(cmd)
        _interact(child, "P=kept; echo in-tmux-$((1+2))", "in-tmux-3")
        _detach(child)

    def persist_ls(cmd: str) -> None:
        names = {line.split(":")[0] for line in w.ok(cmd).splitlines()}
        assert names == {"main", "build"}

    return [
        ("stj pool &", pool),
        ("stj submit /bin/sleep 600", submit_7),
        ("stj submit -n 3 -e OMP_NUM_THREADS=4 -d ~/run ./simulate --steps 1000", submit_8),
        ("stj submit -f job.toml", submit_file),
        ("stj q", q),
        ("stj q --nobatch", q_nobatch),
        ("stj q --json 8", q_json),
        ("stj history", w.ok),
        ("stj history --sessions 8.0", w.ok),
        ("stj output 8.1", w.ok),
        ("stj output --stderr 8.1", w.ok),
        ('stj hold 8.2 --reason "look at it later"', hold),
        ("stj release 8.2", w.ok),
        ("stj suspend 8.0", w.ok),
        ("stj continue 8.0", w.ok),
        ("stj rm 8", rm_8),
        ("stj status", w.ok),
        ("stj submit -i", submit_i),
        ("stj submit -i -e DATA=/scratch ./run.sh --small", submit_i_cmd),
        ("stj submit -i --keep", submit_i),
        ("ssh-to-job 32.0", login),
        ("ssh-to-job 32.0 'tail -f log.txt'", tail_f),
        ("ssh-to-job -name /srv/pool 32.0", login),
        ("ssh-to-job -pool cm.example.org:9620 32.0", no_pool),
        ("ssh-to-job -ssh sftp 32.0", sftp),
        ('ssh-to-job -keygen-options "-t rsa -b 3072" 32.0', login),
        ("ssh-to-job -shells zsh,bash 32.0", login),
        ("ssh-to-job -auto-retry 33.0", auto_retry),
        ("ssh-to-job -remove-on-interrupt 32.0", remove_on_interrupt),
        ('ssh-to-job -ssh "ssh -A" 32.0', login),
        ("ssh-to-job --persist 32.0", persist),
        ("ssh-to-job --persist-name build 32.0", persist),
        ("ssh-to-job -debug 32.0 true", debug),
        ("ssh-to-job -help", lambda cmd: "usage:" in w.ok(cmd) or pytest.fail(cmd)),
        ("ssh-to-job -version", lambda cmd: "ssh-to-job " in w.ok(cmd) or pytest.fail(cmd)),
        ("ssh-to-job --persist 32.0", persist),
        ("ssh-to-job --persist-name build 32.0", persist),
        ("ssh-to-job 32.0 'tmux -N -S \"$SSH_TO_JOB_TMUX\" ls'", persist_ls),
        ("stj submit --hold-on-failure ./flaky.sh", flaky),
        ("ssh-to-job 41.0 'cat core.log; ls -l'", look),
        ("stj release 41.0", release),
        ("stj rm 41.0", w.ok),
        ("stj submit --time-limit 2h --debug-on timeout,signal ./train.py", time_limit),
        ("stj q", q_again),
        ("stj q --nobatch 52", q_nobatch_52),
        ("ssh-to-job -ssh scp 32 remote:out.dat .", scp_down),
        ('ssh-to-job -ssh scp 32 "local file.txt" remote:', scp_up),
        ("ssh-to-job 32 mkdir -p inbox", w.ok),
        ('ssh-to-job -ssh scp 32 "local file.txt" remote:inbox/', scp_up),
        ('ssh-to-job -ssh "scp -r" 32 remote:results ./results', scp_r),
        ("ssh-to-job -ssh sftp 32.0", sftp),
        ('echo "get out.dat" | ssh-to-job -ssh "sftp -b -" 32.0', sftp_batch),
        ("rsync -av -e ssh-to-job 32.0:out/ ./out/", rsync),
        ("rsync -av -e ssh-to-job ./in/ 32.0:in/", rsync),
        ('rsync -av -e "ssh-to-job -name /srv/pool" 32.0:out/ ./out/', rsync),
        ("stj ssh-config >> ~/.ssh/config", ssh_config),
        ("ssh job-32.0", ssh_job),
        ("ssh -L 8888:localhost:8888 job-32.0", ssh_forward),
    ]


def _read_port(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(100) or None
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def walk(users: dict[str, User]) -> Iterator[Walk]:
    """A new user with a clean home, the files the guide's examples use, and (afterwards) its
    pool stopped."""
    user = _ensure_user("stjtug")
    home = pathlib.Path(user.home)
    for leftover in (".ssh", ".local/state/ssh-to-job", ".config/ssh-to-job", "run", "in"):
        shutil.rmtree(home / leftover, ignore_errors=True)
    for name in os.listdir(home):
        if not name.startswith("."):
            shutil.rmtree(home / name, ignore_errors=True)
    w = Walk(user)
    w.port = _free_port()
    files = {
        "run/simulate": "#!/bin/sh\nexec sleep 600\n",
        "run/train.py": "import time\ntime.sleep(600)\n",
        "run.sh": '#!/bin/sh\necho "run.sh $DATA $1"\n',
        "flaky.sh": "#!/bin/sh\necho boom > core.log\nexit 3\n",
        "train.py": "#!/usr/bin/python3\nimport time\ntime.sleep(600)\n",
        "local file.txt": "local\n",
        "in/i.txt": "i\n",
        "job.toml": _job_toml(home),
    }
    for rel, body in files.items():
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        path.chmod(0o755)
    (home / ".ssh").mkdir(mode=0o700)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(home)], check=True)
    try:
        yield w
    finally:
        if w.pool is not None:
            # A pool keeps its jobs across a stop (keep_jobs_on_stop): end the walk's jobs
            # first, so that no job, and no job's tmux server, outlives the test.
            r = w.bash("stj q --json", raw=True)
            live = {j["id"].split(".")[0] for j in json.loads(r.stdout or "[]")}
            if live:
                w.bash("stj rm " + " ".join(sorted(live)), raw=True)
                wait_for(
                    "the walk's jobs to end",
                    lambda: json.loads(w.bash("stj q --json", raw=True).stdout or "[]") == [],
                    30,
                )
            os.killpg(w.pool.pid, signal.SIGTERM)
            try:
                w.pool.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(w.pool.pid, signal.SIGKILL)
                w.pool.wait()


def _job_toml(home: pathlib.Path) -> str:
    """The guide's submit file, its example directory made this user's."""
    text = GUIDE.read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    return block.replace("/home/alice/run", str(home / "run"))


def test_steps_are_the_guides_commands() -> None:
    """The walk-through's steps are exactly the commands of docs/user.md's sh blocks, in order."""
    # Any Walk will do: only the step names are compared.
    steps = [cmd for cmd, _ in _steps(Walk(User("x", 0, 0, "/root")))]
    doc = [cmd for heading, cmd in guide_commands(GUIDE.read_text()) if heading not in ELSEWHERE]
    assert set(CANNOT) <= set(doc)
    assert steps == [cmd for cmd in doc if cmd not in CANNOT]


def test_strip_comment_keeps_quoted_hashes() -> None:
    """A '#' inside quotes or a word is not a comment; one after a space is."""
    assert _strip_comment("echo '# x' \"a#b\" c#d # note") == "echo '# x' \"a#b\" c#d"
    assert shlex.split(_strip_comment("stj q   # the queue")) == ["stj", "q"]


def test_user_guide_as_written(walk: Walk) -> None:
    """Every command of docs/user.md, run as written by a new user in its own pool, works."""
    for cmd, check in _steps(walk):
        started = time.monotonic()
        try:
            check(cmd)
        except BaseException as exc:
            exc.add_note(f"user guide step: {cmd!r} (run as {walk.sub(cmd)!r})")
            raise
        assert time.monotonic() - started < TIMEOUT * 2
