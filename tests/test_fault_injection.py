"""Fault injection: random SIGKILLs of the broker, the starter and the pool itself, and cuts of
the starter's connections, while jobs are submitted, run, finish and are removed. Afterwards
every job is accounted for exactly once, none ran twice, and every exit code is recorded.

Each job appends "<pid> <start time>" to a log file of its own, in a directory only its user
can write, before it does anything else: two lines in one file mean the job ran twice.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

import pytest
from conftest import ROOT, Pool, User, wait_for

#: Bounds: at most CYCLES faults and at most SECONDS of injecting them.
CYCLES = 14
SECONDS = 75.0
FINAL_WAIT = 90.0

SCRIPT = 'echo "$$ $(date +%s.%N)" >> "$FI_LOG/$SSH_TO_JOB_ID"; sleep "$1"; exit "$2"'


def _cut(pool: Pool) -> bool:
    """Abort every TCP connection to the broker's port (the starter's control channel and any
    session being set up), as a network cut does; False if there was none to cut."""
    try:
        host, _, port = (pool.state / "broker.addr").read_text().strip().rpartition(":")
    except OSError:
        return False
    r = subprocess.run(
        ["ss", "-K", "-t", "dst", host, "dport", "=", port],
        capture_output=True,
        text=True,
        check=False,
    )
    return r.returncode == 0 and "ESTAB" in r.stdout


def _kill(pids: list[int]) -> int:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


@pytest.mark.slow
def test_random_kills_and_cuts_lose_and_duplicate_nothing(
    make_pool: Callable[..., Pool],
    users: dict[str, User],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under random kills and cuts, every job ends exactly once with its own exit code."""
    rng = random.Random(int(os.environ.get("STJ_FI_SEED", "0")) or None)
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    a = users["a"]
    pool = make_pool("[starter]\nreconnect_max = 0.5\n", slots=4)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="stjfi-", dir="/tmp"))
    os.chown(logs, a.uid, a.gid)
    logs.chmod(0o700)
    want: dict[str, int] = {}  # job -> the exit code it was told to exit with
    removed: set[str] = set()
    faults = {"broker": 0, "starter": 0, "pool": 0, "cut": 0}
    t0 = time.monotonic()
    cycles = 0
    try:
        pool.wait_for_starter()
        while cycles < CYCLES and time.monotonic() - t0 < SECONDS:
            cycles += 1
            for _ in range(rng.randint(1, 3)):
                seconds, code = f"{rng.uniform(0.2, 4):.2f}", rng.randint(0, 3)
                r = pool.stj(
                    a,
                    "submit",
                    "-e",
                    f"FI_LOG={logs}",
                    "/bin/sh",
                    "-c",
                    SCRIPT,
                    "fi",
                    seconds,
                    str(code),
                    check=False,
                )
                if r.returncode == 0:
                    want[r.stdout.split(":", 1)[1].split()[0]] = code
            if want and rng.random() < 0.25:
                victim = rng.choice(sorted(want))
                if pool.stj(a, "rm", victim, check=False).returncode == 0:
                    removed.add(victim)
            fault = rng.choice(sorted(faults))
            if fault == "broker":
                faults[fault] += _kill(pool.pids("broker"))
            elif fault == "starter":
                faults[fault] += _kill(pool.pids("starter"))
            elif fault == "cut":
                faults[fault] += _cut(pool)
            else:
                assert pool.proc is not None
                faults[fault] += _kill([pool.proc.pid])
                pool.proc.wait(10)
                # Its daemons go with it; a new pool on the same state dir takes over.
                wait_for("the old daemons to go", lambda: not pool.pids("broker"), 20)
                pool.start()
            time.sleep(rng.uniform(0.3, 2.0))

        # Settle: the pool is up and every job reaches an end.
        wait_for("a starter", lambda: pool.pids("starter") and pool.pids("broker"), 30)
        pool.wait_for_starter(timeout=30)

        def all_done() -> dict[str, dict[str, object]] | None:
            r = pool.stj(ROOT, "history", "--json", check=False)
            if r.returncode != 0:
                return None
            done = {j["id"]: j for j in json.loads(r.stdout)}
            return done if set(want) <= set(done) else None

        done = wait_for("every job to end", all_done, FINAL_WAIT)
        live = {j["id"] for j in json.loads(pool.stj(ROOT, "q", "--json").stdout)}
    finally:
        runs = {p.name: p.read_text().splitlines() for p in logs.iterdir()}
        shutil.rmtree(logs, ignore_errors=True)

    lost = sorted(set(want) - set(done))
    twice = sorted(j for j, lines in runs.items() if len(lines) > 1)
    in_both = sorted(set(want) & live)
    wrong_code = sorted(
        j
        for j, code in want.items()
        if done[j]["state"] == "completed"
        and (done[j]["exit_code"], done[j]["exit_signal"]) != (code, None)
    )
    bad_state = sorted(j for j in want if done[j]["state"] not in ("completed", "removed"))
    never_ran = sorted(j for j in want if done[j]["state"] == "completed" and j not in runs)
    figures = (
        f"fault injection (seed {seed}): {cycles} cycles in {time.monotonic() - t0:.0f} s, "
        f"{len(want)} jobs ({len(removed)} removed by us), faults {faults}; "
        f"lost {len(lost)}, ran twice {len(twice)}, wrong exit code {len(wrong_code)}, "
        f"bad final state {len(bad_state)}"
    )
    with capsys.disabled():
        print("\n" + figures)
    if lost or twice or in_both or wrong_code or bad_state or never_ran:
        # The whole story, for whoever reads the failure: every job's runs and the pool's log.
        report = pathlib.Path(f"/tmp/stj-fault-injection-{seed}.txt")
        report.write_text(
            figures
            + "\n"
            + json.dumps({"want": want, "runs": runs}, indent=1)
            + "\n"
            + pool.log.read_text(errors="replace")
        )
        figures += f" (details: {report})"
    assert not lost, (figures, lost)
    assert not twice, (figures, {j: runs[j] for j in twice})
    assert not in_both, (figures, in_both)
    assert not wrong_code, (figures, {j: done[j] for j in wrong_code})
    assert not bad_state, (figures, {j: done[j] for j in bad_state})
    assert not never_ran, (figures, never_ran)
