"""The job lifecycle: one table of states, events and who may cause them. No I/O, no clock.

A job is a small value (``Job``): its state, whether its processes (or a debug-held remainder)
are on a starter, whether that starter is connected now, and whether it is kept for debugging.
``decide(job, event, actor)`` looks the event up in the table and returns a ``Decision``: the
job afterwards and what to tell its starter, or a refusal meant for a person. The broker applies
decisions to the SQLite queue (``_jobs.py``); this module never touches it, so the whole
lifecycle is tested in milliseconds (``tests/test_lifecycle.py``).

Rules that the table keeps and the tests check on random event sequences:

- a finished job (``completed``, ``removed``) never becomes live again;
- only an ``idle`` job is matched to a starter, and a job is on at most one starter: a job on a
  starter goes back to ``idle`` only once that starter reports it gone (or says it lost it);
- a signal goes only to a job that is on a starter;
- users act only on their own jobs unless they are a queue superuser; starters report only on
  their own jobs.
"""

from __future__ import annotations

import enum

import attrs


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    SUSPENDED = "suspended"
    HELD = "held"
    #: Released while still on its starter (kept for debugging, or being evicted): it goes back
    #: to idle when the starter reports it gone, and not before (it must not run twice).
    RELEASING = "releasing"
    COMPLETED = "completed"
    REMOVED = "removed"


LIVE = frozenset({State.IDLE, State.RUNNING, State.SUSPENDED, State.HELD, State.RELEASING})
FINISHED = frozenset({State.COMPLETED, State.REMOVED})


class Event(enum.Enum):
    # users
    RM = "rm"
    HOLD = "hold"
    RELEASE = "release"
    SUSPEND = "suspend"
    CONTINUE = "continue"
    # the broker itself
    MATCH = "match"
    #: A reconnecting starter's sync does not list the job: it never got it or lost it.
    LOST = "lost"
    # the job's starter
    REPORT_RUNNING = "report_running"
    #: The job failed and the starter keeps it for debugging (``hold_on_failure``).
    REPORT_DEBUG_HOLD = "report_debug_hold"
    #: The job's processes are gone: it exited, was evicted or killed, or its debug hold ended
    #: (``debug_hold_time`` expired on the starter, or a release/rm ended it).
    REPORT_EXITED = "report_exited"
    #: Same, but it failed and was submitted with ``hold_on_failure``: hold it.
    REPORT_FAILED_HOLD = "report_failed_hold"
    #: The starter could not start it at all (bad executable, bad environment, ...).
    REPORT_COULD_NOT_START = "report_could_not_start"


USER_EVENTS = frozenset({Event.RM, Event.HOLD, Event.RELEASE, Event.SUSPEND, Event.CONTINUE})
BROKER_EVENTS = frozenset({Event.MATCH, Event.LOST})
STARTER_EVENTS = frozenset(
    {
        Event.REPORT_RUNNING,
        Event.REPORT_DEBUG_HOLD,
        Event.REPORT_EXITED,
        Event.REPORT_FAILED_HOLD,
        Event.REPORT_COULD_NOT_START,
    }
)


class Actor(enum.Enum):
    OWNER = "owner"
    SUPERUSER = "superuser"
    #: A user who is neither the owner nor a queue superuser.
    OTHER_USER = "other_user"
    BROKER = "broker"
    #: The starter the job is on (or any starter, for a job on none).
    STARTER = "starter"
    #: A starter reporting a job that is on another starter.
    OTHER_STARTER = "other_starter"


_MAY: dict[Actor, frozenset[Event]] = {
    Actor.OWNER: USER_EVENTS,
    Actor.SUPERUSER: USER_EVENTS,
    Actor.OTHER_USER: frozenset(),
    Actor.BROKER: BROKER_EVENTS,
    Actor.STARTER: STARTER_EVENTS,
    Actor.OTHER_STARTER: frozenset(),
}


class Signal(enum.Enum):
    """What the broker tells the job's starter (``SignalJob.action``), or RUN (``RunJob``)."""

    KILL = "kill"
    EVICT = "evict"
    SUSPEND = "suspend"
    CONTINUE = "continue"
    RUN = "run"


@attrs.frozen
class Job:
    state: State
    #: Its processes (or what a debug hold keeps) are on a starter; the slot there is taken.
    on_starter: bool = False
    #: That starter is connected right now (suspend/continue need it).
    connected: bool = False
    #: The starter keeps it after a failure for debugging (only while on_starter).
    debug_hold: bool = False


@attrs.frozen
class Decision:
    job: Job
    #: What to tell the job's starter; None: nothing.
    signal: Signal | None = None
    #: Not None: the event is refused (the job is unchanged); a message for a person.
    refusal: str | None = None
    #: The event changes nothing worth recording (e.g. a duplicate report).
    noop: bool = False


@attrs.frozen
class _Rule:
    #: The state afterwards; None: unchanged.
    to: State | None = None
    #: on_starter afterwards: True, False, or None (unchanged).
    on: bool | None = None
    signal: Signal | None = None
    #: debug_hold afterwards: True, False, or None (unchanged).
    debug: bool | None = None
    noop: bool = False


# (state, event, on_starter) -> rule; a missing key is a refusal (see _refusal). Built from the
# rows below, each naming its states, its event, on_starter (None: either) and its rule.
_TABLE: dict[tuple[State, Event, bool], _Rule] = {}

S, E, SIG = State, Event, Signal
_NOOP = _Rule(noop=True)


def _gone(to: State | None = None) -> _Rule:
    """The job's processes have left its starter (the slot there is free)."""
    return _Rule(to, on=False, debug=False)


_ROWS: list[tuple[frozenset[State], Event, bool | None, _Rule]] = [
    # -- users. rm ends every live job; one on a starter is killed there, and its slot frees on
    # the starter's exit report (so the end is still recorded).
    (LIVE, E.RM, True, _Rule(S.REMOVED, signal=SIG.KILL)),
    (LIVE, E.RM, False, _Rule(S.REMOVED)),
    (frozenset({S.IDLE}), E.HOLD, False, _Rule(S.HELD)),
    (frozenset({S.IDLE, S.RUNNING, S.SUSPENDED}), E.HOLD, True, _Rule(S.HELD, signal=SIG.EVICT)),
    # A hold during a release cancels the release; an eviction already asked for goes on.
    (frozenset({S.RELEASING}), E.HOLD, None, _Rule(S.HELD)),
    (frozenset({S.HELD}), E.RELEASE, False, _Rule(S.IDLE)),
    # Still on its starter: idle only once the starter reports it gone (never twice at once).
    # A debug-held job is evicted for it (see decide); an evicted one is on its way out anyway.
    (frozenset({S.HELD}), E.RELEASE, True, _Rule(S.RELEASING)),
    (frozenset({S.RUNNING}), E.SUSPEND, True, _Rule(S.SUSPENDED, signal=SIG.SUSPEND)),
    (frozenset({S.SUSPENDED}), E.CONTINUE, True, _Rule(S.RUNNING, signal=SIG.CONTINUE)),
    # -- the broker
    (frozenset({S.IDLE}), E.MATCH, False, _Rule(S.RUNNING, on=True, signal=SIG.RUN)),
    (
        frozenset({S.IDLE, S.RUNNING, S.SUSPENDED, S.RELEASING}),
        E.LOST,
        True,
        _gone(S.IDLE),
    ),
    (frozenset({S.HELD, S.REMOVED, S.COMPLETED}), E.LOST, True, _gone()),
    (frozenset(S), E.LOST, False, _NOOP),
    # -- the job's starter: running as it should be
    (frozenset({S.RUNNING}), E.REPORT_RUNNING, True, _Rule(S.RUNNING, on=True)),
    (frozenset({S.SUSPENDED}), E.REPORT_RUNNING, True, _Rule(S.SUSPENDED, on=True)),
    (
        frozenset({S.RUNNING, S.SUSPENDED, S.HELD}),
        E.REPORT_DEBUG_HOLD,
        True,
        _Rule(S.HELD, on=True, debug=True),
    ),
    (frozenset({S.RELEASING}), E.REPORT_DEBUG_HOLD, True, _Rule(S.RELEASING, on=True, debug=True)),
    # ... or a copy it should not have: held, released, idle or finished while the starter was
    # away. Finish it off there; it takes its slot until it is gone. (An idle job's copy is
    # evicted, never adopted: the job may be matched again only once the copy is gone.)
    *(
        (frozenset({s}), E.REPORT_RUNNING, None, _Rule(s, on=True, signal=SIG.EVICT))
        for s in (S.IDLE, S.HELD, S.RELEASING)
    ),
    (frozenset({S.IDLE}), E.REPORT_DEBUG_HOLD, None, _Rule(S.IDLE, on=True, signal=SIG.EVICT)),
    *(
        (frozenset({s}), E.REPORT_DEBUG_HOLD, False, _Rule(s, on=True, signal=SIG.EVICT))
        for s in (S.HELD, S.RELEASING)
    ),
    *(
        (frozenset({s}), e, None, _Rule(s, on=True, signal=SIG.KILL))
        for s in FINISHED
        for e in (E.REPORT_RUNNING, E.REPORT_DEBUG_HOLD)
    ),
    # -- the job's starter: its processes are gone
    (frozenset({S.RUNNING, S.SUSPENDED}), E.REPORT_EXITED, True, _gone(S.COMPLETED)),
    (frozenset({S.RUNNING, S.SUSPENDED}), E.REPORT_FAILED_HOLD, True, _gone(S.HELD)),
    (frozenset({S.RUNNING, S.SUSPENDED}), E.REPORT_COULD_NOT_START, True, _gone(S.HELD)),
    # Held (evicted, or its debug hold ended or expired), an old copy, or finished: it stays as
    # it is, off its starter. Released: now it may run again.
    *(
        (frozenset({S.IDLE, S.HELD, S.REMOVED, S.COMPLETED}), e, True, _gone())
        for e in (E.REPORT_EXITED, E.REPORT_FAILED_HOLD, E.REPORT_COULD_NOT_START)
    ),
    *(
        (frozenset({S.RELEASING}), e, True, _gone(S.IDLE))
        for e in (E.REPORT_EXITED, E.REPORT_FAILED_HOLD, E.REPORT_COULD_NOT_START)
    ),
    # A report that a job not on any starter is gone (a duplicate, or stale): nothing to do.
    *(
        (frozenset(S), e, False, _NOOP)
        for e in (E.REPORT_EXITED, E.REPORT_FAILED_HOLD, E.REPORT_COULD_NOT_START)
    ),
]
for _states, _event, _on, _rule in _ROWS:
    for _s in _states:
        for _o in (True, False) if _on is None else (_on,):
            if (_s, _event, _o) in _TABLE:
                raise RuntimeError(f"two lifecycle rules for {(_s, _event, _o)}")
            _TABLE[(_s, _event, _o)] = _rule


def may(actor: Actor, event: Event) -> bool:
    return event in _MAY[actor]


def decide(job: Job, event: Event, actor: Actor) -> Decision:
    """What ``event`` by ``actor`` does to ``job``: the job afterwards and the starter's signal."""
    if not may(actor, event):
        return Decision(job, refusal=f"may not {event.value} this job")
    rule = _TABLE.get((job.state, event, job.on_starter))
    if rule is None:
        return Decision(job, refusal=_refusal(job, event))
    if event in (Event.SUSPEND, Event.CONTINUE) and not job.connected:
        return Decision(job, refusal="its starter is not connected")
    signal = rule.signal
    if event is Event.RELEASE and job.on_starter and job.debug_hold:
        # Kept for debugging: ending the hold is an eviction; it runs again once it is gone.
        signal = Signal.EVICT
    if rule.noop:
        return Decision(job, noop=True)
    on = job.on_starter if rule.on is None else rule.on
    debug = job.debug_hold if rule.debug is None else rule.debug
    state = job.state if rule.to is None else rule.to
    after = Job(state=state, on_starter=on, connected=job.connected, debug_hold=debug and on)
    return Decision(after, signal=signal)


def _refusal(job: Job, event: Event) -> str:
    s = job.state.value
    if event is Event.HOLD and job.state is State.HELD:
        return "is already held"
    if event is Event.RELEASE:
        return f"is not held (it is {s})"
    if event is Event.SUSPEND:
        return f"is {s}, not running"
    if event is Event.CONTINUE:
        return f"is {s}, not suspended"
    if job.state in FINISHED:
        return "is not in the queue"
    return f"is {s}; cannot {event.value} it"


def table() -> dict[tuple[State, Event, bool], tuple[State, bool, Signal | None]]:
    """The table, for tests and docs: (state, event, on_starter) -> (state, on, signal).

    A no-op row maps to the state it came from."""
    out: dict[tuple[State, Event, bool], tuple[State, bool, Signal | None]] = {}
    for (state, event, on), r in _TABLE.items():
        if r.noop:
            out[(state, event, on)] = (state, on, None)
        else:
            to = state if r.to is None else r.to
            out[(state, event, on)] = (to, on if r.on is None else r.on, r.signal)
    return out
