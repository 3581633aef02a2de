"""The command-line clients fail cleanly: one line, an exit status, never a traceback; and
what they print from the queue cannot drive the user's terminal."""

from __future__ import annotations

import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

import pexpect
from conftest import BIN, SSH_TO_JOB, STJ, Pool, User, wait_for

from ssh_to_job import __version__


def test_version_flags(pool: Pool, users: dict[str, User]) -> None:
    """-version (condor spelling) and --version print the installed version and exit 0."""
    for argv in ([SSH_TO_JOB, "-version"], [SSH_TO_JOB, "--version"], [STJ, "--version"]):
        r = pool.run(users["a"], argv)
        assert r.returncode == 0, r
        assert __version__ in r.stdout, r


def test_a_submit_too_large_for_a_frame_is_one_clear_line(
    pool: Pool, users: dict[str, User]
) -> None:
    """A 1.2 MB environment does not fit a frame: exit 2 and a sentence, not a traceback."""
    # Ten variables of 120 kB: each under the kernel's 128 KiB limit for one argument.
    env = [x for i in range(10) for x in ("-e", f"BIG{i}=" + "x" * 120_000)]
    r = pool.stj(users["a"], "submit", *env, "/bin/true", check=False)
    assert r.returncode == 2, r
    assert "too large" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_control_characters_are_escaped_in_listings(pool: Pool, users: dict[str, User]) -> None:
    """An escape sequence in a job's arguments or hold reason is shown as text in stj q, in
    both views."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sh", "-c", "sleep 300", "\x1b]0;owned\x07\x1b[2J")
    try:
        pool.stj(a, "hold", "--reason", "why\x1b[31mred", job)
        pool.wait_state(job, "held")
        summary = pool.stj(a, "q").stdout
        assert "\x1b" not in summary, repr(summary)
        assert "\x07" not in summary, repr(summary)
        assert "held (1 job): why\\x1b[31mred" in summary, summary
        r = pool.stj(a, "q", "--nobatch")
        assert "\x1b" not in r.stdout, repr(r.stdout)
        assert "\x07" not in r.stdout, repr(r.stdout)
        lines = r.stdout.splitlines()
        at = next(i for i, x in enumerate(lines) if x.startswith(job + " "))
        assert "\\x1b]0;owned\\x07" in lines[at], lines[at]
        assert lines[at + 1].split() == ["hold", "reason:", "why\\x1b[31mred"], lines[at + 1]
        # The reason comes back in stj's own messages too.
        r = pool.stj(a, "hold", "--reason", "\x1b[2J", job, check=False)
        assert "\x1b" not in r.stderr + r.stdout
    finally:
        pool.stj(a, "rm", job, check=False)


def _one_shot_peer(path: pathlib.Path, answer: bytes) -> threading.Thread:
    """A unix-socket peer that reads a request, writes ``answer`` and hangs up."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o666)
    srv.listen(1)
    srv.settimeout(20)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)
                if answer:
                    conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_a_broker_that_dies_mid_request_is_one_line(
    tmp_path: pathlib.Path, pool: Pool, users: dict[str, User]
) -> None:
    """A broker that hangs up, or answers garbage, gives stj exit 1 and a sentence."""
    tmp_path.chmod(0o755)
    for answer, says in ((b"", "closed the connection"), (b"\0\0\0\3{x}", "unreadable")):
        sock = tmp_path / f"b{len(answer)}.sock"
        t = _one_shot_peer(sock, answer)
        r = pool.run(users["root"], [STJ, "status", "--name", str(sock)], timeout=30)
        t.join(5)
        assert r.returncode == 1, r
        assert says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr, r.stderr


def test_a_squatted_runtime_dir_does_not_lock_the_user_out(
    pool: Pool, users: dict[str, User]
) -> None:
    """With XDG_RUNTIME_DIR unset, another user who creates our predictable directory first
    neither blocks ssh-to-job nor gets our session files, and nothing of ours is left there."""
    a, b = users["a"], users["b"]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="stjsq-", dir="/tmp"))
    try:
        tmp.chmod(0o1777)
        squat = tmp / f"ssh-to-job-{a.uid}"
        r = pool.run(b, ["mkdir", "-m", "0777", str(squat)])
        assert r.returncode == 0, r
        (job,) = pool.submit(a, "/bin/sleep", "300")
        pool.wait_state(job, "running")
        r = pool.ssh(a, job, "id -u", env={"TMPDIR": str(tmp)})
        assert (r.returncode, r.stdout.strip()) == (0, str(a.uid)), r
        assert list(squat.iterdir()) == []
        assert sorted(p.name for p in tmp.iterdir()) == [squat.name]
        pool.stj(a, "rm", job)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_help_texts_and_one_job(pool: Pool, users: dict[str, User]) -> None:
    """Every submit and pool option says what it does; a listing of one job says "1 job"."""
    a = users["a"]
    text = pool.stj(a, "submit", "--help").stdout
    for flag, words in (
        ("--count", "how many jobs"),
        ("--env", "environment variable"),
        ("--initialdir", "working directory"),
    ):
        assert flag in text
        assert words in text, (flag, text)
    assert "how many jobs run at once" in pool.stj(a, "pool", "--help").stdout
    (job,) = pool.submit(a, "/bin/sleep", "300")
    try:
        pool.wait_state(job, "running")
        last = pool.stj(a, "q", job).stdout.splitlines()[-1]
        assert last == "1 job: 1 running", last
    finally:
        pool.stj(a, "rm", job)


def test_submit_interactive_runs_the_command_in_the_job_and_removes_it(
    pool: Pool, users: dict[str, User]
) -> None:
    """stj submit -i CMD waits for the job, runs CMD inside it as the owner, in the job's
    directory and environment, exits with CMD's status and removes the job afterwards."""
    a = users["a"]
    r = pool.stj(
        a,
        "submit",
        "-i",
        "-e",
        "COLOR=teal",
        "/bin/sh",
        "-c",
        'echo "in=$SSH_TO_JOB_ID uid=$(id -u) color=$COLOR dir=$PWD"; exit 3',
        check=False,
    )
    assert r.returncode == 3, r
    job = r.stderr.split("submitted job ")[1].split()[0]
    assert f"in={job} uid={a.uid} color=teal dir=" in r.stdout, r.stdout
    done = pool.wait_state(job, "removed")
    assert "session ended" in done["hold_reason"]


def test_submit_interactive_keep(pool: Pool, users: dict[str, User]) -> None:
    """With --keep the job stays running after the session, for later sessions."""
    a = users["a"]
    r = pool.stj(a, "submit", "-i", "--keep", "/bin/true", check=False)
    assert r.returncode == 0, r
    job = r.stderr.split("submitted job ")[1].split()[0]
    try:
        assert pool.job(job)["state"] == "running"
        r = pool.ssh(a, job, "echo again")
        assert (r.returncode, r.stdout) == (0, "again\n"), r
    finally:
        pool.stj(a, "rm", job)


def test_submit_interactive_interrupted_while_waiting_removes_the_job(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """Ctrl-C while the job waits for a slot removes it and exits 130."""
    a = users["a"]
    pool = make_pool(slots=1)
    (busy,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(busy, "running")
    proc = subprocess.Popen(
        [*a.prefix(), STJ, "submit", "-i", "/bin/true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pool.env(a),
        cwd="/tmp",
    )
    job = wait_for("the -i job to be queued", lambda: [j for j in pool.jobs() if j != busy])[0]
    assert pool.job(job)["state"] == "idle"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert f"job {job} removed" in err
    assert pool.job(job)["state"] == "removed"


def test_submit_interactive_gives_a_shell_in_a_pty(pool: Pool, users: dict[str, User]) -> None:
    """stj submit -i with no command: a login shell on a terminal inside the job; exiting it
    ends and removes the job."""
    a = users["a"]
    argv = [*a.prefix(), STJ, "submit", "-i"]
    child = pexpect.spawn(
        argv[0],
        argv[1:],
        env=pool.env(a, {"TERM": "dumb", "PS1": "$ "}),
        cwd="/tmp",
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )
    try:
        child.expect(r"submitted job (\d+\.0)")
        job = child.match.group(1)
        child.expect(r"\$ ")
        child.sendline('echo "tty=$(tty) id=$SSH_TO_JOB_ID"')
        child.expect(r"tty=(/dev/pts/\d+) id=(\S+)")
        assert child.match.group(2) == job
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert pool.wait_state(job, "removed")["state"] == "removed"


def test_the_front_starts_python_isolated_and_without_site(tmp_path: pathlib.Path) -> None:
    """The compiled front runs the Python client with -I -S: no site module, no sitecustomize
    and no PYTHONPATH (3-5 ms of every cold session, and nothing from the environment); the
    client script run directly still gets them (the control that the probe works)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    marker = tmp_path / "site-ran"
    (probe / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(probe), "HOME": str(tmp_path)}
    r = subprocess.run(
        [SSH_TO_JOB, "-version"], capture_output=True, text=True, env=env, check=False
    )
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.startswith("ssh-to-job "), r
    assert not marker.exists()
    r = subprocess.run(
        [str(BIN / "ssh-to-job-py"), "-version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r
    assert marker.exists()


def test_stj_is_the_front_built_for_the_cli(tmp_path: pathlib.Path) -> None:
    """``stj`` is the compiled front built with CLI_ONLY: it runs ``stj-py`` isolated as the
    ``ssh-to-job`` front runs its client (no sitecustomize, no PYTHONPATH) and passes every
    argument and the exit status through; ``stj-py`` run directly is the control."""
    assert pathlib.Path(STJ).read_bytes()[:4] == b"\x7fELF"
    probe = tmp_path / "probe"
    probe.mkdir()
    marker = tmp_path / "site-ran"
    (probe / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(probe), "HOME": str(tmp_path)}
    r = subprocess.run([STJ, "--version"], capture_output=True, text=True, env=env, check=False)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.startswith("stj "), r
    assert not marker.exists()
    r = subprocess.run(
        [STJ, "no-such-command"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 2, r
    assert "no-such-command" in r.stderr
    assert not marker.exists()
    r = subprocess.run([STJ, "pool", "--help"], capture_output=True, text=True, env=env, check=True)
    assert "usage: stj pool" in r.stdout
    r = subprocess.run(
        [str(BIN / "stj-py"), "--version"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0, r
    assert marker.exists()
