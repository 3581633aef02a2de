"""The starter's job description and durable records, without processes: planning refuses what
can never start, records round-trip, and the reaper's lines are parsed strictly."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess

import attrs
import pytest

from ssh_to_job import starter as starter_package
from ssh_to_job import wire
from ssh_to_job.starter._jobs import (
    RUNNING,
    UNSTARTED,
    CannotStart,
    Job,
    Records,
    parse_exec,
    parse_report,
    parse_status,
    plan_job,
    status_word,
)


def _run(*argv: str, env: dict[str, str] | None = None, uid: int = 62001) -> wire.JobRun:
    spec = wire.JobSpec(executable=argv[0], args=tuple(argv[1:]), env=env or {})
    return wire.JobRun(id="7.3", uid=uid, gid=uid, owner="someone", spec=spec)


def _plan(run: wire.JobRun, tmp_path: pathlib.Path) -> object:
    return plan_job(
        run,
        execute_dir=tmp_path / "execute",
        spool_dir=tmp_path / "spool",
        cgroup_base=tmp_path / "cg",
        starter_name="here",
    )


@pytest.mark.parametrize(
    ("run", "why"),
    [
        (_run("/bin/echo", "a\0b"), "an argument contains a NUL byte"),
        (_run("/bin/ec\0ho"), "the executable contains a NUL byte"),
        (_run("/bin/true", env={"A=B": "1"}), "bad environment variable name 'A=B'"),
        (_run("/bin/true", env={"": "1"}), "bad environment variable name ''"),
        (_run("/bin/true", env={"A": "x\0y"}), "environment variable A contains a NUL byte"),
        (_run("/bin/true", uid=0), "jobs never run as root"),
        (_run(""), "no executable given"),
        (attrs.evolve(_run("/bin/true"), id="../x"), "bad job id '../x'"),
    ],
)
def test_plan_refuses_jobs_that_can_never_start(
    run: wire.JobRun, why: str, tmp_path: pathlib.Path
) -> None:
    """Inputs that exec or the environment cannot carry are CannotStart, with the reason."""
    with pytest.raises(CannotStart) as info:
        _plan(run, tmp_path)
    assert str(info.value) == why


def test_plan_is_frozen_and_complete(tmp_path: pathlib.Path) -> None:
    """A plan holds the paths and environment the job runs with, and cannot be changed."""
    plan = plan_job(
        _run("/bin/true", env={"X": "1"}),
        execute_dir=tmp_path,
        spool_dir=tmp_path / "spool",
        cgroup_base=None,
        starter_name="here",
    )
    assert plan.scratch == tmp_path / "job_7_3"
    assert plan.env["X"] == "1"
    assert plan.env["SSH_TO_JOB_SCRATCH_DIR"] == str(tmp_path / "job_7_3")
    assert plan.argv == ["/bin/true"]
    with pytest.raises(AttributeError):
        plan.scratch = tmp_path  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.env["X"] = "2"  # type: ignore[index]


def test_records_round_trip_and_are_private(tmp_path: pathlib.Path) -> None:
    """A running record reads back as the same plan and pids; a final one as the same report;
    the directory is 0700 and the files 0600."""
    records = Records(tmp_path / "jobs")
    records.prepare()
    plan = plan_job(
        _run("/bin/sh", "-c", "exit 3", env={"K": "v"}),
        execute_dir=tmp_path,
        spool_dir=tmp_path,
        cgroup_base=tmp_path / "cg",
        starter_name="here",
    )
    job = Job(plan, lambda _msg: None, pid=100, reaper_pid=99, started=12.5)
    records.write_running(job, reaper_start=4242)
    [back] = records.load()
    assert back.plan == plan
    assert (back.pid, back.reaper_pid, back.reaper_start, back.started) == (100, 99, 4242, 12.5)
    assert stat.S_IMODE(os.stat(records.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(records.path(plan.id)).st_mode) == 0o600
    report = wire.JobReport(id=plan.id, running=False, exit_code=3, stdout_tail=b"\x00\xff")
    records.write_final(report)
    [final] = records.load()
    assert final.final == report
    records.forget(plan.id)
    assert records.load() == []


def test_an_unreadable_record_is_dropped(tmp_path: pathlib.Path) -> None:
    """A corrupt record is removed (and logged) instead of stopping the starter."""
    records = Records(tmp_path / "jobs")
    records.prepare()
    records.path("1.0").write_text("{not json")
    assert records.load() == []
    assert not records.path("1.0").exists()


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("exit 0\n", (0, None)),
        ("exit 255\n", (255, None)),
        ("signal 9\n", (None, 9)),
        ("exit 256\n", None),
        ("signal 0\n", None),
        ("exit -1\n", None),
        ("", None),
        ("exit 1e3", None),
        ("ok 1", None),
    ],
)
def test_status_lines_are_parsed_strictly(
    text: str, status: tuple[int | None, int | None] | None
) -> None:
    """Only well-formed reaper status lines count; anything else is "unknown"."""
    assert parse_status(text) == status


def test_report_lines() -> None:
    """The reaper's first line gives the pid, or the exec error as an OSError."""
    assert parse_report(b"pid 1234\n") == 1234
    with pytest.raises(OSError, match="No such file or directory") as info:
        parse_report(b"error 2\n")
    assert info.value.errno == 2
    for junk in (b"", b"pid 0\n", b"pid x\n", b"hello\n"):
        with pytest.raises(OSError, match="did not report its pid"):
            parse_report(junk)


def test_exec_lines() -> None:
    """The reaper's second line: "ok", or why the job did not start."""
    parse_exec(b"ok")
    with pytest.raises(OSError, match="Permission denied") as info:
        parse_exec(b"error 13")
    assert info.value.errno == 13
    for junk in (b"", b"error 0", b"ok 1", b"pid 3"):
        with pytest.raises(OSError, match="did not say"):
            parse_exec(junk)


def test_status_after_running_is_the_last_line() -> None:
    """The reaper writes "running" when the job execs, then its ending; a job that never got
    its go says "unstarted"."""
    assert parse_status("running\n") is None
    assert status_word("running\n") == RUNNING
    assert parse_status("running\nexit 3\n") == (3, None)
    assert parse_status("running\nsignal 9\n") == (None, 9)
    assert status_word("unstarted\n") == UNSTARTED
    assert parse_status("unstarted\n") is None
    assert status_word("") == ""


REAPER = pathlib.Path(starter_package.__file__).parent / "stj-reaper"


def _reaper(tmp_path: pathlib.Path, program: list[str], go: bool) -> tuple[list[str], str]:
    """Run the installed reaper; send the go byte or not; its report lines and status file."""
    status = tmp_path / "status"
    status_fd = os.open(status, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    proc = subprocess.Popen(
        [str(REAPER), str(status_fd), str(report_w), str(go_r), *program],
        pass_fds=(status_fd, report_w, go_r),
    )
    for fd in (status_fd, report_w, go_r):
        os.close(fd)
    with os.fdopen(report_r, "rb") as report:
        first = report.readline().decode()
        if go:
            os.write(go_w, b"g")
        os.close(go_w)
        rest = report.read().decode()
    proc.wait(10)
    return [first.strip(), *rest.split()], status.read_text()


def test_the_reaper_waits_for_its_go(tmp_path: pathlib.Path) -> None:
    """With the go byte the job runs; without it (its starter died before recording it) the job
    never runs and the status says so; an exec failure is reported with its errno."""
    marker = tmp_path / "ran"
    lines, status = _reaper(tmp_path, ["/bin/sh", "-c", f"touch {marker}; exit 4"], go=True)
    assert lines[0].startswith("pid ")
    assert lines[1:] == ["ok"]
    assert status == "running\nexit 4\n"
    assert marker.exists()
    marker.unlink()
    (tmp_path / "status").unlink()
    lines, status = _reaper(tmp_path, ["/bin/sh", "-c", f"touch {marker}"], go=False)
    assert lines[0].startswith("pid ")
    assert lines[1:] == ["error", "0"]
    assert status == "unstarted\n"
    assert not marker.exists()
    (tmp_path / "status").unlink()
    lines, status = _reaper(tmp_path, [str(tmp_path / "nothing-here")], go=True)
    assert lines[1:] == ["error", "2"]
    assert status == "error 2\n"
