"""Slurm job names (``slurm:JOB[_TASK][.STEP][+NODE]``): parsed exactly, refused otherwise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssh_to_job.wire import SlurmId, parse_slurm_id

NODE = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
IDS = st.builds(
    SlurmId,
    job=st.integers(0, 10**10 - 1),
    task=st.none() | st.integers(0, 10**10 - 1),
    step=st.none() | st.just("batch") | st.integers(0, 10**9 - 1).map(str),
    node=st.just("") | NODE,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("slurm:1234", SlurmId(1234)),
        ("slurm-1234", SlurmId(1234)),
        ("slurm:1234_7", SlurmId(1234, 7)),
        ("slurm:1234.0", SlurmId(1234, step="0")),
        ("slurm:01234.007", SlurmId(1234, step="7")),
        ("slurm-1234.0", SlurmId(1234, step="0")),
        ("slurm:1234.batch", SlurmId(1234, step="batch")),
        ("slurm:1234_7.3", SlurmId(1234, 7, "3")),
        ("slurm:1234.0+1", SlurmId(1234, step="0", node="1")),
        ("slurm:1234.2+node017", SlurmId(1234, step="2", node="node017")),
        ("slurm:1234_7.2+n2.cluster", SlurmId(1234, 7, "2", "n2.cluster")),
        ("slurm:1234+n1", SlurmId(1234, node="n1")),
        (" slurm:1234.0\n", SlurmId(1234, step="0")),
        ("slurm:9999999999_9999999999.999999999", SlurmId(9999999999, 9999999999, "999999999")),
    ],
)
def test_parse_slurm_id_accepts(text: str, want: SlurmId) -> None:
    """Jobs, array tasks, steps (numbered or batch) and nodes parse, in Slurm's own spelling."""
    assert parse_slurm_id(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        "slurm:",
        "slurm:.0",
        "slurm:1234.",
        "slurm:1234..0",
        "slurm:1234.0.1",
        "slurm:1234.extern",
        "slurm:1234.Batch",
        "slurm:1234.-1",
        "slurm:1234.0x1",
        "slurm:1234.0_7",
        "slurm:1234+n1.0+n2",
        "slurm:1234+",
        "slurm:1234.0+",
        "slurm:1234.0+-n1",
        "slurm:1234." + "1" * 10,
        "slurm:" + "1" * 11,
        "slurm:1234 .0",
        "slurm:1234.\u0660",
        "slurm:\u0661\u0662",
        "slurm:1234.0\x00",
        "slurm_1234",
        "1234.0",
        "SLURM:1234",
    ],
)
def test_parse_slurm_id_rejects(text: str) -> None:
    """Anything else, including non-ASCII digits, junk and over-long numbers, is a ValueError."""
    with pytest.raises(ValueError, match="is not a Slurm job"):
        parse_slurm_id(text)


@given(IDS)
def test_round_trip(sid: SlurmId) -> None:
    """Every id prints as a name that parses back to it, under either prefix."""
    text = str(sid)
    assert parse_slurm_id(text) == sid
    assert parse_slurm_id("slurm-" + text.removeprefix("slurm:")) == sid


@given(IDS, st.text(min_size=1, max_size=4).filter(lambda t: t.strip() == t and t.strip("0")))
def test_trailing_junk_is_refused_or_means_something_else(sid: SlurmId, junk: str) -> None:
    """A valid name with characters after it never parses to the same id: it is refused, or
    (digits, a step, a node) it names another one. (Zeros after a 0 are leading zeros.)"""
    try:
        other = parse_slurm_id(str(sid) + junk)
    except ValueError:
        return
    assert other != sid


@given(IDS)
def test_every_prefix_is_refused_or_another_id(sid: SlurmId) -> None:
    """Fed one character at a time, each prefix of a name is refused or names another id
    (never the whole id early)."""
    text = str(sid)
    for i in range(len(text)):
        try:
            other = parse_slurm_id(text[:i])
        except ValueError:
            continue
        assert other != sid


def test_names_as_slurm_spells_them() -> None:
    """``name`` is the job or array task, ``step_name`` adds the step, str adds the node."""
    sid = SlurmId(1234, 7, "0", "n2")
    assert sid.name == "1234_7"
    assert sid.step_name == "1234_7.0"
    assert str(sid) == "slurm:1234_7.0+n2"
    assert SlurmId(5, step="batch").step_name == "5.batch"
    assert str(SlurmId(5)) == "slurm:5"
