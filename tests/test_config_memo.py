"""``[pool] state_dir`` is remembered per config file in the user's runtime directory, so that
a session or ``stj`` command on a host with a config file does not load tomllib every time;
any change to the file, and any memo that is not ours and private, means a fresh parse."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

# Prints the state_dir and whether TOML was parsed for it (tomllib loaded).
PROBE = (
    "import sys; from ssh_to_job.common import _where; "
    "print(_where.config_state_dir(sys.argv[1])); print('tomllib' in sys.modules)"
)


def _probe(cfg: pathlib.Path, runtime: pathlib.Path) -> tuple[int, list[str], str]:
    env = {"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime), "HOME": str(runtime)}
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return r.returncode, r.stdout.split(), r.stderr


@pytest.fixture
def runtime(tmp_path: pathlib.Path) -> pathlib.Path:
    rt = tmp_path / "run"
    rt.mkdir(mode=0o700)
    (rt / f"ssh-to-job-{os.getuid()}").mkdir(mode=0o700)
    return rt


def _memo(runtime: pathlib.Path) -> pathlib.Path:
    return runtime / f"ssh-to-job-{os.getuid()}" / "config-state-dir"


def test_second_read_of_an_unchanged_file_parses_nothing(
    tmp_path: pathlib.Path, runtime: pathlib.Path
) -> None:
    """The first command parses and writes a 0600 memo; the next gets the same answer
    without loading tomllib."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[pool]\nstate_dir = "/srv/pool-a"\n[broker]\n')
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-a", "True"])
    assert (_memo(runtime).stat().st_mode & 0o777) == 0o600
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-a", "False"])


def test_a_changed_file_is_parsed_again_even_with_its_old_mtime(
    tmp_path: pathlib.Path, runtime: pathlib.Path
) -> None:
    """Same size, mtime put back: the change time still differs, so the new value is read."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[pool]\nstate_dir = "/srv/pool-a"\n')
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-a", "True"])
    st = cfg.stat()
    cfg.write_text('[pool]\nstate_dir = "/srv/pool-b"\n')
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cfg.stat().st_size == st.st_size
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-b", "True"])


def test_a_bad_file_is_an_error_whatever_was_remembered(
    tmp_path: pathlib.Path, runtime: pathlib.Path
) -> None:
    """A file that no longer parses fails as before: the memo never hides it."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[pool]\nstate_dir = "/srv/pool-a"\n')
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-a", "True"])
    cfg.write_text("[pool\n")
    rc, _out, err = _probe(cfg, runtime)
    assert rc == 1
    assert "config is not valid TOML" in err


def test_a_forged_or_unsafe_memo_is_not_believed(
    tmp_path: pathlib.Path, runtime: pathlib.Path
) -> None:
    """Garbage in the memo, or a memo directory others may write to, means a real parse; the
    latter is not written to either."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[pool]\nstate_dir = "/srv/pool-a"\n')
    _memo(runtime).write_text("{not json")
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-a", "True"])
    # A memo naming this very file but another state dir, in a directory open to others.
    fields = _memo(runtime).read_text().split("\0")
    assert fields[-1] == "/srv/pool-a", fields
    _memo(runtime).write_text("\0".join([*fields[:-1], "/elsewhere"]))
    _memo(runtime).parent.chmod(0o777)
    assert _probe(cfg, runtime)[:2] == (0, ["/srv/pool-a", "True"])
    assert _memo(runtime).read_text().split("\0")[-1] == "/elsewhere"
    # Back to private: the (forged) memo matches the file's key, and it is ours: believed,
    # as a user may always point their own commands anywhere (STJ_STATE_DIR does as much).
    _memo(runtime).parent.chmod(0o700)
    assert _probe(cfg, runtime)[:2] == (0, ["/elsewhere", "False"])


def test_the_session_sweep_keeps_the_memo(tmp_path: pathlib.Path) -> None:
    """sweep_stale (run by every session in the shared runtime directory) leaves the memo,
    removes a temp file a killed writer left, and still removes stale session directories."""
    from ssh_to_job.client.ssh_to_job import sweep_stale

    base = tmp_path / "rt"
    base.mkdir(mode=0o700)
    memo, leftover, stale = base / "config-state-dir", base / "config-state-dir.4242", base / "s"
    memo.write_text("{}")
    leftover.write_text("{}")
    stale.mkdir()
    (stale / "pid").write_text("999999999")  # beyond pid_max: no such process
    old = 1_000_000_000
    for p in (memo, leftover, stale):
        os.utime(p, (old, old))
    sweep_stale(base)
    assert sorted(p.name for p in base.iterdir()) == ["config-state-dir"]
