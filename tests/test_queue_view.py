"""`stj q`'s views: one line per cluster by default (counted by the broker), every job with
`--nobatch`/`--all` and `--json`; held and debug-held clusters still say why and how to
connect."""

from __future__ import annotations

import json
import pathlib
import re
import socket
import time
import typing
from typing import Any

from conftest import Pool, User, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job import wire
from ssh_to_job.broker import _queue


def _rows(text: str) -> tuple[list[str], list[str], str]:
    """(header words, body lines, total line) of a `stj q` listing."""
    header, *rest = text.splitlines()
    assert rest[-2] == "", text
    return header.split(), rest[:-2], rest[-1]


def _cluster_block(body: list[str], cluster: str) -> tuple[list[str], list[str]]:
    """A cluster's row (split in words) and the note lines under it."""
    at = next(i for i, line in enumerate(body) if line.split()[0] == cluster)
    end = at + 1
    while end < len(body) and body[end].startswith(" "):
        end += 1
    return body[at].split(), [x.strip() for x in body[at + 1 : end]]


def test_summary_counts_each_cluster_by_state(pool: Pool, users: dict[str, User]) -> None:
    """`stj q` shows one line per cluster with its owner, submit time, counts by state and
    command, and a total; `--nobatch`, `--all` and `--json` list every job instead."""
    a, b = users["a"], users["b"]
    ids = pool.submit(a, "/bin/sleep", "300", count=3)
    (other,) = pool.submit(b, "/bin/sleep", "301")
    cluster = ids[0].split(".")[0]
    try:
        pool.stj(a, "hold", "--reason", "wait for me", ids[2])
        for job in ids[:2]:
            pool.wait_state(job, "running")
        pool.wait_state(ids[2], "held")
        header, body, total = _rows(pool.stj(b, "q").stdout)
        assert header == [
            "CLUSTER", "OWNER", "SUBMITTED", "IDLE", "RUN", "HOLD", "SUSP", "TOTAL", "SSH", "CMD"
        ]  # fmt: skip
        row, notes = _cluster_block(body, cluster)
        assert row[:2] == [cluster, "stjta"]
        assert re.fullmatch(r"\d\d/\d\d \d\d:\d\d:\d\d", f"{row[2]} {row[3]}")
        assert row[4:10] == ["0", "2", "1", "0", "3", "0"], row
        assert row[10:] == ["sleep", "300"]
        assert notes == ["held (1 job): wait for me"]
        row, notes = _cluster_block(body, other.split(".")[0])
        assert (row[1], row[5], row[8], notes) == ("stjtb", "1", "1", [])
        m = re.fullmatch(r"(\d+) jobs: (.*)", total)
        assert m, total
        parts = {state: n for n, state in (p.split() for p in m[2].split(", "))}
        assert int(m[1]) == sum(int(n) for n in parts.values())
        assert int(parts["running"]) >= 3
        assert int(parts["held"]) >= 1
        # Only the given cluster, and only an owner's.
        _, body, total = _rows(pool.stj(b, "q", cluster).stdout)
        assert [x.split()[0] for x in body if not x.startswith(" ")] == [cluster]
        assert total == "3 jobs: 1 held, 2 running"
        _, body, _ = _rows(pool.stj(b, "q", "--owner", "stjtb").stdout)
        assert {x.split()[1] for x in body if not x.startswith(" ")} == {"stjtb"}
        for flag in ("--nobatch", "--all"):
            header, body, total = _rows(pool.stj(b, "q", flag, cluster).stdout)
            assert header[0] == "ID"
            assert [x.split()[0] for x in body if not x.startswith(" ")] == ids
            assert total == "3 jobs: 1 held, 2 running"
        listed = json.loads(pool.stj(b, "q", "--json", cluster).stdout)
        assert [j["id"] for j in listed] == ids
    finally:
        pool.stj(a, "rm", cluster)
        pool.stj(b, "rm", other)


def test_summary_shows_a_debug_hold_and_how_to_connect(pool: Pool, users: dict[str, User]) -> None:
    """A cluster whose job failed into a debug hold says so under its row: the reason, the
    time left and the `ssh-to-job` command, which works."""
    a = users["a"]
    (job,) = pool.submit(a, "--debug-on", "exit", "/bin/sh", "-c", "sleep 1000 & exit 3")
    cluster = job.split(".")[0]
    try:

        def notes() -> list[str] | None:
            _, body, _ = _rows(pool.stj(a, "q", cluster).stdout)
            got = _cluster_block(body, cluster)[1]
            return got if len(got) == 2 else None

        held, debug = wait_for("a debug hold in stj q", notes)
        assert held.startswith("held (1 job): debug hold: the job failed with exit status 3")
        m = re.fullmatch(rf"debug hold \(1 job\): (.+) left; connect: ssh-to-job {job}", debug)
        assert m, debug
        assert pool.ssh(a, job, "echo in").stdout == "in\n"
    finally:
        pool.stj(a, "rm", cluster)


def test_summary_of_an_empty_or_unknown_selection(pool: Pool, users: dict[str, User]) -> None:
    """An unknown cluster or owner gives the header and "0 jobs"; a bad id is refused."""
    a = users["a"]
    t0 = time.monotonic()
    for args in (("99999",), ("--owner", "nosuchuserxyz"), ("--owner", "²")):
        header, body, total = _rows(pool.stj(a, "q", *args).stdout)
        assert (header[0], body, total) == ("CLUSTER", [], "0 jobs")
    r = pool.stj(a, "q", "abc", check=False)
    assert r.returncode == 2
    assert time.monotonic() - t0 < 10


def test_job_table_rows_equal_the_job_infos(tmp_path: pathlib.Path) -> None:
    """The broker's job_table pages (JSON written by SQLite, the spec spliced in) read back
    as exactly JobInfo's values: quotes, control characters, non-ASCII, nulls, pids, and times
    to the last bit; paged as asked, with one empty page for an empty listing."""
    q = _queue.JobQueue(tmp_path / "queue.db")
    try:
        spec = wire.JobSpec(
            executable='/bin/s"h\x1b', args=("-c", "ü \\ x"), env={}, initialdir="/tmp/a b"
        )
        q.submit(spec, 5, "stjta", 1001, 1001)
        q.submit(wire.JobSpec(executable="/bin/true"), 2, "stjtb", 1002, 1002)
        q.set_state("1.0", "held", hold_reason='why "\x07', debug_until=5.0, pid=77)
        q.set_state("1.1", "running", started=0.1 + 0.2, exit_code=3, exit_signal=9)
        pages = list(q.table_pages(page=3))
        assert len(pages) == 3
        rows = [r for p in pages for r in json.loads(p)]
        infos = [[getattr(i, c) for c in wire.JOB_COLUMNS] for i in q.infos()]
        assert rows == [[list(v) if isinstance(v, tuple) else v for v in i] for i in infos]
        assert rows[1][wire.JOB_COLUMNS.index("started")] == 0.1 + 0.2
        assert list(q.table_pages(wire.parse_job_id("99"))) == ["[]"]
    finally:
        q.close()


def test_job_table_rows_of_many_submit_times_and_nondefault_columns(tmp_path: pathlib.Path) -> None:
    """Jobs of 700 clusters (700 submit times on one page) and jobs whose columns leave their
    defaults one at a time read back as exactly JobInfo's values, as arrays and as objects."""
    q = _queue.JobQueue(tmp_path / "queue.db")
    try:
        for _ in range(700):
            q.submit(wire.JobSpec(executable="/bin/true"), 1, "stjta", 1001, 1001)
        q.submit(wire.JobSpec(executable="/bin/true", initialdir="/x"), 9, "stjtb", 1002, 1002)
        changes: list[dict[str, Any]] = [
            {"started": 0.0},
            {"finished": -0.0},
            {"exit_code": 0},
            {"exit_signal": 0},
            {"hold_reason": "h"},
            {"starter": "s"},
            {"pid": 1},
            {"scratch": "/s"},
            {"debug_until": 1e-7},
        ]
        for proc, change in enumerate(changes):
            q.set_state(f"701.{proc}", "held", **change)
        q.db.execute("UPDATE jobs SET sessions = 2 WHERE cluster = 700")
        infos = [[getattr(i, c) for c in wire.JOB_COLUMNS] for i in q.infos()]
        want = [[list(v) if isinstance(v, tuple) else v for v in i] for i in infos]
        assert len(want) == 709
        rows = [r for p in q.table_pages(page=1000) for r in json.loads(p)]
        assert rows == want
        objects = [r for p in q.table_pages(page=1000, objects=True) for r in json.loads(p)]
        assert objects == [dict(zip(wire.JOB_COLUMNS, r, strict=True)) for r in want]
    finally:
        q.close()


def test_json_listing_is_one_object_per_line_whatever_the_text(tmp_path: pathlib.Path) -> None:
    """`stj q --json`'s pages (objects keyed by the columns, written by SQLite) read back as
    the array rows' values, one object per line, also when a job's text contains what
    separates objects; a page with text outside ASCII is rewritten escaped, the same objects."""
    from ssh_to_job.client.stj import _json_lines

    q = _queue.JobQueue(tmp_path / "queue.db")
    try:
        spec = wire.JobSpec(
            executable="/bin/sh", args=("-c", '"},\n{" }, { ü\x1b\x9b'), env={}, initialdir="/t"
        )
        q.submit(spec, 3, "stjta", 1001, 1001)
        q.submit(wire.JobSpec(executable="/bin/true"), 1, "stjtb", 1002, 1002)
        q.set_state("1.1", "held", hold_reason="why\n ü\x9b", debug_until=5.0, pid=77)
        arrays = [r for p in q.table_pages(page=3) for r in json.loads(p)]
        pages = list(q.table_pages(page=3, objects=True))
        assert len(pages) == 2
        want = [dict(zip(wire.JOB_COLUMNS, r, strict=True)) for r in arrays]
        lines = [line for p in pages for line in p[1:-1].split("\n")]
        assert len(lines) == len(want) == 4
        assert [json.loads(line.rstrip(",")) for line in lines] == want
        assert all(list(json.loads(line.rstrip(","))) == list(wire.JOB_COLUMNS) for line in lines)
        assert not pages[0].isascii()
        redone = _json_lines(json.loads(pages[0]))
        assert redone.isascii()
        assert [json.loads(x.rstrip(",")) for x in redone.split("\n")] == want[:3]
        assert list(q.table_pages(wire.parse_job_id("99"), objects=True)) == ["[]"]
    finally:
        q.close()


def test_job_table_reads_a_page_at_a_time_in_job_order(tmp_path: pathlib.Path) -> None:
    """The listing's rows are looked up a page at a time (only the keys are sorted up front),
    in (cluster, proc) order across states and owners; a job that finishes while earlier pages
    are out is left out of the later ones, and one that changes between live states is listed
    as it is now."""
    q = _queue.JobQueue(tmp_path / "queue.db")
    try:
        for owner, uid in (("stjta", 1001), ("stjtb", 1002), ("stjta", 1001)):
            q.submit(wire.JobSpec(executable="/bin/true"), 4, owner, uid, uid)
        # Procs of a cluster in other states, so that no one state index gives the order.
        q.set_state("1.2", "held", hold_reason="h")
        q.set_state("2.1", "running", pid=5)
        q.set_state("3.0", "held", hold_reason="h")
        pages = q.table_pages(page=5)
        first = json.loads(next(pages))
        q.set_state("2.3", "completed", exit_code=0)  # on a later page: not listed
        q.set_state("3.1", "held", hold_reason="now")  # listed as held
        q.set_state("1.0", "completed", exit_code=0)  # already out: stays listed
        rest = [r for p in pages for r in json.loads(p)]
        rows = first + rest
        col = wire.JOB_COLUMNS.index
        ids = [r[col("id")] for r in rows]
        want = [f"{c}.{p}" for c in (1, 2, 3) for p in range(4) if f"{c}.{p}" != "2.3"]
        assert ids == want
        assert len(first) == 5
        assert rows[0][col("state")] == "idle"
        by_id = {r[col("id")]: r for r in rows}
        assert by_id["3.1"][col("state")] == "held"
        assert by_id["3.1"][col("hold_reason")] == "now"
        # An owner's jobs and one cluster's keep the same order.
        mine = [r for p in q.table_pages(owner_uid=1001, page=2) for r in json.loads(p)]
        assert [r[col("id")] for r in mine] == [i for i in want if i[0] in "13" and i != "1.0"]
        one = [r for p in q.table_pages(wire.parse_job_id("3"), page=3) for r in json.loads(p)]
        assert [r[col("id")] for r in one] == ["3.0", "3.1", "3.2", "3.3"]
    finally:
        q.close()


def _object_rows(*rows: dict[str, Any]) -> str:
    """A page of objects written as the broker writes it (JSON's own escapes for the rest)."""
    return "[" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows) + "]"


_ROW: dict[str, Any] = {
    "id": "1.0",
    "owner": "ann",
    "owner_uid": 1001,
    "state": "held",
    "executable": "/bin/sh",
    "args": ["-c", 'echo "a\\b"\t/'],
    "submitted": 1795570608.0099912,
    "started": None,
    "finished": 1e-07,
    "exit_code": -3,
    "exit_signal": None,
    "hold_reason": "why\x1b[31m",
    "starter": "vm",
    "pids": [77, 0],
    "scratch": "",
    "initialdir": "/",
    "sessions": 0,
    "debug_until": 0.0,
}


def test_object_pages_match_the_pattern_only_with_exact_rows(tmp_path: pathlib.Path) -> None:
    """The broker's pages of objects match the client's pattern, which then stands for the
    parse; a row with keys swapped, repeated, missing or extra, whitespace, a value of
    another type, NaN, a leading zero, a raw control character or text outside ASCII does
    not match (and goes to json.loads)."""
    from ssh_to_job.client._broker import _object_page

    match = _object_page().fullmatch
    q = _queue.JobQueue(tmp_path / "queue.db")
    try:
        spec = wire.JobSpec(executable="/bin/s\"h\x1b'", args=("-c", "\\ x\x7e"), initialdir="/")
        q.submit(spec, 4, "stjta", 1001, 1001)
        q.set_state("1.0", "held", hold_reason='why "\x07', debug_until=5.5, pid=77)
        q.set_state("1.1", "running", started=0.1 + 0.2, exit_code=-3, exit_signal=9)
        pages = [*q.table_pages(page=3, objects=True), "[]"]
        assert all(match(p) for p in pages), pages
    finally:
        q.close()
    page = _object_rows(_ROW)
    assert match(page)
    assert match(_object_rows(_ROW, _ROW, {**_ROW, "args": [], "pids": [], "started": 5}))
    swapped = dict(reversed(list(_ROW.items())))
    bad = [
        _object_rows(swapped),
        page.replace('"owner":"ann"', '"owner":"ann","owner":"ann"'),
        page.replace(',"scratch":""', ""),
        page.replace("}", ',"x":1}'),
        page.replace('"owner":"ann"', '"owner": "ann"'),
        page.replace("[{", "[ {"),
        page.replace('"owner_uid":1001', '"owner_uid":"1001"'),
        page.replace('"owner_uid":1001', '"owner_uid":1001.0'),
        page.replace('"sessions":0', '"sessions":null'),
        page.replace('"debug_until":0.0', '"debug_until":NaN'),
        page.replace('"owner_uid":1001', '"owner_uid":01001'),
        page.replace('"args":["-c"', '"args":[{"a":1}'),
        page.replace("vm", "v\tm"),
        page.replace("vm", "v\x7fm"),
        page.replace("vm", "vü"),
        page.replace("0.0}]", "0.0}\n]"),
        _object_rows(_ROW) + "\n",
        "[" + json.dumps(_ROW, separators=(",", ":")) + "," + json.dumps(_ROW) + "]",
    ]
    for text in bad:
        assert text != page
        assert not match(text), text


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.integers(min_value=-9, max_value=9) | st.text(max_size=3), max_size=3),
)


@settings(max_examples=200)
@given(
    data=st.data(),
    keys=st.permutations(wire.JOB_COLUMNS).map(tuple) | st.just(wire.JOB_COLUMNS),
)
def test_what_the_object_pattern_matches_is_exact_json_rows(
    data: st.DataObject, keys: tuple[str, ...]
) -> None:
    """Whatever rows the pattern matches parse as JSON objects of exactly the columns in
    order, each value of its JobInfo field's JSON type; rows of the right types and keys
    in ASCII without DEL always match."""
    from ssh_to_job.client._broker import _object_page

    hints = typing.get_type_hints(wire.JobInfo)
    rows = [
        {k: data.draw(_value_of(hints[k]), label=k) for k in keys}
        for _ in range(data.draw(st.integers(1, 3)))
    ]
    if data.draw(st.booleans(), label="one value of any type"):
        rows[-1][data.draw(st.sampled_from(keys))] = data.draw(_VALUES)
    text = _object_rows(*rows)
    got = _object_page().fullmatch(text)
    parsed = json.loads(text, object_pairs_hook=lambda pairs: pairs)
    fits = keys == wire.JOB_COLUMNS and all(_fits(v, hints[k]) for r in parsed for k, v in r)
    if got:
        assert fits
        assert all([k for k, _ in r] == list(wire.JOB_COLUMNS) for r in parsed)
    else:
        assert not fits or "\x7f" in text


def _value_of(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a JobInfo field's type, as JSON has them."""
    if tp is str:
        return st.text(max_size=6)
    if tp is int:
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return st.lists(_value_of(args[0]), max_size=3)
    return st.none() | _value_of(args[0])


def _fits(value: Any, tp: Any) -> bool:
    """Whether a parsed JSON value is of a JobInfo field's type (a float field takes ints)."""
    if tp is str or tp is int:
        return type(value) is tp
    if tp is float:
        return type(value) in (int, float)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return type(value) is list and all(_fits(v, args[0]) for v in value)
    return value is None or _fits(value, args[0])


def _table_client(pages: list[str], objects: bool) -> tuple[list[tuple[Any, str, int]], str]:
    """What ``BrokerClient.job_table`` hands on for these pages from a broker (a socketpair
    end fed the frames), and the error it raised, if any."""
    from ssh_to_job.client._broker import BrokerClient, BrokerUnavailable

    ours, theirs = socket.socketpair()
    bc = BrokerClient.__new__(BrokerClient)
    bc.sock, bc.fds = ours, []
    bc.conn = wire.Connection(wire.Channel.CONTROL, wire.Role.CLIENT, wire.Role.BROKER)
    for i, text in enumerate(pages):
        msg = wire.JobTable(wire.JOB_COLUMNS, text, last=i == len(pages) - 1)
        theirs.sendall(wire.encode_frame(wire.encode_message(msg)))
    got: list[tuple[Any, str, int]] = []
    try:
        with bc:
            bc.job_table(wire.Query(objects=objects), lambda *a: got.append(a))
    except BrokerUnavailable as exc:
        return got, str(exc)
    finally:
        theirs.close()
    return got, ""


def test_job_table_pages_not_matched_are_parsed_as_strictly() -> None:
    """A page of objects the pattern matches is handed on unparsed with its row count; one
    outside ASCII is parsed; a row with a key repeated, swapped or missing is refused even
    as valid JSON, and so is an array row of the wrong length."""
    page = _object_rows(_ROW, _ROW)
    got, err = _table_client([page, "[]"], objects=True)
    assert (got, err) == ([(None, page, 2), (None, "[]", 0)], "")
    wide = _object_rows(_ROW).replace('"ann"', '"ü"')
    got, err = _table_client([wide], objects=True)
    assert (got, err) == ([([{**_ROW, "owner": "ü"}], wide, 1)], "")
    for bad in (
        page.replace('"owner":"ann"', '"owner":"ann","owner":"ann"'),
        _object_rows(dict(reversed(list(_ROW.items())))),
        page.replace(',"scratch":""', ""),
        '[{"a":1}]',
        "[" * 100_000,
    ):
        got, err = _table_client([page, bad], objects=True)
        assert (len(got), err) == (1, "the broker sent malformed job rows")
    row = list(_ROW.values())
    got, err = _table_client([json.dumps([row])], objects=False)
    assert (got, err) == ([([row], json.dumps([row]), 1)], "")
    got, err = _table_client([json.dumps([row, row[1:]])], objects=False)
    assert (got, err) == ([], "the broker sent malformed job rows")
