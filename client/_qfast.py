"""``stj``'s entry point, and ``stj q``'s default view without the full client's imports.

``stj q`` is what admins type all day; over a queue of 100,000 jobs the broker counts the
summary in ~15 ms, while ``stj``'s own imports (argparse, attrs, the wire codec, tomllib) cost
~150 ms on a loaded 2-core host. So the plain summary (``stj q [--owner U] [ids]``) is asked
and printed here with the standard library's C parts only; everything else, and anything
unusual (another option, a bad id, a broker that answers otherwise), goes to ``client.stj``.

This module speaks one request of the CONTROL channel (``cluster_query`` → ``cluster_list``
pages, docs/protocol.md) and checks every value it prints; it must never grow into a second
client: new commands belong in ``client.stj``.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from . import _mux

#: ClusterInfo's fields that this view prints, and their types (others are ignored).
_INTS = ("cluster", "idle", "running", "suspended", "held", "releasing", "sessions")
_INTS_OPT = ("debug_held",)
_STRS = ("owner", "executable", "hold_reason", "debug_job")
_FLOATS = ("submitted", "debug_until")
_MAX_FRAME = 1 << 20


class _Fallback(Exception):
    """Hand the command to the full ``stj``."""


def printable(text: str) -> str:
    """As ``client._broker.printable``: control characters shown as ``\\xNN``."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        for c in text
    )


def _fmt_time(t: float) -> str:
    return time.strftime("%m/%d %H:%M:%S", time.localtime(int(t))) if t else "-"


def _left(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m} min"


def _check(c: object) -> dict[str, object]:
    """One ``ClusterInfo`` object as sent (fields at their default left out), checked."""
    if type(c) is not dict:
        raise ValueError("a cluster is not an object")
    for k in _INTS + _INTS_OPT:
        if type(c.get(k, 0)) is not int:
            raise ValueError(f"field {k} is not an integer")
    for k in _STRS:
        if type(c.get(k, "")) is not str:
            raise ValueError(f"field {k} is not a string")
    for k in _FLOATS:
        if type(c.get(k, 0.0)) not in (int, float):
            raise ValueError(f"field {k} is not a number")
    args = c.get("args", [])
    if type(args) is not list or not all(type(x) is str for x in args):
        raise ValueError("field args is not a list of strings")
    if type(c.get("more_reasons", False)) is not bool:
        raise ValueError("field more_reasons is not a boolean")
    return c


def notes(c: dict[str, object], now: float) -> list[str]:
    """What a user must still see of a cluster's held jobs in the summary: that they are
    held and why, and for a debug hold how long it lasts and how to connect."""
    out: list[str] = []
    held = int(c.get("held", 0))  # type: ignore[call-overload]
    if held:
        n = f"{held} job" + ("" if held == 1 else "s")
        reason = str(c.get("hold_reason", ""))
        why = printable(reason[:100]) if reason else "no reason given"
        more = (
            f"; other reasons too: stj q --nobatch {c['cluster']}" if c.get("more_reasons") else ""
        )
        out.append(f"held ({n}): {why}{more}")
    debug_held = int(c.get("debug_held", 0))  # type: ignore[call-overload]
    until = float(c.get("debug_until", 0.0))  # type: ignore[arg-type]
    if debug_held and until > now:
        n = f"{debug_held} job" + ("" if debug_held == 1 else "s")
        job = printable(str(c.get("debug_job", "")))
        out.append(f"debug hold ({n}): {_left(until - now)} left; connect: ssh-to-job {job}")
    return out


def render(clusters: list[dict[str, object]]) -> str:
    """``stj q``'s summary: one line per cluster, notes under held ones, and the total."""
    lines = [
        f"{'CLUSTER':<8} {'OWNER':<10} {'SUBMITTED':<15} {'IDLE':>6} {'RUN':>6} {'HOLD':>6} "
        f"{'SUSP':>6} {'TOTAL':>6} {'SSH':>4} CMD"
    ]
    now = time.time()
    totals = {"idle": 0, "running": 0, "suspended": 0, "held": 0, "releasing": 0}
    for c in clusters:
        n = {k: int(c.get(k, 0)) for k in totals}  # type: ignore[call-overload]
        args = [str(x) for x in c.get("args", [])]  # type: ignore[attr-defined]
        cmd = printable(" ".join((os.path.basename(str(c.get("executable", ""))), *args))[:60])
        # A releasing job is still on its way out of a (debug) hold.
        hold = n["held"] + n["releasing"]
        total = sum(n.values())
        owner = printable(str(c.get("owner", "")))
        submitted = float(c.get("submitted", 0.0))  # type: ignore[arg-type]
        lines.append(
            f"{c.get('cluster', 0)!s:<8} {owner:<10} {_fmt_time(submitted):<15} "
            f"{n['idle']:>6} {n['running']:>6} {hold:>6} {n['suspended']:>6} {total:>6} "
            f"{c.get('sessions', 0)!s:>4} {cmd}"
        )
        # Under its row, as in the per-job view: a long reason cannot push columns apart.
        lines.extend(f"{'':<8} {note}" for note in notes(c, now))
        for k in totals:
            totals[k] += n[k]
    count = sum(totals.values())
    parts = ", ".join(f"{v} {k}" for k, v in sorted(totals.items()) if v)
    lines.append("")
    lines.append(f"{count} job" + ("" if count == 1 else "s") + (f": {parts}" if parts else ""))
    return "\n".join(lines) + "\n"


def _recv_exact(s: _socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise _Fallback  # the full client says what went wrong
        buf += chunk
    return buf


def _ask(path: str, ids: list[str], owner: str) -> list[dict[str, object]] | str:
    """The clusters, or an error message from the broker."""
    import json

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(60.0)
    out: list[dict[str, object]] = []
    try:
        s.connect(path)
        for ident in ids or [""]:
            body = {"type": "cluster_query", "ids": [ident] if ident else [], "owner": owner}
            payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            s.sendall(len(payload).to_bytes(4, "big") + payload)
            while True:
                length = int.from_bytes(_recv_exact(s, 4), "big")
                if length > _MAX_FRAME:
                    raise _Fallback
                reply = json.loads(_recv_exact(s, length))
                if type(reply) is not dict:
                    raise _Fallback
                if reply.get("type") == "error" and type(reply.get("message")) is str:
                    return str(reply["message"])
                if reply.get("type") != "cluster_list" or type(reply.get("clusters")) is not list:
                    raise _Fallback
                out.extend(_check(c) for c in reply["clusters"])
                if reply.get("last", True) is True:
                    break
                if reply.get("last") is not False:
                    raise _Fallback
    except (OSError, ValueError):
        raise _Fallback from None
    finally:
        s.close()
    return out


def _summary(argv: list[str]) -> int:
    ids: list[str] = []
    owner = ""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--owner" and i + 1 < len(argv):
            owner = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--owner="):
            owner = arg.partition("=")[2]
        elif arg.startswith("-") or _mux.job_one(arg) is None or arg.count(".") > 1:
            raise _Fallback  # any other option, or a bad id: the full stj checks it
        else:
            ids.append(arg.strip())
        i += 1
    path = _mux.broker_socket(None)
    if path is None:
        raise _Fallback
    got = _ask(path, ids, owner)
    if isinstance(got, str):
        print(f"stj: {printable(got)}", file=sys.stderr)
        return 1
    sys.stdout.write(render(got))
    return 0


def main() -> int:
    """``stj``: ``stj q``'s plain summary here, everything else in ``client.stj``."""
    argv = sys.argv[1:]
    if argv[:1] == ["q"]:
        try:
            return _summary(argv[1:])
        except _Fallback:
            pass
    from .stj import main as full

    return full(argv)
