"""The starter's job description and durable records, without processes: planning refuses what
can never start, records round-trip, and the reaper's lines are parsed strictly."""

from __future__ import annotations

import os
import pathlib
import stat

import attrs
import pytest

from ssh_to_job import wire
from ssh_to_job.starter._jobs import (
    CannotStart,
    Job,
    Records,
    parse_report,
    parse_status,
    plan_job,
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
