"""Job rows in listings: defaults left out on the wire, restored on decoding."""

from __future__ import annotations

import json

from ssh_to_job import wire


def test_idle_row_carries_only_what_differs_from_defaults() -> None:
    """An idle job's row is written without its default fields, byte for byte."""
    info = wire.JobInfo(
        id="7.0",
        owner="alice",
        owner_uid=1000,
        state="idle",
        executable="/bin/sleep",
        args=("60",),
        submitted=1.5,
    )
    payload = wire.encode_message(wire.JobList(jobs=(info,), last=True))
    assert payload == (
        b'{"jobs":[{"id":"7.0","owner":"alice","owner_uid":1000,"state":"idle",'
        b'"executable":"/bin/sleep","args":["60"],"submitted":1.5}],"last":true,'
        b'"type":"job_list"}'
    )
    assert wire.decode_message(payload) == wire.JobList(jobs=(info,), last=True)


def test_fields_that_differ_are_written_and_round_trip() -> None:
    """A running job's non-default fields are all on the wire and come back equal."""
    info = wire.JobInfo(
        id="7.1",
        owner="bob",
        owner_uid=1001,
        state="running",
        executable="/bin/sh",
        args=(),
        submitted=1.0,
        started=2.0,
        exit_code=0,
        starter="vm",
        pids=(42,),
        scratch="/x",
        sessions=2,
    )
    body = json.loads(wire.encode_message(wire.JobList(jobs=(info,))))
    row = body["jobs"][0]
    assert set(row) == {
        "id",
        "owner",
        "owner_uid",
        "state",
        "executable",
        "args",
        "submitted",
        "started",
        "exit_code",
        "starter",
        "pids",
        "scratch",
        "sessions",
    }
    decoded = wire.decode_message(wire.encode_message(wire.JobList(jobs=(info,))))
    assert decoded == wire.JobList(jobs=(info,))


def test_other_messages_still_write_every_field() -> None:
    """Leaving defaults out is JobInfo's alone: a Submit keeps hold_on_failure=false."""
    payload = wire.encode_message(wire.Submit(spec=wire.JobSpec(executable="/bin/true")))
    assert b'"hold_on_failure":false' in payload
    assert b'"count":1' in payload
