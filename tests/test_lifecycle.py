"""The job lifecycle table (broker/_lifecycle.py), sans-IO: every rule, who may, random walks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssh_to_job.broker import _lifecycle as lc
from ssh_to_job.broker._lifecycle import Actor, Event, Job, Signal, State, decide

S, E = State, Event

#: A job on a connected starter, in each live state.
RUNNING = Job(S.RUNNING, on_starter=True, connected=True)
SUSPENDED = Job(S.SUSPENDED, on_starter=True, connected=True)
IDLE = Job(S.IDLE)
HELD_OFF = Job(S.HELD)
HELD_EVICTING = Job(S.HELD, on_starter=True, connected=True)
DEBUG_HELD = Job(S.HELD, on_starter=True, connected=True, debug_hold=True)


@pytest.mark.parametrize(
    ("job", "event", "state", "on", "signal"),
    [
        (IDLE, E.MATCH, S.RUNNING, True, Signal.RUN),
        (RUNNING, E.REPORT_RUNNING, S.RUNNING, True, None),
        (RUNNING, E.REPORT_EXITED, S.COMPLETED, False, None),
        (RUNNING, E.REPORT_FAILED_HOLD, S.HELD, False, None),
        (RUNNING, E.REPORT_COULD_NOT_START, S.HELD, False, None),
        (RUNNING, E.REPORT_DEBUG_HOLD, S.HELD, True, None),
        (RUNNING, E.RM, S.REMOVED, True, Signal.KILL),
        (RUNNING, E.HOLD, S.HELD, True, Signal.EVICT),
        (RUNNING, E.SUSPEND, S.SUSPENDED, True, Signal.SUSPEND),
        (SUSPENDED, E.CONTINUE, S.RUNNING, True, Signal.CONTINUE),
        (RUNNING, E.LOST, S.IDLE, False, None),
        (IDLE, E.HOLD, S.HELD, False, None),
        (IDLE, E.RM, S.REMOVED, False, None),
        (HELD_OFF, E.RELEASE, S.IDLE, False, None),
        (HELD_EVICTING, E.RELEASE, S.RELEASING, True, None),
        (DEBUG_HELD, E.RELEASE, S.RELEASING, True, Signal.EVICT),
        (DEBUG_HELD, E.REPORT_EXITED, S.HELD, False, None),  # the debug hold expired
        (DEBUG_HELD, E.LOST, S.HELD, False, None),
        (Job(S.RELEASING, True, True, True), E.REPORT_EXITED, S.IDLE, False, None),
        (Job(S.RELEASING, True, True), E.LOST, S.IDLE, False, None),
        (Job(S.RELEASING, True, True), E.HOLD, S.HELD, True, None),
        (HELD_EVICTING, E.REPORT_RUNNING, S.HELD, True, Signal.EVICT),
        (Job(S.REMOVED, True), E.REPORT_RUNNING, S.REMOVED, True, Signal.KILL),
        (Job(S.REMOVED, True), E.REPORT_EXITED, S.REMOVED, False, None),
        (Job(S.COMPLETED), E.REPORT_RUNNING, S.COMPLETED, True, Signal.KILL),
        # A copy of an idle job on some starter is evicted, never adopted.
        (IDLE, E.REPORT_RUNNING, S.IDLE, True, Signal.EVICT),
        (Job(S.IDLE, True), E.REPORT_EXITED, S.IDLE, False, None),
    ],
)
def test_rules(job: Job, event: Event, state: State, on: bool, signal: Signal | None) -> None:
    """Each named transition goes to its state, placement and starter signal."""
    actor = (
        Actor.OWNER
        if event in lc.USER_EVENTS
        else Actor.BROKER
        if event in lc.BROKER_EVENTS
        else Actor.STARTER
    )
    d = decide(job, event, actor)
    assert d.refusal is None
    assert (d.job.state, d.job.on_starter, d.signal) == (state, on, signal)


@pytest.mark.parametrize(
    ("job", "event", "refusal"),
    [
        (HELD_OFF, E.HOLD, "is already held"),
        (RUNNING, E.RELEASE, "is not held (it is running)"),
        (IDLE, E.SUSPEND, "is idle, not running"),
        (RUNNING, E.CONTINUE, "is running, not suspended"),
        (Job(S.REMOVED), E.RM, "is not in the queue"),
        (Job(S.COMPLETED), E.HOLD, "is not in the queue"),
        (Job(S.RUNNING, True, connected=False), E.SUSPEND, "its starter is not connected"),
        (RUNNING, E.MATCH, "is running; cannot match it"),
    ],
)
def test_refusals(job: Job, event: Event, refusal: str) -> None:
    """Events that do not apply are refused with a reason and leave the job as it was."""
    actor = Actor.BROKER if event in lc.BROKER_EVENTS else Actor.OWNER
    d = decide(job, event, actor)
    assert d.refusal == refusal
    assert d.job == job
    assert d.signal is None


@pytest.mark.parametrize("event", list(Event))
def test_who_may(event: Event) -> None:
    """Users act only as owner or superuser, starters only report, the broker only matches and
    reconciles; an outsider or another starter is refused whatever the state."""
    for actor in Actor:
        allowed = lc.may(actor, event)
        expected = {
            Actor.OWNER: event in lc.USER_EVENTS,
            Actor.SUPERUSER: event in lc.USER_EVENTS,
            Actor.OTHER_USER: False,
            Actor.BROKER: event in lc.BROKER_EVENTS,
            Actor.STARTER: event in lc.STARTER_EVENTS,
            Actor.OTHER_STARTER: False,
        }[actor]
        assert allowed == expected, (actor, event)
        if not allowed:
            for state in State:
                d = decide(Job(state, True, True), event, actor)
                assert d.refusal is not None
                assert d.job == Job(state, True, True)


def test_table_is_total_for_reports() -> None:
    """Every starter report and every reconcile has a rule in every reachable (state, on a
    starter or not) (a starter's word is never an error, only something to act on)."""
    t = lc.table()
    for state in State:
        for on in (True, False):
            if state in (S.RUNNING, S.SUSPENDED) and not on:
                continue  # unreachable: running means on a starter (checked by the walks)
            for event in lc.STARTER_EVENTS | {Event.LOST}:
                assert (state, event, on) in t, (state, event, on)


jobs = st.builds(
    Job,
    state=st.sampled_from(State),
    on_starter=st.booleans(),
    connected=st.booleans(),
    debug_hold=st.booleans(),
).filter(lambda j: j.on_starter or not j.debug_hold)
steps = st.lists(st.tuples(st.sampled_from(Event), st.sampled_from(Actor)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(steps, st.booleans())
def test_random_walks_keep_the_rules(walk: list[tuple[Event, Actor]], connected: bool) -> None:
    """From a fresh job, any sequence of events by anyone: the job is always in a known state,
    a finished job never comes back, it is matched only while idle and on no starter, signals
    go only to a job on a starter, and debug_hold never outlives the placement."""
    job = Job(S.IDLE, connected=connected)
    finished_as: State | None = None
    for event, actor in walk:
        d = decide(job, event, actor)
        after = d.job
        assert after.state in State
        assert not after.debug_hold or after.on_starter
        if d.refusal is not None or d.noop:
            assert after == job
            assert d.signal is None
        if finished_as is not None:
            assert after.state is finished_as
        if after.state in lc.FINISHED:
            finished_as = after.state
        if d.signal is Signal.RUN:
            assert (job.state, job.on_starter) == (S.IDLE, False)
            assert (after.state, after.on_starter) == (S.RUNNING, True)
        elif d.signal is not None:
            assert job.on_starter or after.on_starter
        if after.state in (S.RUNNING, S.SUSPENDED):
            assert after.on_starter
        if job.state in lc.FINISHED:
            assert d.signal in (None, Signal.KILL)
        job = after


@settings(max_examples=300, deadline=None)
@given(jobs, st.sampled_from(Event), st.sampled_from(Actor))
def test_any_job_any_event(job: Job, event: Event, actor: Actor) -> None:
    """decide() is total: any job, any event, any actor gives a decision, never an exception,
    and a job that is on a starter only leaves it by that starter's word or a reconcile."""
    d = decide(job, event, actor)
    if job.on_starter and not d.job.on_starter:
        assert event in lc.STARTER_EVENTS | {Event.LOST}
    if not job.on_starter and d.job.on_starter:
        assert event in {Event.MATCH, Event.REPORT_RUNNING, Event.REPORT_DEBUG_HOLD}
