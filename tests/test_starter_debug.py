"""A starter run with ``--debug`` takes each session's set-up apart in its log (issue 12: the
starter's share of a cold session is measured step by step before anything is cut)."""

from __future__ import annotations

import re
from typing import Any

from conftest import User, wait_for

SETUP = re.compile(
    r"session ([0-9a-f]{8}) set-up: ([0-9.]+) ms from the capability "
    r"\(files ([0-9.]+) ms, spawn ([0-9.]+) ms, shim ([0-9.]+) ms\)"
)
DIAL = re.compile(
    r"session ([0-9a-f]{8}): host key, (?:dial, TLS|spare) and attach ([0-9.]+) ms; "
    r"the capability ([0-9.]+) ms later"
)


def test_debug_log_takes_a_sessions_set_up_apart(make_pool: Any, users: dict[str, User]) -> None:
    """One session into a job of a --debug pool logs, for that session, the dial and attach
    time and the set-up steps from the capability (files, sshd spawn, shim handshake), whose
    parts add up to the total; a pool without --debug logs neither."""
    a = users["a"]
    for debug in (True, False):
        pool = make_pool(debug=debug)
        (job,) = pool.submit(a, "/bin/sleep", "300")
        pool.wait_state(job, "running")
        try:
            r = pool.ssh(a, job, "true")
            assert r.returncode == 0, r.stderr
            if not debug:
                text = pool.log.read_text(errors="replace")
                assert not SETUP.search(text)
                assert not DIAL.search(text)
                continue
            log = pool.log
            m = wait_for("the set-up line", lambda: SETUP.search(log.read_text()))  # noqa: B023
            d = DIAL.search(pool.log.read_text())
            assert d is not None
            assert d[1] == m[1]
            total, *parts = (float(x) for x in m.groups()[1:])
            assert all(p >= 0 for p in parts)
            assert abs(sum(parts) - total) < 0.5
        finally:
            pool.stj(a, "rm", job)
