"""Repeat commands through one OpenSSH ControlMaster per (user, pool, job): the first command
is a full session, later ones reuse it without the broker; the master is the user's alone,
ends with the job, and the pool can turn it off."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import BIN, Pool, User, wait_for

from ssh_to_job.client import _mux


def _master(pool: Pool, user: User, job: str) -> pathlib.Path:
    """Where ``user``'s master for ``job`` in ``pool`` lives (the pool env's TMPDIR, /tmp)."""
    base = pathlib.Path("/tmp") / f"ssh-to-job-{user.uid}"
    return _mux.socket_path(base, str(pool.state / "broker.sock"), job, ("/bin/bash",))


#: The client's own switch, which conftest's pools turn off for the other tests.
MUX = {"SSH_TO_JOB_MUX": "1"}


def _granted(pool: Pool, user: User, job: str) -> list[dict[str, Any]]:
    rows = json.loads(pool.stj(user, "history", "--sessions", "--json", job).stdout)
    return [r for r in rows if r["outcome"] == "granted"]


def _session_of(pool: Pool, user: User, job: str) -> str:
    """The id of the sshd session a command ran in (the starter's SSH_TO_JOB_SESSION)."""
    r = pool.ssh(user, job, "echo $SSH_TO_JOB_SESSION", env=MUX)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_repeat_commands_skip_the_broker_and_files_still_copy(
    pool: Pool, users: dict[str, User]
) -> None:
    """The second and later commands (ssh, scp, sftp, rsync) run in the first command's session:
    one granted session record, one sshd; the socket is the user's, in a 0700 directory; a
    command with -keygen-options gets a full session; and `stj rm` ends the master."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    sock = _master(pool, a, job)
    first = _session_of(pool, a, job)
    assert first
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_uid == a.uid
    top = os.lstat(sock.parent)
    assert (top.st_uid, stat.S_IMODE(top.st_mode)) == (a.uid, 0o700)
    for _ in range(3):
        assert _session_of(pool, a, job) == first
    assert pool.ssh(a, job, "echo data > f.txt", env=MUX).returncode == 0
    dest = pathlib.Path(a.home) / f"mux-{job}"
    try:
        r = pool.ssh(a, "-ssh", "scp", job, "remote:f.txt", str(dest), env=MUX)
        assert r.returncode == 0, r.stderr
        assert dest.read_text() == "data\n"
        dest.unlink()
        r = pool.run(a, ["rsync", "-e", "ssh-to-job", f"{job}:f.txt", str(dest)], env=MUX)
        assert r.returncode == 0, r.stderr
        assert dest.read_text() == "data\n"
        r = pool.ssh(a, "-ssh", "sftp", job, input="ls f.txt\n", env=MUX)
        assert r.returncode == 0, r.stderr
        assert "f.txt" in r.stdout
    finally:
        dest.unlink(missing_ok=True)
    assert len(_granted(pool, a, job)) == 1
    # -keygen-options asks for a session key of its own: a full session, not the master's.
    r = pool.ssh(a, "-keygen-options", "-t ecdsa", job, "echo $SSH_TO_JOB_SESSION", env=MUX)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() not in ("", first)
    assert len(_granted(pool, a, job)) == 2
    # The installed ssh-to-job is the compiled front; copied beside a "Python client" that
    # only exits 97, it still runs a repeat command (so no Python ran), and hands a -debug
    # one, which it never takes, to that client.
    assert (BIN / "ssh-to-job").read_bytes()[:4] == b"\x7fELF"
    lone = pathlib.Path(f"/tmp/stj-front-{os.getpid()}")
    lone.mkdir(mode=0o755)
    try:
        shutil.copy2(BIN / "ssh-to-job", lone / "ssh-to-job")
        (lone / "ssh-to-job-py").write_text("#!/bin/sh\nexit 97\n")
        (lone / "ssh-to-job-py").chmod(0o755)
        r = pool.run(a, [str(lone / "ssh-to-job"), job, "echo $SSH_TO_JOB_SESSION"], env=MUX)
        assert (r.returncode, r.stdout.strip()) == (0, first), r.stderr
        r = pool.run(a, [str(lone / "ssh-to-job"), "-debug", job, "true"], env=MUX)
        assert r.returncode == 97
    finally:
        shutil.rmtree(lone)
    pool.stj(a, "rm", job)
    wait_for("the master to end with the job", lambda: not sock.exists(), timeout=20)
    r = pool.ssh(a, job, "true", env=MUX)
    assert r.returncode == 1
    assert len(_granted(pool, a, job)) == 2


def test_another_uid_cannot_use_the_master_and_hold_ends_it(
    pool: Pool, users: dict[str, User]
) -> None:
    """Another user can neither reach the socket nor drive the master with ssh -O; a new full
    session after `stj hold` / `release` is a second capability."""
    a, b = users["a"], users["b"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        first = _session_of(pool, a, job)
        sock = _master(pool, a, job)
        assert sock.exists()
        probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        r = pool.run(b, [sys.executable, "-c", probe, str(sock)])
        assert "PermissionError" in r.stderr, r.stderr
        r = pool.run(b, ["ssh", "-S", str(sock), "-O", "check", "x"])
        assert r.returncode != 0
        r = pool.run(b, ["ssh", "-S", str(sock), "-F", "none", "x", "id"])
        assert r.returncode != 0
        assert str(a.uid) not in r.stdout
        pool.stj(a, "hold", job)
        wait_for("the master to end with the hold", lambda: not sock.exists(), timeout=20)
        pool.stj(a, "release", job)
        pool.wait_state(job, "running")
        assert _session_of(pool, a, job) not in ("", first)
        assert len(_granted(pool, a, job)) == 2
    finally:
        pool.stj(a, "rm", job)


def test_concurrent_first_commands_make_one_master_quietly(
    pool: Pool, users: dict[str, User]
) -> None:
    """Six first commands at once all succeed with nothing on stderr (one of them makes the
    master, the others stay plain sessions); the next command uses that master."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            runs = list(ex.map(lambda i: pool.ssh(a, job, f"echo {i}", env=MUX), range(6)))
        assert [(r.returncode, r.stdout, r.stderr) for r in runs] == [
            (0, f"{i}\n", "") for i in range(6)
        ]
        assert _master(pool, a, job).exists()
        n = len(_granted(pool, a, job))
        assert n == 6
        _session_of(pool, a, job)
        assert len(_granted(pool, a, job)) == n
    finally:
        pool.stj(a, "rm", job)


def test_pool_turns_it_off_and_an_idle_master_does_not_hold_up_completion(
    make_pool: Any, users: dict[str, User]
) -> None:
    """With [starter] mux_persist = 0 every command is a full session and no master is left;
    with a short mux_persist a job whose process ends completes once its master has idled."""
    a = users["a"]
    off: Pool = make_pool("[starter]\nmux_persist = 0\n", slots=2)
    (job,) = off.submit(a, "/bin/sleep", "300")
    off.wait_state(job, "running")
    try:
        one, two = _session_of(off, a, job), _session_of(off, a, job)
        assert one != two
        assert not _master(off, a, job).exists()
        assert len(_granted(off, a, job)) == 2
    finally:
        off.stj(a, "rm", job)
    short: Pool = make_pool("[starter]\nmux_persist = 2\n", slots=2)
    (job,) = short.submit(a, "/bin/sh", "-c", "while [ ! -e go ]; do sleep 0.1; done")
    short.wait_state(job, "running")
    assert short.ssh(a, job, "touch go", env=MUX).returncode == 0
    assert _master(short, a, job).exists()
    t0 = time.monotonic()
    short.wait_state(job, "completed", timeout=30)
    # mux_persist (2 s) plus the starter's own rounds; far below the default session_grace.
    assert time.monotonic() - t0 < 15
    assert not _master(short, a, job).exists()


# ------------------------------------------------ the compiled front against _mux.repeat_argv


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The installed front, copied beside a fake Python client and fake ssh/scp/sftp that
    print their argv, NUL-separated, so the front's decision is visible without running."""
    d = tmp_path_factory.mktemp("front")
    shutil.copy2(BIN / "ssh-to-job", d / "ssh-to-job")
    report = '#!/bin/sh\nprintf \'%s\\0\' {tag} "$0" "$@"\n'
    (d / "ssh-to-job-py").write_text(report.format(tag="PY"))
    (d / "bin").mkdir()
    for prog in ("ssh", "scp", "sftp", "rsh"):
        (d / "bin" / prog).write_text(report.format(tag="EXEC"))
    for f in [d / "ssh-to-job-py", *(d / "bin").iterdir()]:
        f.chmod(0o755)
    (d / "state").mkdir()
    (d / "state" / "broker.sock").touch()
    (d / "rt" / f"ssh-to-job-{os.getuid()}").mkdir(parents=True, mode=0o700)
    return d


def _listen(path: pathlib.Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(64)
    path.with_name(path.name + ".cfg").write_text("# the master's client config\n")
    return s


#: (argv, environment changes, outcome) with a live master for job 32.0 and $SHELL /bin/bash:
#: "exec", both run the same command through it; "py", repeat_argv says no and the front execs
#: the Python client with the argv unchanged; "left", repeat_argv says yes but the front, unsure,
#: leaves it to the Python client (which then decides the same).
AGREE: list[tuple[list[str], dict[str, str | None], str]] = [
    (["32", "true"], {}, "exec"),
    (["32.0", "echo", "a b", ""], {}, "exec"),
    (["32.0.0", "true"], {}, "exec"),
    (["0032.000", "true"], {}, "exec"),
    (["u@32.0", "rsync", "--server", "."], {}, "exec"),
    (["-l", "u", "-p", "22", "-o", "BatchMode=yes", "32", "true"], {}, "exec"),
    (["--o=X=y", "---l=u", "32", "true"], {}, "exec"),
    (["--", "32", "true"], {}, "exec"),
    (["-name", "{state}", "32", "true"], {"STJ_STATE_DIR": None}, "exec"),
    (["-name={state}/broker.sock", "32", "true"], {"STJ_STATE_DIR": None}, "exec"),
    (["-name", "state", "32", "true"], {"STJ_STATE_DIR": "/nonexistent"}, "exec"),
    (["-name=", "32", "true"], {}, "exec"),
    (["-shells", "/bin/bash", "32", "true"], {"SHELL": None}, "exec"),
    (["-shells=,/bin/bash,,", "32", "true"], {"SHELL": "/bin/sh"}, "exec"),
    (["-shells", "/bin/sh", "32", "true"], {}, "py"),
    (["32", "true"], {"SHELL": None}, "py"),
    (["-ssh", "scp", "32", "remote:f", "."], {}, "exec"),
    (["-ssh", "sftp -q", "32"], {}, "exec"),
    (["-ssh", "ssh -q -o LogLevel=ERROR", "32", "true"], {}, "exec"),
    (["-ssh", "{front}/bin/ssh -T", "32", "true"], {}, "exec"),
    (["-ssh=", "32", "true"], {}, "exec"),
    (["32", "true"], {"XDG_RUNTIME_DIR": "/"}, "py"),
    (["32", "true"], {"XDG_RUNTIME_DIR": "{front}/rt", "TMPDIR": "/nonexistent"}, "exec"),
    (["32", "true"], {"SSH_TO_JOB_MUX": "0"}, "py"),
    (["32", "true"], {"SSH_TO_JOB_MUX": "off"}, "py"),
    (["32", "true"], {"SSH_TO_JOB_MUX": "yes"}, "exec"),
    (["32"], {}, "py"),
    (["-ssh", "sftp", "32"], {}, "exec"),
    (["-ssh", "scp", "32"], {}, "exec"),
    (["-debug", "32", "true"], {}, "py"),
    (["-X", "32", "true"], {}, "py"),
    (["-pool", "h:1", "32", "true"], {}, "py"),
    (["-name"], {}, "py"),
    ([], {}, "py"),
    (["-", "true"], {}, "py"),
    (["32.1.1", "true"], {}, "py"),
    (["1234567890123", "true"], {}, "py"),
    (["32.", "true"], {}, "py"),
    (["x@", "true"], {}, "py"),
    (["-ssh", "ssh -A", "32", "true"], {}, "py"),
    (["-ssh", "ssh -qX", "32", "true"], {}, "py"),
    (["-ssh", "ssh -o", "32", "true"], {}, "exec"),
    (["-ssh", "ssh -o forwardAgent=yes", "32", "true"], {}, "py"),
    (["-ssh", "ssh -oControlPath=x", "32", "true"], {}, "py"),
    (["-ssh", "ssh -o ProxyJump=h", "32", "true"], {}, "py"),
    (["-ssh", "rsh", "32", "true"], {}, "py"),
    (["33", "true"], {}, "py"),
    (["32", "true"], {"TMPDIR": "{front}"}, "py"),
    (["\u0663\u0662", "true"], {}, "py"),
    (["32", "echo", "\u00e9t\u00e9"], {}, "exec"),
    # Left to Python: shell-like quoting, what str.strip() takes away.
    (["-ssh", "ssh '-q'", "32", "true"], {}, "left"),
    (["\u00a032 ", "true"], {}, "left"),
    ([" 32", "true"], {}, "left"),
    (["32", "true"], {"STJ_STATE_DIR": None, "STJ_CONFIG": "{front}/nonexistent"}, "py"),
]


def _run_both(
    front: pathlib.Path, argv: list[str], changes: dict[str, str | None], mp: pytest.MonkeyPatch
) -> tuple[list[str] | None, list[str]]:
    """_mux.repeat_argv in this process and the front in a child, with one environment."""
    env = {
        "PATH": f"{front}/bin:/usr/bin:/bin",
        "STJ_STATE_DIR": str(front / "state"),
        "STJ_CONFIG": str(front / "config.toml"),
        "TMPDIR": str(front / "rt"),
        "SHELL": "/bin/bash",
        "HOME": str(front),
    }
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v.format(front=front)
    argv = [w.format(front=front, state=front / "state") for w in argv]
    for k in list(os.environ):
        mp.delenv(k)
    for k, v in env.items():
        mp.setenv(k, v)
    mp.chdir(front)
    expected = _mux.repeat_argv(argv)
    r = subprocess.run([str(front / "ssh-to-job"), *argv], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    return expected, os.fsdecode(r.stdout).split("\0")[:-1]


@pytest.mark.parametrize(("argv", "changes", "outcome"), AGREE)
def test_the_compiled_front_agrees_with_repeat_argv(
    front: pathlib.Path,
    argv: list[str],
    changes: dict[str, str | None],
    outcome: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For each argv and environment the front execs exactly the command _mux.repeat_argv
    returns, or the Python client beside it with the argv unchanged (where repeat_argv
    returns None, and in the few cases the front leaves to Python)."""
    sock = _mux.socket_path(
        front / "rt" / f"ssh-to-job-{os.getuid()}",
        str(front / "state" / "broker.sock"),
        "32.0",
        ("/bin/bash",),
    )
    (front / "config.toml").write_text("")
    with _listen(sock):
        expected, got = _run_both(front, argv, changes, monkeypatch)
    sock.unlink()
    assert (expected is None) == (outcome == "py")
    if outcome != "exec":
        assert got == ["PY", str(front / "ssh-to-job-py"), *argv_of(front, argv)]
    else:
        assert expected is not None
        prog = expected[0] if "/" in expected[0] else str(front / "bin" / expected[0])
        assert got == ["EXEC", prog, *expected[1:]]


#: (the config file, outcome) with STJ_STATE_DIR unset and a master for the pool whose
#: state_dir is {state}: the front reads a plain subset of TOML and leaves the rest to Python.
CONFIGS: list[tuple[str, str]] = [
    ('[pool]\nstate_dir = "{state}"\n', "exec"),
    (
        "# a pool\n\n[broker]\nport = 0\nsuperusers = [\"a\", 'b', ]\nx = -1.5e3\ny = true\n"
        "z = []\n\t[ pool ]  # p\n  state_dir='{state}'  # s\n[starter]\nmux_persist = 10",
        "exec",
    ),
    ('[pool]\nstate_dir = "{state}/../state"\n', "exec"),
    # The example configs shipped in dist/, pointed at this pool.
    ("@broker.toml", "exec"),
    ("@starter.toml", "exec"),
    ('[pool]\nstate_dir = "{escaped}"\n', "left"),
    ('[pool]\nstate_dir = "{state}"\n[broker]\nsuperusers = [\n  "a",\n]\n', "left"),
    ('pool.state_dir = "{state}"\n', "left"),
    ('[pool]\r\nstate_dir = "{state}"\r\n', "left"),
    ('[pool]\nstate_dir = """{state}"""\n', "left"),
    ('[pool]\nstate_dir = "{state}"\n[pool]\n', "py"),
    ('[pool]\nstate_dir = "{state}"\nstate_dir = "{state}"\n', "py"),
    ('[pool]\nstate_dir = "{state}"\n[broker]\nport = 012\n', "py"),
    ('[pool]\nstate_dir = "{state}" x\n', "py"),
    ('[pool]\nstate_dir = "{state}"\n[broker]\nport = \n', "py"),
    ("[pool]\nstate_dir = 3\n", "py"),
    ('[pool]\nstate_dir = ""\n', "py"),
    ("[broker]\nport = 0\n", "py"),
    ('[pool]\nstate_dir = "{state}"\n\xff\n', "py"),
]


@pytest.mark.parametrize(("config", "outcome"), CONFIGS)
def test_the_front_reads_the_config_file_as_tomllib_does(
    front: pathlib.Path, config: str, outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without STJ_STATE_DIR the pool comes from the config file: the front finds the same
    [pool] state_dir as the Python client, or leaves the file to it."""
    state = front / "state"
    sock = _mux.socket_path(
        front / "rt" / f"ssh-to-job-{os.getuid()}",
        str(state / "broker.sock"),
        "32.0",
        ("/bin/bash",),
    )
    escaped = str(state).replace("/", "\\u002f", 1)
    if config.startswith("@"):
        shipped = (pathlib.Path(__file__).resolve().parent.parent / "dist" / "config").joinpath
        config = shipped(config[1:]).read_text().replace('"/var/lib/ssh-to-job"', '"{state}"')
        assert '"{state}"' in config
    (front / "config.toml").write_bytes(
        config.format(state=state, escaped=escaped).encode("latin-1")
    )
    with _listen(sock):
        expected, got = _run_both(front, ["32", "true"], {"STJ_STATE_DIR": None}, monkeypatch)
    sock.unlink()
    assert (expected is None) == (outcome == "py")
    if outcome == "exec":
        assert got == ["EXEC", str(front / "bin" / "ssh"), *(expected or [])[1:]]
    else:
        assert got == ["PY", str(front / "ssh-to-job-py"), "32", "true"]


def argv_of(front: pathlib.Path, argv: list[str]) -> list[str]:
    return [w.format(front=front, state=front / "state") for w in argv]


def test_the_front_leaves_dead_and_foreign_sockets_to_python(
    front: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket nobody listens on, a runtime directory others may enter, and a missing client
    config all send the front to the Python client (which removes the dead socket)."""
    base = front / "rt" / f"ssh-to-job-{os.getuid()}"
    sock = _mux.socket_path(base, str(front / "state" / "broker.sock"), "32.0", ("/bin/bash",))
    py = ["PY", str(front / "ssh-to-job-py"), "32", "true"]
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()
    sock.with_name(sock.name + ".cfg").write_text("#\n")
    expected, got = _run_both(front, ["32", "true"], {}, monkeypatch)
    assert (expected, got) == (None, py)
    assert not sock.exists()
    with _listen(sock):
        base.chmod(0o750)
        try:
            assert _run_both(front, ["32", "true"], {}, monkeypatch) == (None, py)
        finally:
            base.chmod(0o700)
        sock.with_name(sock.name + ".cfg").unlink()
        assert _run_both(front, ["32", "true"], {}, monkeypatch) == (None, py)
    sock.unlink()


@pytest.mark.parametrize("where", ["home", "xdg_state_home"])
def test_the_front_finds_a_users_personal_pool_as_python_does(
    users: dict[str, User], where: str
) -> None:
    """As a user without STJ_STATE_DIR or a config file, the pool is their personal one
    (~/.local/state or $XDG_STATE_HOME): the front and _mux.repeat_argv, both run as that
    user, exec the same command through the master."""
    a = users["a"]
    top = pathlib.Path(f"/tmp/stj-front-personal-{os.getpid()}")
    top.mkdir(mode=0o755)
    try:
        home = top / "home"
        state = home / ".local" / "state" if where == "home" else top / "xdg"
        home.mkdir()
        (state / "ssh-to-job").mkdir(parents=True, exist_ok=True)
        (state / "ssh-to-job" / "broker.sock").touch()
        rt = top / "rt" / f"ssh-to-job-{a.uid}"
        rt.mkdir(parents=True, mode=0o700)
        shutil.copy2(BIN / "ssh-to-job", top / "ssh-to-job")
        (top / "ssh-to-job-py").write_text("#!/bin/sh\nexit 97\n")
        (top / "bin").mkdir()
        (top / "bin" / "ssh").write_text('#!/bin/sh\nprintf \'%s\\0\' "$0" "$@"\n')
        for f in (top / "ssh-to-job-py", top / "bin" / "ssh"):
            f.chmod(0o755)
        for d in (home, state, rt):
            for p in [d, *d.rglob("*")]:
                os.chown(p, a.uid, a.gid)
        sock = _mux.socket_path(rt, str(state / "ssh-to-job" / "broker.sock"), "7.0", ("/bin/sh",))
        env = {"PATH": f"{top}/bin:/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh"}
        env["TMPDIR"] = str(top / "rt")
        if where == "xdg_state_home":
            env["XDG_STATE_HOME"] = str(state)
        with _listen(sock):
            os.chown(sock, a.uid, a.gid)
            py = "import json,sys; from ssh_to_job.client import _mux; "
            py += "print(json.dumps(_mux.repeat_argv(sys.argv[1:])))"
            argv = ["7", "echo", "hi"]
            expected = subprocess.run(
                [*a.prefix(), sys.executable, "-c", py, *argv],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout
            r = subprocess.run(
                [*a.prefix(), str(top / "ssh-to-job"), *argv], capture_output=True, env=env
            )
        assert r.returncode == 0, r.stderr
        want = json.loads(expected)
        assert want is not None
        got = os.fsdecode(r.stdout).split("\0")[:-1]
        assert got == [str(top / "bin" / "ssh"), *want[1:]]
    finally:
        shutil.rmtree(top)


# ------------------------------------------------------------------------------ Slurm jobs

#: (a job word, the job it names for the master, or None where the full client refuses it):
#: every spelling of a Slurm job (docs/slurm.md) names one master, the node as written.
SLURM_ONE: list[tuple[str, str | None]] = [
    ("slurm:77", "slurm:77"),
    ("slurm-77", "slurm:77"),
    ("slurm:0077", "slurm:77"),
    ("slurm:77 ", "slurm:77"),
    ("slurm:77\n", "slurm:77"),
    ("slurm:77_3", "slurm:77_3"),
    ("slurm-77_003", "slurm:77_3"),
    ("slurm:77.0", "slurm:77.0"),
    ("slurm:77.007", "slurm:77.7"),
    ("slurm:77.batch", "slurm:77.batch"),
    ("slurm:77_3.7+n1", "slurm:77_3.7+n1"),
    ("slurm-077_03.0007+n1", "slurm:77_3.7+n1"),
    ("slurm:77+0", "slurm:77+0"),
    ("slurm:77+00", "slurm:77+00"),
    ("slurm:77+N1", "slurm:77+N1"),
    ("slurm:77+n1.cluster_x-2", "slurm:77+n1.cluster_x-2"),
    ("slurm:77+" + "n" * 64, "slurm:77+" + "n" * 64),
    ("slurm:1234567890", "slurm:1234567890"),
    ("slurm:77.123456789", "slurm:77.123456789"),
    ("slurm:", None),
    ("slurm-", None),
    ("slurm:77+", None),
    ("slurm:77++n1", None),
    ("slurm:77+n1+n2", None),
    ("slurm:77+-n1", None),
    ("slurm:77+.n1", None),
    ("slurm:77+n 1", None),
    ("slurm:77+n\u00e9", None),
    ("slurm:77+" + "n" * 65, None),
    ("slurm:77.Batch", None),
    ("slurm:77.batch0", None),
    ("slurm:77.", None),
    ("slurm:77.1.2", None),
    ("slurm:77.1234567890", None),
    ("slurm:77_", None),
    ("slurm:_3", None),
    ("slurm:77_3_4", None),
    ("slurm:77.1_3", None),
    ("slurm:12345678901", None),
    ("slurm:\u0663\u0662", None),
    ("slurm:77_\u0663", None),
    ("slurm:-77", None),
    ("slurm:+1", None),
    ("slurm=77", None),
    ("Slurm:77", None),
    (" slurm:77", None),
    ("slurm:77:x", None),
]


@pytest.mark.parametrize(("text", "one"), SLURM_ONE)
def test_job_one_names_a_slurm_job_as_the_full_client_does(text: str, one: str | None) -> None:
    """_mux.job_one accepts exactly the Slurm words the full client's parse_job accepts, as
    wire.parse_slurm_id reads them, and the repeat path's socket for it is the one the full
    client's session makes its master at (``socket_path`` of the client's ``jid.one``)."""
    from ssh_to_job import wire
    from ssh_to_job.client.ssh_to_job import parse_job

    assert _mux.job_one(text) == one
    if one is None:
        with pytest.raises(ValueError, match="is not a"):
            parse_job(text)
        return
    assert one == str(wire.parse_slurm_id(text))
    base, broker, shells = pathlib.Path("/r"), "/s/broker.sock", ("/bin/bash",)
    made = _mux.socket_path(base, broker, parse_job(text).one, shells)
    assert made == pathlib.Path(_mux._name(str(base), broker, one, shells))


#: The masters of SLURM_AGREE, as the full client names them.
SLURM_MASTERS = ("slurm:77", "slurm:78_3.7+n1", "slurm:79.batch")

#: As AGREE, with live masters for the SLURM_MASTERS jobs: any spelling of one of them goes
#: through it, a job, task, step or node that differs in anything never does.
SLURM_AGREE: list[tuple[list[str], str]] = [
    (["slurm:77", "true"], "exec"),
    (["slurm-77", "true"], "exec"),
    (["slurm:0077", "echo", "a b"], "exec"),
    (["u@slurm-77", "rsync", "--server", "."], "exec"),
    (["-ssh", "scp", "slurm-77", "remote:f", "."], "exec"),
    (["-ssh", "sftp", "slurm:77"], "exec"),
    (["-l", "u", "--", "slurm:77", "true"], "exec"),
    (["slurm:78_3.7+n1", "true"], "exec"),
    (["slurm-078_03.007+n1", "true"], "exec"),
    (["slurm:79.batch", "true"], "exec"),
    (["slurm:77"], "py"),
    (["slurm:7", "true"], "py"),
    (["slurm:770", "true"], "py"),
    (["slurm:77_0", "true"], "py"),
    (["slurm:77.0", "true"], "py"),
    (["slurm:77+0", "true"], "py"),
    (["slurm:77+n1", "true"], "py"),
    (["slurm:78_3.7", "true"], "py"),
    (["slurm:78_3.7+n2", "true"], "py"),
    (["slurm:78_3.7+N1", "true"], "py"),
    (["slurm:78_3+n1", "true"], "py"),
    (["slurm:78.7+n1", "true"], "py"),
    (["slurm:78_4.7+n1", "true"], "py"),
    (["slurm:79", "true"], "py"),
    (["slurm:79.0", "true"], "py"),
    (["slurm:77+", "true"], "py"),
    (["slurm:77.Batch", "true"], "py"),
    (["slurm:", "true"], "py"),
    (["slurm:\u0663\u0667", "true"], "py"),
    (["-debug", "slurm:77", "true"], "py"),
    (["-pool", "h:1", "slurm:77", "true"], "py"),
    (["77", "true"], "py"),
    (["slurm:77", "true"], "exec"),
    # Left to Python: what str.strip() takes away.
    (["slurm:77 ", "true"], "left"),
    (["slurm:77\n", "true"], "left"),
]


@pytest.mark.parametrize(("argv", "outcome"), SLURM_AGREE)
def test_the_compiled_front_agrees_with_repeat_argv_for_slurm_jobs(
    front: pathlib.Path, argv: list[str], outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For Slurm job words too the front execs exactly the command _mux.repeat_argv returns
    (through the master of the job the word names), or the Python client with the argv
    unchanged."""
    base = front / "rt" / f"ssh-to-job-{os.getuid()}"
    broker = str(front / "state" / "broker.sock")
    (front / "config.toml").write_text("")
    socks = [_mux.socket_path(base, broker, job, ("/bin/bash",)) for job in SLURM_MASTERS]
    with contextlib.ExitStack() as stack:
        for sock in socks:
            stack.enter_context(_listen(sock))
        expected, got = _run_both(front, argv, {}, monkeypatch)
    for sock in socks:
        sock.unlink()
    assert (expected is None) == (outcome == "py")
    if outcome != "exec":
        assert got == ["PY", str(front / "ssh-to-job-py"), *argv]
    else:
        assert expected is not None
        assert got == ["EXEC", str(front / "bin" / expected[0]), *expected[1:]]
        assert expected[2] in {s.with_name(s.name + ".cfg").as_posix() for s in socks}
