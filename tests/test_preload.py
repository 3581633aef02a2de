"""The LD_PRELOAD shim: the installed library, its fd protocol, and real sshd logins through it.

Everything runs for real: the installed ``libstjshim.so`` (never the source tree), real uids
switched with setpriv, real getent/python/sshd/ssh/scp/sftp processes. The test process is
root; the uids it uses are in 61000-61999, users it creates are named ``stjt*``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import shimharness

from ssh_to_job import preload

HARNESS = Path(shimharness.__file__).resolve()
REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
WEAK_UNVERSIONED = {
    "__gmon_start__",
    "_ITM_registerTMCloneTable",
    "_ITM_deregisterTMCloneTable",
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")


# --------------------------------------------------------------------------------------------
# helpers


def _free_ids(count: int, start: int = 61001) -> list[int]:
    """uids in 61000-61999 with neither a passwd nor a group entry."""
    found: list[int] = []
    for n in range(start, 62000):
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            pass
        found.append(n)
        if len(found) == count:
            return found
    raise RuntimeError("no free uids in 61001-61999")


def _run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
        stdin=stdin,
        input=input,
    )


def _pwd_line(name: str) -> str:
    e = pwd.getpwnam(name)
    return f"{e.pw_name}:x:{e.pw_uid}:{e.pw_gid}:{e.pw_gecos}:{e.pw_dir}:{e.pw_shell}\n"


def _pts_has_tty_gid() -> bool:
    """Whether the visible /dev/pts mount gives new ptys gid 5 (then no chown is needed)."""
    opts = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/dev/pts":
                opts = fields[-1]  # the last mount on /dev/pts is the visible one
    return "gid=5" in opts.split(",")


@attrs.frozen
class Bare:
    """A uid (and gid) that has no passwd or group entry, with a home directory it owns."""

    uid: int
    name: str
    home: str

    def cfg(self, **changes: Any) -> preload.ShimConfig:
        cfg = preload.ShimConfig(
            uid=self.uid, gid=self.uid, name=self.name, home=self.home, shell="/bin/sh"
        )
        return attrs.evolve(cfg, **changes)


def _shimmed(
    bare: Bare, shim: Path, argv: list[str], cfg: preload.ShimConfig
) -> subprocess.CompletedProcess[str]:
    """Run argv as the bare uid with the shim configured by cfg; collect its output."""
    proc = shimharness.spawn(argv, cfg, shim=shim, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def _refused(bare: Bare, shim: Path, raw: bytes, *, eof: bool = False) -> tuple[bytes, int]:
    """Send raw configuration bytes to a shimmed getent; return its answer line and status."""
    proc, sock = shimharness.start(
        ["getent", "passwd", bare.name],
        uid=bare.uid,
        gid=bare.uid,
        shim=shim,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(raw)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(512)
            if not chunk:
                break
            answer += chunk
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert out == b"", "the program must not run after a refused configuration"
    return answer, proc.returncode


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def shim() -> Path:
    return preload.check_shim()


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A world-traversable scratch directory under /tmp (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="stjshim-", dir="/tmp"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bare(base: Path) -> Bare:
    (uid,) = _free_ids(1)
    home = base / f"home-{uid}"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    name = "stjtjob"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    return Bare(uid=uid, name=name, home=str(home))


@pytest.fixture(scope="module")
def run_sshd_dir() -> None:
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


# --------------------------------------------------------------------------------------------
# the installed library


def test_tests_use_the_installed_package() -> None:
    """The tests exercise the installed package and its built .so, not the source tree."""
    where = Path(preload.__file__).resolve()
    assert not where.is_relative_to(REPO), where
    lib = preload.shim_path()
    assert lib.parent == where.parent
    assert lib.name == "libstjshim.so"


def test_exports_only_the_six_symbols_and_needs_only_libc(shim: Path) -> None:
    """nm/readelf: exactly the six lookups are exported, every import is glibc's, NEEDED=libc."""
    defined = _run(["nm", "-D", "--defined-only", str(shim)])
    assert defined.returncode == 0, defined.stderr
    names = {line.split()[-1] for line in defined.stdout.splitlines() if line.strip()}
    assert names == set(preload.SYMBOLS)

    undefined = _run(["nm", "-D", "--undefined-only", str(shim)])
    assert undefined.returncode == 0, undefined.stderr
    imports = [line.split() for line in undefined.stdout.splitlines() if line.strip()]
    assert imports
    for kind, sym in imports:
        assert kind in ("U", "w"), (kind, sym)
        assert "@GLIBC_" in sym or (kind == "w" and sym in WEAK_UNVERSIONED), sym

    dynamic = _run(["readelf", "-d", str(shim)])
    assert dynamic.returncode == 0, dynamic.stderr
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic.stdout)
    assert needed == ["libc.so.6"]
    assert "BIND_NOW" in dynamic.stdout


def test_loads_under_bind_now_and_passes_through_when_unconfigured(shim: Path) -> None:
    """With LD_BIND_NOW=1 the loader maps it silently; unconfigured, lookups are libc's."""
    env = {**shimharness.CLEAN_ENV, "LD_BIND_NOW": "1", "LD_PRELOAD": str(shim)}
    true = _run(["/bin/true"], env=env)
    assert (true.returncode, true.stderr) == (0, "")
    maps = _run(["cat", "/proc/self/maps"], env=env)
    assert str(shim) in maps.stdout, "the shim was not mapped"

    plain = _run(["getent", "passwd", "root"], env=shimharness.CLEAN_ENV)
    shimmed = _run(["getent", "passwd", "root"], env=env)
    assert plain.returncode == 0
    assert (shimmed.returncode, shimmed.stdout, shimmed.stderr) == (0, plain.stdout, "")
    tty = _run(["getent", "group", "tty"], env=env)
    assert tty.returncode == 0
    assert tty.stdout.startswith("tty:")


def test_unconfigured_shim_invents_nothing_for_a_bare_uid(shim: Path, bare: Bare) -> None:
    """Without SSH_TO_JOB_SHIM_FD a bare uid still has no passwd entry."""
    argv = [*shimharness.setpriv(bare.uid, bare.uid), "env", f"LD_PRELOAD={shim}"]
    res = _run([*argv, "getent", "passwd", str(bare.uid)], env=shimharness.CLEAN_ENV)
    assert (res.returncode, res.stdout) == (2, "")


# --------------------------------------------------------------------------------------------
# the fd protocol, with getent and python as a bare uid


def test_configured_entry_resolves_by_name_and_uid(shim: Path, bare: Bare) -> None:
    """getent passwd NAME/UID give the configured entry; root stays root; gecos defaults."""
    cfg = bare.cfg(gecos="Job 32.0")
    line = f"{bare.name}:x:{bare.uid}:{bare.uid}:Job 32.0:{bare.home}:/bin/sh\n"
    by_name = _shimmed(bare, shim, ["getent", "passwd", bare.name], cfg)
    assert (by_name.returncode, by_name.stdout, by_name.stderr) == (0, line, "")
    by_uid = _shimmed(bare, shim, ["getent", "passwd", str(bare.uid)], cfg)
    assert (by_uid.returncode, by_uid.stdout) == (0, line)

    root = _shimmed(bare, shim, ["getent", "passwd", "root", "nosuchuserstjt"], cfg)
    assert root.returncode == 2  # one key not found
    assert root.stdout == _pwd_line("root")

    default = _shimmed(bare, shim, ["getent", "passwd", bare.name], bare.cfg())
    assert default.stdout.split(":")[4] == bare.name


@pytest.mark.parametrize("hide", [True, False])
def test_tty_group_hidden_only_when_asked(shim: Path, bare: Bare, hide: bool) -> None:
    """getent group tty finds nothing with hide_tty_group=1 and the real group with 0."""
    res = _shimmed(bare, shim, ["getent", "group", "tty", "root"], bare.cfg(hide_tty_group=hide))
    root_line = f"root:x:0:{','.join(grp.getgrnam('root').gr_mem)}\n"
    tty = grp.getgrnam("tty")
    tty_line = f"tty:x:{tty.gr_gid}:{','.join(tty.gr_mem)}\n"
    if hide:
        assert (res.returncode, res.stdout) == (2, root_line)
    else:
        assert (res.returncode, res.stdout) == (0, tty_line + root_line)


REENTRANT_PROBE = r"""
import ctypes, errno, grp, json, pwd, sys
name, uid = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)   # global scope: the preloaded shim comes first
pw = ctypes.create_string_buffer(256)
buf = ctypes.create_string_buffer(8)
res = ctypes.c_void_p(1)
rc = libc.getpwnam_r(name.encode(), pw, buf, 8, ctypes.byref(res))
res2 = ctypes.c_void_p(1)
rc2 = libc.getpwuid_r(ctypes.c_uint(uid), pw, buf, 8, ctypes.byref(res2))
out = {"small": [rc == errno.ERANGE, res.value is None, rc2 == errno.ERANGE, res2.value is None]}
out["byname"] = list(pwd.getpwnam(name))    # CPython uses getpwnam_r, growing its buffer
out["byuid"] = list(pwd.getpwuid(uid))
out["root"] = list(pwd.getpwnam("root"))
try:
    grp.getgrnam("tty")                       # CPython uses getgrnam_r
    out["tty"] = "found"
except KeyError:
    out["tty"] = "hidden"
out["root_group"] = grp.getgrnam("root").gr_gid
print(json.dumps(out))
"""


def test_reentrant_variants_fill_the_callers_buffer(shim: Path, bare: Bare) -> None:
    """getpwnam_r/getpwuid_r give ERANGE on a short buffer and the entry on a big one."""
    gecos = "g" * 3000  # more than CPython's first 1024-byte buffer: exercises ERANGE + retry
    cfg = bare.cfg(gecos=gecos)
    res = _shimmed(
        bare, shim, ["/usr/bin/python3", "-I", "-c", REENTRANT_PROBE, bare.name, str(bare.uid)], cfg
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["small"] == [True, True, True, True]
    entry = [bare.name, "x", bare.uid, bare.uid, gecos, bare.home, "/bin/sh"]
    assert out["byname"] == entry
    assert out["byuid"] == entry
    assert out["root"] == list(pwd.getpwnam("root"))
    assert out["tty"] == "hidden"
    assert out["root_group"] == 0


def test_config_for_another_uid_is_refused(shim: Path, bare: Bare) -> None:
    """A configuration naming a uid other than the process's gets 'err' and exit 126."""
    proc, sock = shimharness.start(
        ["getent", "passwd", "root"],
        uid=bare.uid,
        gid=bare.uid,
        shim=shim,
        stdout=subprocess.PIPE,
    )
    with sock, pytest.raises(preload.ShimError, match="uid is not the uid this process runs as"):
        preload.run_handshake(sock, bare.cfg(uid=bare.uid + 1), TIMEOUT)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out) == (126, b"")


@pytest.mark.parametrize("after_ok", [b"", b"x"], ids=["eof", "wrong-byte"])
def test_no_go_byte_means_exit_126(shim: Path, bare: Bare, after_ok: bytes) -> None:
    """After 'ok', EOF or any byte but 'g' ends the program with 126 before it runs."""
    proc, sock = shimharness.start(
        ["getent", "passwd", "root"], uid=bare.uid, gid=bare.uid, shim=shim, stdout=subprocess.PIPE
    )
    with sock:
        pid = preload.run_handshake(sock, bare.cfg(), TIMEOUT)
        assert pid == proc.pid
        sock.sendall(after_ok)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out) == (126, b"")


def _raw(uid: int, *lines: str) -> bytes:
    return "".join(line.replace("U", str(uid)) + "\n" for line in lines).encode()


GOOD = ("uid=U", "gid=U", "name=stjtjob", "home=/tmp", "shell=/bin/sh", "hide_tty_group=1")

BAD_CONFIGS = {
    "name-colon": (("uid=U", "gid=U", "name=a:b", *GOOD[3:], "end"), "name"),
    "home-relative": ((*GOOD[:3], "home=tmp", *GOOD[4:], "end"), "home"),
    "shell-relative": ((*GOOD[:4], "shell=sh", GOOD[5], "end"), "shell"),
    "empty-name": (("uid=U", "gid=U", "name=", *GOOD[3:], "end"), "name"),
    "uid-not-number": (("uid=-1", *GOOD[1:], "end"), "uid"),
    "hide-yes": ((*GOOD[:5], "hide_tty_group=yes", "end"), "hide_tty_group"),
    "unknown-key": ((*GOOD, "color=red", "end"), "unknown key: color"),
    "duplicate": ((*GOOD, "name=other", "end"), "duplicate key: name"),
    "missing-shell": ((*GOOD[:4], GOOD[5], "end"), "missing key: shell"),
    "no-equals": ((*GOOD, "hello", "end"), "without '='"),
    "gecos-colon": ((*GOOD, "gecos=a:b", "end"), "gecos"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_with_a_reason(shim: Path, bare: Bare, case: str) -> None:
    """Each malformed configuration gets 'err <reason>' and exit 126; nothing runs."""
    lines, reason = BAD_CONFIGS[case]
    answer, status = _refused(bare, shim, _raw(bare.uid, *lines))
    assert answer.startswith(b"err "), answer
    assert reason.encode() in answer, answer
    assert status == 126
    with pytest.raises(preload.ShimError, match="refused its configuration"):
        preload.parse_ack(answer)


@pytest.mark.parametrize(
    ("raw", "eof", "reason"),
    [
        (_raw(0, *GOOD), True, b"ended before the line 'end'"),
        (_raw(0, *GOOD, "end") + b"g", False, b"data after the line 'end'"),
        (b"gecos=" + b"a" * 17000 + b"\n", False, b"larger than 16384"),
        (b"name=a\0b\nend\n", False, b"NUL"),
    ],
    ids=["eof-before-end", "data-after-end", "too-large", "nul-byte"],
)
def test_framing_errors_are_refused(
    shim: Path, bare: Bare, raw: bytes, eof: bool, reason: bytes
) -> None:
    """A config cut short, followed by extra bytes, over 16 KiB, or holding NUL is refused."""
    answer, status = _refused(
        bare, shim, raw.replace(b"uid=0", f"uid={bare.uid}".encode()), eof=eof
    )
    assert answer.startswith(b"err "), answer
    assert reason in answer, answer
    assert status == 126


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("abc", "not a decimal file descriptor number"),
        ("1", "must be 3 or more"),
        ("999", "file descriptor is not open"),
    ],
)
def test_bad_fd_variable_fails_closed(shim: Path, bare: Bare, value: str, reason: str) -> None:
    """A set but unusable SSH_TO_JOB_SHIM_FD exits 126 with the reason on stderr."""
    proc, sock = shimharness.start(
        ["getent", "passwd", "root"],
        uid=bare.uid,
        gid=bare.uid,
        shim=shim,
        fd_value=value,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sock.close()
    out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out) == (126, b"")
    assert f"SSH_TO_JOB_SHIM_FD={value}: {reason}" in err.decode()


def test_fd_that_is_not_a_socket_fails_closed(shim: Path, bare: Bare) -> None:
    """SSH_TO_JOB_SHIM_FD naming an open pipe (not a socket) exits 126."""
    r, w = os.pipe()
    try:
        argv = [*shimharness.setpriv(bare.uid, bare.uid), "env", f"LD_PRELOAD={shim}"]
        res = subprocess.run(
            [*argv, f"{preload.ENV_FD}={r}", "getent", "passwd", "root"],
            capture_output=True,
            text=True,
            pass_fds=(r,),
            env=shimharness.CLEAN_ENV,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(r)
        os.close(w)
    assert (res.returncode, res.stdout) == (126, "")
    assert "file descriptor is not a socket" in res.stderr


def test_ignored_preload_is_reported_as_not_loaded(shim: Path, bare: Bare, base: Path) -> None:
    """If the loader ignores LD_PRELOAD (a path with a space) the handshake says so."""
    spaced = base / "with space"
    spaced.mkdir(mode=0o755)
    copy = spaced / "libstjshim.so"
    shutil.copy(shim, copy)
    proc, sock = shimharness.start(
        ["getent", "passwd", "root"],
        uid=bare.uid,
        gid=bare.uid,
        shim=copy,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    with sock, pytest.raises(preload.ShimError, match=re.escape(preload.NOT_LOADED)):
        preload.run_handshake(sock, bare.cfg(), TIMEOUT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert b"cannot be preloaded" in err


# --------------------------------------------------------------------------------------------
# the Python side without processes


def test_check_shim_rejects_paths_the_loader_would_ignore(shim: Path, tmp_path: Path) -> None:
    """check_shim refuses copies under a space or a colon and writable copies; accepts ours."""
    assert preload.check_shim() == shim
    assert preload.check_shim(shim) == shim
    for dirname, what in (("a b", "a space"), ("a:b", "a colon")):
        d = tmp_path / dirname
        d.mkdir()
        copy = d / "libstjshim.so"
        shutil.copy(shim, copy)
        with pytest.raises(preload.ShimError, match=what):
            preload.check_shim(copy)
    plain = tmp_path / "plain"
    plain.mkdir()
    copy = plain / "libstjshim.so"
    shutil.copy(shim, copy)
    assert preload.check_shim(copy) == copy
    copy.chmod(0o775)
    with pytest.raises(preload.ShimError, match="writable by group or others"):
        preload.check_shim(copy)
    with pytest.raises(preload.ShimError, match="not usable"):
        preload.check_shim(plain / "missing.so")
    with pytest.raises(preload.ShimError, match="must be absolute"):
        preload.check_shim(Path("libstjshim.so"))


def test_check_shim_rejects_a_library_that_does_not_interpose(tmp_path: Path) -> None:
    """A library whose getpwnam is really libc's (libnss_files) fails the dladdr check."""
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    nss = next(iter(sorted(libdir.glob("libnss_files.so*"))), None)
    if nss is None:
        pytest.skip("no libnss_files here")
    copy = tmp_path / "libfake.so"
    shutil.copy(nss, copy)
    copy.chmod(0o755)
    with pytest.raises(preload.ShimError, match="does not export getpwnam itself"):
        preload.check_shim(copy)


def test_check_shim_rejects_what_the_loader_cannot_load(tmp_path: Path) -> None:
    """A file that is not a shared library fails with the dynamic loader's own reason."""
    junk = tmp_path / "libjunk.so"
    junk.write_bytes(b"not an ELF file\n" * 8)
    junk.chmod(0o755)
    with pytest.raises(preload.ShimError, match=r"cannot be loaded: .*invalid ELF header"):
        preload.check_shim(junk)


def test_check_shim_refuses_when_the_fd_variable_is_set(
    shim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the shim into a process with SSH_TO_JOB_SHIM_FD set is refused up front."""
    monkeypatch.setenv(preload.ENV_FD, "5")
    with pytest.raises(preload.ShimError, match=preload.ENV_FD):
        preload.check_shim(shim)


def test_encode_config_is_the_documented_text() -> None:
    """encode_config writes key=value lines in a fixed order and ends with 'end'."""
    cfg = preload.ShimConfig(uid=61001, gid=61002, name="u", home="/h", shell="/bin/sh")
    assert preload.encode_config(cfg) == (
        b"uid=61001\ngid=61002\nname=u\nhome=/h\nshell=/bin/sh\nhide_tty_group=1\nend\n"
    )
    cfg = attrs.evolve(cfg, hide_tty_group=False, gecos="Job 1")
    assert preload.encode_config(cfg).endswith(b"hide_tty_group=0\ngecos=Job 1\nend\n")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"uid": -1}, "uid"),
        ({"uid": 2**32 - 1}, "uid"),
        ({"uid": True}, "uid"),
        ({"gid": "1"}, "gid"),
        ({"name": ""}, "name"),
        ({"name": "a:b"}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"home": "rel"}, "home"),
        ({"home": "/a:b"}, "home"),
        ({"shell": "sh"}, "shell"),
        ({"gecos": "a:b"}, "gecos"),
        ({"hide_tty_group": 1}, "hide_tty_group"),
        ({"home": "/" + "h" * 20000}, "too long"),
    ],
)
def test_shim_config_validates_like_the_shim(changes: dict[str, object], field: str) -> None:
    """ShimConfig rejects what the C shim would refuse, naming the field."""
    kwargs: dict[str, object] = {
        "uid": 1,
        "gid": 1,
        "name": "u",
        "home": "/h",
        "shell": "/bin/sh",
        **changes,
    }
    with pytest.raises(ValueError, match=field):
        preload.ShimConfig(**kwargs)  # type: ignore[arg-type]


def test_parse_ack() -> None:
    """parse_ack returns the pid of 'ok', the reason of 'err', and names a missing shim."""
    assert preload.parse_ack(b"ok 4242\n") == 4242
    with pytest.raises(preload.ShimError, match="refused its configuration: uid bad"):
        preload.parse_ack(b"err uid bad\n")
    for junk in (b"", b"SSH-2.0-OpenSSH_9.2\r\n", b"ok x\n", b"ok 1\nok 2\n", b"ok 0\n"):
        with pytest.raises(preload.ShimError, match=re.escape(preload.NOT_LOADED)):
            preload.parse_ack(junk)


def test_run_handshake_times_out_clearly() -> None:
    """A peer that never answers makes run_handshake raise ShimError at the deadline."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cfg = preload.ShimConfig(uid=1, gid=1, name="u", home="/h", shell="/bin/sh")
        with pytest.raises(preload.ShimError, match=r"no answer from the shim within 0\.2 s"):
            preload.run_handshake(ours, cfg, 0.2)
        assert theirs.recv(4096) == preload.encode_config(cfg)


# --------------------------------------------------------------------------------------------
# real sshd


@attrs.frozen
class Server:
    """An sshd set-up owned by one uid: host key, authorized_keys, config, and a client."""

    uid: int
    gid: int
    name: str
    home: str
    dir: Path
    client: Path

    @property
    def alias(self) -> str:
        return f"stjt-{self.uid}"

    def proxy(self, *harness_args: str, shell: str = "/bin/sh") -> str:
        argv = [
            sys.executable,
            str(HARNESS),
            f"--uid={self.uid}",
            f"--gid={self.gid}",
            f"--name={self.name}",
            f"--home={self.home}",
            f"--shell={shell}",
            *harness_args,
            "--",
            "/usr/sbin/sshd",
            "-i",
            "-e",
            "-f",
            str(self.dir / "sshd_config"),
        ]
        return shlex.join(argv)

    def options(self, *harness_args: str) -> list[str]:
        return [
            "-F",
            "none",
            "-i",
            str(self.client / "id"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.client / 'known_hosts'}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            f"HostKeyAlias={self.alias}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "KexAlgorithms=curve25519-sha256",
            "-o",
            f"ProxyCommand={self.proxy(*harness_args)}",
        ]

    def ssh(
        self, command: str, *harness_args: str, tty: bool = False
    ) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", *self.options(*harness_args), *(["-tt"] if tty else [])]
        return _run(
            [*argv, f"{self.name}@job", command],
            stdin=subprocess.DEVNULL,
            env=_client_env(self.client),
        )


def _client_env(client: Path) -> dict[str, str]:
    return {**shimharness.CLEAN_ENV, "HOME": str(client), "SHELL": "/bin/sh"}


@pytest.fixture(scope="module")
def client(base: Path) -> Path:
    """The client side: root-only directory with a user key and a known_hosts file."""
    d = base / "client"
    d.mkdir(mode=0o700)
    res = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stjt", "-f", str(d / "id")])
    assert res.returncode == 0, res.stderr
    (d / "known_hosts").touch(mode=0o600)
    return d


def _server(base: Path, client: Path, *, uid: int, gid: int, name: str, home: str) -> Server:
    d = base / f"sshd-{uid}"
    d.mkdir(mode=0o700)
    res = _run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "host", "-f", str(d / "hostkey")]
    )
    assert res.returncode == 0, res.stderr
    shutil.copy(client / "id.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"HostKey {d / 'hostkey'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "UsePAM no\n"
        "PidFile none\n"
        "StrictModes no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        # sftp-server is a separate program without the shim: for a uid with no passwd entry
        # it stops at "No user found for uid"; internal-sftp runs inside sshd, with the shim.
        "Subsystem sftp internal-sftp\n"
    )
    for p in [d, *d.iterdir()]:
        os.chown(p, uid, gid)
    server = Server(uid=uid, gid=gid, name=name, home=home, dir=d, client=client)
    hostkey = (d / "hostkey.pub").read_text().split()
    with open(client / "known_hosts", "a") as f:
        f.write(f"{server.alias} {hostkey[0]} {hostkey[1]}\n")
    return server


@pytest.fixture(scope="module")
def bare_server(base: Path, client: Path, bare: Bare, run_sshd_dir: None) -> Server:
    return _server(base, client, uid=bare.uid, gid=bare.uid, name=bare.name, home=bare.home)


def _userdel(name: str) -> None:
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def real_users(base: Path, client: Path, run_sshd_dir: None) -> Iterator[dict[str, Server]]:
    """Two useradd users: one with /usr/sbin/nologin as shell, one whose home is missing."""
    uids = _free_ids(2, start=61101)
    suffix = f"{os.getpid() % 100000}"
    specs = {
        "nologin": (f"stjtnl{suffix}", uids[0], ["-m", "-s", "/usr/sbin/nologin"]),
        "nohome": (
            f"stjtnh{suffix}",
            uids[1],
            ["-M", "-d", f"/nonexistent/stjtnh{suffix}", "-s", "/bin/sh"],
        ),
    }
    servers: dict[str, Server] = {}
    try:
        for key, (name, uid, opts) in specs.items():
            _userdel(name)
            res = _run(["useradd", "-u", str(uid), "-U", *opts, name])
            assert res.returncode == 0, res.stderr
            entry = pwd.getpwnam(name)
            if key == "nologin":
                home = entry.pw_dir
                assert Path(home).is_dir()
            else:
                assert not Path(entry.pw_dir).exists()
                h = base / f"home-{uid}"
                h.mkdir(mode=0o700)
                os.chown(h, entry.pw_uid, entry.pw_gid)
                home = str(h)
            servers[key] = _server(
                base, client, uid=entry.pw_uid, gid=entry.pw_gid, name=name, home=home
            )
        yield servers
    finally:
        for name, _, _ in specs.values():
            _userdel(name)


def test_sshd_login_as_a_uid_without_passwd_entry(bare_server: Server) -> None:
    """Through the shim a bare uid logs in; the session runs as it and never sees the shim."""
    res = bare_server.ssh("id -u; pwd; echo ---; env")
    assert res.returncode == 0, res.stderr
    head, _, env = res.stdout.partition("---\n")
    assert head == f"{bare_server.uid}\n{bare_server.home}\n"
    names = {line.split("=", 1)[0] for line in env.splitlines()}
    assert "USER" in names
    assert "HOME" in names
    assert "LD_PRELOAD" not in names
    assert preload.ENV_FD not in names


def test_sshd_login_without_the_shim_is_denied(bare_server: Server) -> None:
    """The control: the same login with no shim is 'Permission denied' (Invalid user)."""
    res = bare_server.ssh("id -u", "--no-shim")
    assert res.returncode == 255
    assert "Permission denied" in res.stderr
    assert f"Invalid user {bare_server.name}" in res.stderr
    assert res.stdout == ""


def test_sshd_pty_works_with_tty_group_hidden(bare_server: Server) -> None:
    """ssh -tt gets a working /dev/pts pty for the bare uid when the tty group is hidden."""
    res = bare_server.ssh("tty; echo ok", tty=True)
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"/dev/pts/\d+\r?\nok\r?\n", res.stdout), res.stdout


def test_sshd_pty_fails_without_hiding_the_tty_group(bare_server: Server) -> None:
    """The control: with hide_tty_group=0, sshd dies chowning the pty to gid 5."""
    if _pts_has_tty_gid():
        pytest.skip("/dev/pts is mounted with gid=5 here: the chown is not needed")
    res = bare_server.ssh("tty; echo ok", "--show-tty-group", tty=True)
    assert res.returncode != 0
    assert "ok" not in res.stdout
    assert re.search(r"chown\(/dev/pts/\d+, \d+, 5\) failed", res.stderr), res.stderr


def test_sshd_nologin_user_runs_commands(real_users: dict[str, Server]) -> None:
    """A useradd user whose shell is nologin runs a command through the shim's /bin/sh."""
    server = real_users["nologin"]
    res = server.ssh("id -un; echo $SHELL; pwd")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{server.name}\n/bin/sh\n{server.home}\n"
    control = server.ssh("id -un", "--no-shim")
    assert control.returncode == 1
    assert "This account is currently not available" in control.stdout + control.stderr


def test_sshd_user_without_home_gets_the_shims_home(real_users: dict[str, Server]) -> None:
    """A useradd user whose home does not exist runs commands in the configured home."""
    server = real_users["nohome"]
    res = server.ssh("id -un; pwd; echo $HOME")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{server.name}\n{server.home}\n{server.home}\n"
    assert "Could not chdir" not in res.stderr


def test_scp_and_sftp_through_the_shim(bare_server: Server, base: Path) -> None:
    """scp uploads and sftp downloads a file as the bare uid (internal-sftp, inside sshd)."""
    src = base / "client" / "upload.txt"
    payload = "through the shim\n" * 100
    src.write_text(payload)
    env = _client_env(bare_server.client)
    up = _run(
        ["scp", "-q", *bare_server.options(), str(src), f"{bare_server.name}@job:up.txt"], env=env
    )
    assert up.returncode == 0, up.stderr
    uploaded = Path(bare_server.home) / "up.txt"
    assert uploaded.read_text() == payload
    assert uploaded.stat().st_uid == bare_server.uid

    dest = base / "client" / "down.txt"
    down = _run(
        ["sftp", "-q", *bare_server.options(), "-b", "-", f"{bare_server.name}@job"],
        input=f"get up.txt {dest}\n",
        env=env,
    )
    assert down.returncode == 0, down.stderr
    assert dest.read_text() == payload
