"""``stj``: the pool's commands (pool, broker, starter, submit, q, history, rm, hold, ...).

The daemons (``pool``, ``broker``, ``starter``) import trio only when they run; the everyday
commands are small blocking clients of the broker's unix socket.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import operator
import os
import pathlib
import shutil
import sys
import time
import tomllib
from typing import Any, NoReturn

import attrs

from ssh_to_job import common, wire

from . import _interactive, _pool, _qfast
from ._broker import (
    BrokerClient,
    BrokerRefused,
    BrokerUnavailable,
    RequestTooLarge,
    die,
    find_socket,
    printable,
)


def _common(p: argparse.ArgumentParser) -> None:
    common.add_pool_flags(p)
    p.add_argument("-name", "--name", dest="broker_name", help="broker socket or state directory")


def _duration(text: str) -> float:
    """Seconds from ``600``, ``10m``, ``2h`` or ``1d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], 1) if text else 1
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 600, 10m, 2h)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def _parser() -> argparse.ArgumentParser:
    from ssh_to_job import __version__

    ap = argparse.ArgumentParser(prog="stj", description="ssh-to-job pool commands")
    ap.add_argument("--version", action="version", version=f"stj (ssh-to-job) {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pool", help="run a personal pool: a broker and a starter on this host")
    _common(p)
    p.add_argument("--slots", type=int, help="how many jobs run at once (default: the config's, 4)")
    p.add_argument("--debug", action="store_true")
    sub.add_parser("broker", help="run the broker (python -m ssh_to_job.broker)", add_help=False)
    sub.add_parser("starter", help="run a starter (python -m ssh_to_job.starter)", add_help=False)

    p = sub.add_parser("submit", help="queue jobs")
    _common(p)
    p.add_argument(
        "-n", "--count", type=int, default=None, help="how many jobs (procs) in the cluster"
    )
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the job (repeat for more)",
    )
    p.add_argument(
        "--initialdir", "-d", help="the job's working directory (default: the current one)"
    )
    p.add_argument(
        "--hold-on-failure",
        action="store_true",
        help="hold the job (for debugging with ssh-to-job) if it exits non-zero",
    )
    p.add_argument(
        "--debug-on",
        metavar="exit,signal,timeout",
        help="keep the job for debugging with ssh-to-job when it exits non-zero (exit), is "
        "killed by a signal (signal) or runs past --time-limit (timeout)",
    )
    p.add_argument(
        "--debug-hold-ttl",
        metavar="DURATION",
        help="how long a debug hold lasts (e.g. 30m; default and maximum: the pool's)",
    )
    p.add_argument(
        "--time-limit",
        metavar="DURATION",
        help="end the job (and hold it) when it runs longer than this (e.g. 2h)",
    )
    p.add_argument("--no-ssh", action="store_true", help="let nobody ssh into these jobs")
    p.add_argument(
        "--ssh-users",
        metavar="NAME[,NAME...]",
        help="users besides you who may ssh into these jobs (see also stj ssh-allow)",
    )
    p.add_argument(
        "--allow-ssh-from",
        metavar="CIDR[,CIDR...]",
        help="remote clients (ssh-to-job -pool) may reach these jobs only from these networks",
    )
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="submit a job, wait for it to start, and open a session in it (a shell, or the "
        "given command); the job is removed when the session ends",
    )
    p.add_argument(
        "--keep", action="store_true", help="with -i: keep the job running after the session"
    )
    p.add_argument("-f", "--file", help="a TOML submit file")
    p.add_argument("executable", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)

    for name, help_ in (("q", "list the queue"), ("history", "list finished jobs")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--json", action="store_true")
        p.add_argument("--owner")
        p.add_argument("ids", nargs="*")
        if name == "q":
            p.add_argument(
                "--nobatch",
                "--all",
                action="store_true",
                help="one line per job instead of one per cluster (--json always lists jobs)",
            )
        if name == "history":
            p.add_argument(
                "--sessions",
                action="store_true",
                help="session attempts instead of jobs: who, when, outcome, bytes each way",
            )
    for name in ("rm", "hold", "release", "suspend", "continue"):
        p = sub.add_parser(name, help=f"{name} jobs")
        _common(p)
        p.add_argument("--reason", default="")
        p.add_argument("ids", nargs="+")
    p = sub.add_parser("ssh-allow", help="let other users ssh into one of your jobs")
    _common(p)
    p.add_argument("id")
    p.add_argument("users", nargs="+", metavar="USER")
    p = sub.add_parser("status", help="starters, slots, what runs where")
    _common(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("ssh-config", help="print an ssh_config block: `ssh job-32.0`, VS Code")
    _common(p)
    p.add_argument("-pool", "--pool", default="", help="a remote pool's BROKER:PORT (laptop)")
    p = sub.add_parser("keys", help="client keys for ssh-to-job -pool from other hosts")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    k = ksub.add_parser("add", help="register the public key on stdin (or FILE) for you")
    _common(k)
    k.add_argument("--comment", default="")
    k.add_argument("file", nargs="?", default="-")
    k = ksub.add_parser("list", help="your registered keys (a superuser's: everyone's)")
    _common(k)
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("remove", help="unregister a key by its SHA256: fingerprint")
    _common(k)
    k.add_argument("fingerprint")
    ksub.add_parser("show", help="this host's client public key (made on first use)")
    p = sub.add_parser("pool-ca", help="print the pool CA; --trust keeps one on a remote host")
    _common(p)
    p.add_argument("--trust", metavar="BROKER:PORT", help="keep FILE as the CA of that pool")
    p.add_argument("file", nargs="?", default="-")
    p = sub.add_parser("token", help="join tokens for new execute hosts (root or superuser)")
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    t = tsub.add_parser("create", help="print a one-time join token for `stj starter --join`")
    _common(t)
    t.add_argument("--ttl", type=_duration, help="how long it stays valid: 600, 10m, 2h, 1d")
    p = sub.add_parser("starter-revoke", help=argparse.SUPPRESS)
    _common(p)
    p.add_argument("starter_name", metavar="NAME")
    p = sub.add_parser("output", help="show a job's stdout (or --stderr)")
    _common(p)
    p.add_argument("--stderr", action="store_true")
    p.add_argument("id")
    return ap


# ---------------------------------------------------------------------------- daemons


DAEMONS = {"broker": "ssh_to_job.broker", "starter": "ssh_to_job.starter"}


def _daemon_argv(role: str) -> list[str]:
    """How to start a daemon: its own entry point, so stj never imports daemon code."""
    return [sys.executable, "-P", "-m", DAEMONS[role]]


def run_daemon(role: str, argv: list[str]) -> NoReturn:
    """``stj broker ...`` / ``stj starter ...``: become the daemon (same pid, its own argv)."""
    cmd = _daemon_argv(role)
    os.execv(cmd[0], [*cmd, *argv])  # noqa: S606 (our own interpreter, our own argv)


def cmd_pool(a: argparse.Namespace) -> int:
    """A broker and a starter on this host, supervised (see _pool)."""
    config, state = common.config_and_state(a)
    if a.slots is not None:
        # Checked here, with the config's own validator, before any daemon starts.
        try:
            attrs.evolve(config.starter, slots=a.slots)
        except ValueError as exc:
            return die(f"--slots: {exc}", 2)
    try:
        _lock = _pool.lock_pool(state)  # held until this process ends
    except _pool.PoolLocked as exc:
        return die(str(exc))
    flags = ["--state-dir", str(state)]
    if a.config:
        flags += ["--config", a.config]
    if a.debug:
        flags.append("--debug")
    st_args = ["--slots", str(a.slots)] if a.slots is not None else []
    # Many personal pools share a host: a free port unless the config chose one. The local
    # starter reads it from <state>/broker.addr and its certificate from <state>/pki.
    chosen = config.broker.listen or config.broker.port != common.DEFAULT_PORT
    b_args = [] if chosen else ["--port", "0"]
    label = "pool" if os.getuid() == 0 else "personal pool"
    return _pool.supervise(
        state,
        [*_daemon_argv("broker"), *flags, *b_args],
        [*_daemon_argv("starter"), *flags, *st_args],
        label,
    )


# ---------------------------------------------------------------------------- clients


def _client(a: argparse.Namespace) -> BrokerClient:
    name = a.broker_name or a.state_dir
    if name:
        # find_socket needs no config then, but a config file given is still checked.
        common.load_config(a.config)
    return BrokerClient(find_socket(name, a.config))


def _load_submit_file(path: str) -> tuple[wire.JobSpec, int]:
    try:
        raw = tomllib.loads(pathlib.Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    known = {
        "executable",
        "arguments",
        "environment",
        "initialdir",
        "count",
        "hold_on_failure",
        "debug_on",
        "debug_hold_ttl",
        "time_limit",
        "ssh",
        "ssh_users",
        "allow_ssh_from",
    }
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    exe = raw.get("executable")
    if not isinstance(exe, str) or not exe:
        raise ValueError(f"{path}: 'executable' (a string) is required")
    args = raw.get("arguments", [])
    if isinstance(args, str):
        import shlex

        args = shlex.split(args)
    if not isinstance(args, list) or not all(isinstance(x, str) for x in args):
        raise ValueError(f"{path}: 'arguments' must be a list of strings or one string")
    env = raw.get("environment", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError(f"{path}: 'environment' must be a table of strings")
    count = raw.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{path}: 'count' must be a positive integer")
    idir = raw.get("initialdir", str(pathlib.Path(path).absolute().parent))
    if not isinstance(idir, str):
        raise ValueError(f"{path}: 'initialdir' must be a string")
    hof = raw.get("hold_on_failure", False)
    if not isinstance(hof, bool):
        raise ValueError(f"{path}: 'hold_on_failure' must be true or false")
    debug_on = raw.get("debug_on", [])
    if isinstance(debug_on, str):
        debug_on = [w for w in debug_on.split(",") if w]
    if not isinstance(debug_on, list) or not all(isinstance(x, str) for x in debug_on):
        raise ValueError(f'{path}: \'debug_on\' must be a list like ["exit", "signal"]')
    times = {}
    for key in ("debug_hold_ttl", "time_limit"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{path}: '{key}' must be seconds or a duration like \"10m\"")
        times[key] = parse_duration(str(value), key)
    ssh = raw.get("ssh", True)
    if not isinstance(ssh, bool):
        raise ValueError(f"{path}: 'ssh' must be true or false")
    ssh_users = raw.get("ssh_users", [])
    if not isinstance(ssh_users, list) or not all(isinstance(x, str) for x in ssh_users):
        raise ValueError(f"{path}: 'ssh_users' must be a list of user names")
    ssh_from = raw.get("allow_ssh_from", [])
    if not isinstance(ssh_from, list) or not all(isinstance(x, str) for x in ssh_from):
        raise ValueError(f"{path}: 'allow_ssh_from' must be a list of networks (CIDR)")
    return wire.JobSpec(
        executable=exe,
        args=tuple(args),
        env=env,
        initialdir=idir,
        hold_on_failure=hof,
        debug_on=tuple(debug_on),
        debug_hold_ttl=times["debug_hold_ttl"],
        time_limit=times["time_limit"],
        ssh=ssh,
        ssh_users=tuple(ssh_users),
        ssh_from=tuple(ssh_from),
    ), count


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h`` or ``2d``; ValueError naming ``what``."""
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a duration (90, 90s, 10m, 1.5h, 2d)") from None
    if not 0 <= value <= 366 * 86400 or value != value:
        raise ValueError(f"{what}: {text!r} must be between 0 and a year")
    return value


def _resolve_exe(exe: str, idir: str) -> str:
    if "/" in exe:
        return str((pathlib.Path(idir) / exe).absolute()) if not exe.startswith("/") else exe
    found = shutil.which(exe)
    if not found:
        raise ValueError(f"executable {exe!r} not found on PATH")
    return found


def cmd_submit(a: argparse.Namespace) -> int:
    if a.keep and not a.interactive:
        return die("--keep goes with -i", 2)
    try:
        if a.interactive:
            if a.file or (a.count or 1) != 1:
                return die("-i submits one job: no -f, no -n", 2)
            spec, count = _interactive.holder_spec(wire.JobSpec(executable="/")), 1
        elif a.file:
            spec, count = _load_submit_file(a.file)
        elif a.executable:
            spec, count = wire.JobSpec(executable=a.executable, args=tuple(a.args)), 1
        else:
            return die("give an executable or -f submit-file", 2)
        env = dict(spec.env)
        for item in a.env:
            k, eq, v = item.partition("=")
            if not eq or not k:
                return die(f"--env wants NAME=VALUE, not {item!r}", 2)
            env[k] = v
        given = a.initialdir or spec.initialdir if (a.initialdir or a.file) else os.getcwd()
        idir = str(pathlib.Path(given).absolute())
        spec = attrs.evolve(
            spec,
            env=env,
            initialdir=idir,
            executable=spec.executable if a.interactive else _resolve_exe(spec.executable, idir),
            hold_on_failure=spec.hold_on_failure or a.hold_on_failure,
            debug_on=tuple(a.debug_on.split(",")) if a.debug_on else spec.debug_on,
            debug_hold_ttl=(
                parse_duration(a.debug_hold_ttl, "--debug-hold-ttl")
                if a.debug_hold_ttl
                else spec.debug_hold_ttl
            ),
            time_limit=(
                parse_duration(a.time_limit, "--time-limit") if a.time_limit else spec.time_limit
            ),
            ssh=spec.ssh and not a.no_ssh,
            ssh_users=tuple(u for u in a.ssh_users.split(",") if u)
            if a.ssh_users
            else spec.ssh_users,
            ssh_from=tuple(n.strip() for n in a.allow_ssh_from.split(",") if n.strip())
            if a.allow_ssh_from
            else spec.ssh_from,
        )
        count = a.count if a.count is not None else count
    except ValueError as exc:
        return die(str(exc), 2)
    with _client(a) as bc:
        reply = bc.call(wire.Submit(spec=spec, count=count), wire.SubmitReply)
        sock = bc.path
    if a.interactive:
        print(f"stj: submitted job {reply.cluster}.0", file=sys.stderr, flush=True)
        command = [a.executable, *a.args] if a.executable else []
        if command and "/" in command[0]:
            # ./run.sh is the one in the initial directory, as for a submitted job: the
            # session itself starts in the job's scratch directory.
            command[0] = _resolve_exe(command[0], idir)
        return _interactive.enter(sock, reply.cluster, command, a.keep, [])
    print(
        f"submitted {reply.count} job(s) to cluster {reply.cluster}: "
        + " ".join(f"{reply.cluster}.{p}" for p in range(min(reply.count, 20)))
        + (" ..." if reply.count > 20 else "")
    )
    return 0


@functools.lru_cache(maxsize=4096)
def _fmt_second(t: int) -> str:
    return time.strftime("%m/%d %H:%M:%S", time.localtime(t))


def _fmt_time(t: float | None) -> str:
    # Cached per second: a listing of 100,000 jobs submitted together shares a few values.
    return _fmt_second(int(t)) if t else "-"


def _dur(started: float | None, finished: float | None) -> str:
    if not started:
        return "0+00:00:00"
    end = finished or time.time()
    s = int(max(0, end - started))
    return f"{s // 86400}+{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


#: How long a debug hold has left, as the summary (``_qfast``) says it.
_left = _qfast._left


def _bad_id(ids: list[str]) -> int | None:
    """Exit status 2 with a message if any of ``ids`` is not a job id."""
    for text in ids:
        try:
            wire.parse_job_id(text)
        except ValueError as exc:
            return die(str(exc), 2)
    return None


def cmd_q_clusters(a: argparse.Namespace) -> int:
    """``stj q``: one line per cluster, counted by the broker (condor_q's batch view). The
    plain form is answered by ``_qfast`` before this module loads; this one serves the rest
    (``--name``, ``--config``, ``--state-dir``)."""
    try:
        with _client(a) as bc:
            clusters: list[wire.ClusterInfo] = []
            for ident in a.ids or [""]:
                got = bc.clusters(
                    wire.ClusterQuery(ids=(ident,) if ident else (), owner=a.owner or "")
                )
                if isinstance(got, wire.Error):
                    return die(got.message)
                clusters.extend(got)
    except BrokerUnavailable as exc:
        return die(str(exc))
    sys.stdout.write(_qfast.render([attrs.asdict(c) for c in clusters]))
    return 0


def cmd_q(a: argparse.Namespace, history: bool = False) -> int:
    if (rc := _bad_id(a.ids)) is not None:
        return rc
    if not history and not a.json and not a.nobatch:
        return cmd_q_clusters(a)
    # A listing of 100,000 jobs makes millions of small objects that all live until this
    # short process exits: the cycle collector's passes over them would double the time.
    gc.disable()
    printer = _JobPrinter(history, a.json)
    try:
        with _client(a) as bc:
            for ident in a.ids or [""]:
                err = bc.job_table(
                    wire.Query(
                        ids=(ident,) if ident else (),
                        history=history,
                        owner=a.owner or "",
                        objects=a.json,
                    ),
                    printer.page,
                )
                if err is not None:
                    return die(err.message)
    except BrokerUnavailable as exc:
        return die(str(exc))
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        return die(f"the broker sent a malformed job row: {exc}")
    printer.close()
    return 0


def _json_lines(rows: list[dict[str, Any]]) -> str:
    """A page of JobInfo objects, one per line, every character outside ASCII escaped (for
    a page whose text, as the broker wrote it, is not all ASCII)."""
    encode = json.JSONEncoder(separators=(",", ":")).encode
    return ",\n".join([encode(o) for o in rows])


#: The columns of a ``job_table`` row that a listing shows, picked by name in one C call.
_pick = operator.itemgetter(
    *(
        wire.JOB_COLUMNS.index(c)
        for c in (
            "id",
            "owner",
            "state",
            "executable",
            "args",
            "submitted",
            "started",
            "finished",
            "exit_code",
            "exit_signal",
            "hold_reason",
            "sessions",
            "debug_until",
        )
    )
)


class _JobPrinter:
    """``stj q --nobatch`` / ``--json`` / ``stj history``, written a page at a time."""

    def __init__(self, history: bool, as_json: bool) -> None:
        self.history = history
        self.as_json = as_json
        self.started = False
        self.counts: dict[str, int] = {}
        self.n = 0
        self.now = time.time()
        self.out = sys.stdout

    def _start(self) -> None:
        self.started = True
        if self.as_json:
            self.out.write("[\n")
        elif self.history:
            self.out.write(
                f"{'ID':<10} {'OWNER':<10} {'STATE':<10} {'SUBMITTED':<15} {'RUN_TIME':<11} "
                f"{'EXIT':<9} CMD\n"
            )
        else:
            self.out.write(
                f"{'ID':<10} {'OWNER':<10} {'STATE':<10} {'SUBMITTED':<15} {'RUN_TIME':<11} "
                f"{'SSH':<4} CMD\n"
            )

    def page(self, rows: list[Any] | None, text: str, n: int) -> None:
        """One page of ``n`` rows; ``rows`` is None for a page of objects that the reader
        checked without parsing it (then its text is ASCII)."""
        if not self.started:
            self._start()
        if self.as_json:
            # The broker's text, checked by the reader, is written as it is: one object per
            # line. Only ASCII goes out unescaped, so no control character of a job's text
            # (C1 codes included) reaches the terminal raw.
            if n:
                body = text[1:-1] if rows is None or text.isascii() else _json_lines(rows)
                self.out.write((",\n" if self.n else "") + body)
            self.n += n
            return
        assert rows is not None  # arrays are always parsed
        self._rows(rows)

    def _rows(self, rows: list[list[Any]]) -> None:
        history, now, counts = self.history, self.now, self.counts
        lines: list[str] = []
        # A cluster's jobs share their command, owner and submit time: each is formatted
        # when it differs from the row before's (a third of the listing's time).
        exe_args: Any = None
        sub: Any = None
        cmd = when = ""
        owners: dict[str, str] = {}
        for r in rows:
            (
                id_,
                owner,
                state,
                exe,
                args,
                submitted,
                started,
                finished,
                exit_code,
                exit_signal,
                hold_reason,
                sessions,
                debug_until,
            ) = _pick(r)
            if exe_args is None or exe_args[0] != exe or exe_args[1] != args:
                cmd = printable(" ".join((os.path.basename(exe), *args))[:60])
                exe_args = (exe, args)
            if sub is None or submitted != sub:
                when = _fmt_time(submitted)
                sub = submitted
            shown = owners.get(owner)
            if shown is None:
                shown = owners[owner] = printable(owner)
            if history:
                ex = (
                    f"sig {exit_signal}"
                    if exit_signal is not None
                    else str(exit_code)
                    if exit_code is not None
                    else "-"
                )
                extra = f"{ex:<9}"
            else:
                extra = f"{sessions:<4}"
                counts[state] = counts.get(state, 0) + 1
            lines.append(
                f"{id_:<10} {shown:<10} {state:<10} {when:<15} "
                f"{_dur(started, finished):<11} {extra} {cmd}\n"
            )
            if hold_reason and state == "held":
                # Under its row, so that a long reason cannot push the columns apart.
                lines.append(f"{'':<10} hold reason: {printable(hold_reason)}\n")
                if debug_until > now:
                    left = _left(debug_until - now)
                    lines.append(f"{'':<10} debug hold: {left} left; connect: ssh-to-job {id_}\n")
        self.out.write("".join(lines))
        self.n += len(rows)

    def close(self) -> None:
        if not self.started:
            self._start()
        if self.as_json:
            self.out.write("\n]\n")
        elif not self.history:
            total = f"{self.n} job" + ("" if self.n == 1 else "s")
            parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
            self.out.write(f"\n{total}" + (f": {parts}" if parts else "") + "\n")


def cmd_act(a: argparse.Namespace) -> int:
    if (rc := _bad_id(a.ids)) is not None:
        return rc
    with _client(a) as bc:
        reply = bc.call(wire.Act(action=a.cmd, ids=tuple(a.ids), reason=a.reason), wire.ActReply)
    rc = 0
    for r in reply.results:
        if r.ok:
            print(printable(r.message))
        else:
            print(f"stj {a.cmd}: {printable(r.message)}", file=sys.stderr)
            rc = 1
    return rc


def cmd_sessions(a: argparse.Namespace) -> int:
    """``stj history --sessions [--json] [job]``: the audited session attempts you may see."""
    if len(a.ids) > 1:
        return die("give at most one job id", 2)
    job = ""
    if a.ids:
        try:
            job = wire.parse_job_id(a.ids[0]).one
        except ValueError as exc:
            return die(str(exc), 2)
    with _client(a) as bc:
        reply = bc.call(wire.SessionQuery(job=job), wire.SessionList)
    if a.json:
        rows = [attrs.asdict(x) for x in reply.sessions]
        sys.stdout.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
        return 0
    out = sys.stdout
    out.write(
        f"{'SESSION':<9} {'JOB':<10} {'USER':<10} {'OUTCOME':<8} {'REQUESTED':<15} "
        f"{'LASTED':<9} {'IN':>10} {'OUT':>10}  REASON\n"
    )
    for x in reply.sessions:
        lasted = _left(x.ended - x.started) if x.ended else "-"
        out.write(
            f"{x.session_id[:8]:<9} {x.job:<10} {printable(x.user):<10} {x.outcome:<8} "
            f"{_fmt_time(x.requested):<15} {lasted:<9} {x.bytes_in:>10} {x.bytes_out:>10}  "
            f"{printable(x.reason)}\n"
        )
        # What only some sessions have goes under the row, as stj q does with hold reasons.
        if x.forwards:
            out.write(f"{'':<10}forwards: {printable(x.forwards.replace(',', ', '))}\n")
        if x.exit_status != -1:
            out.write(f"{'':<10}exit status: {x.exit_status}\n")
        if x.client_addr or x.client_key:
            origin = " ".join(filter(None, (x.client_addr, x.client_key)))
            out.write(f"{'':<10}from: {printable(origin)}\n")
    return 0


def cmd_ssh_allow(a: argparse.Namespace) -> int:
    if (rc := _bad_id([a.id])) is not None:
        return rc
    users = tuple(u for word in a.users for u in word.split(",") if u)
    with _client(a) as bc:
        reply = bc.call(wire.SshAllow(id=a.id, users=users), wire.ActReply)
    for r in reply.results:
        print(printable(r.message))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    with _client(a) as bc:
        reply = bc.call(wire.Status(), wire.StatusReply)
    if a.json:
        json.dump(attrs.asdict(reply), sys.stdout, indent=1, default=list)
        print()
        return 0
    print(
        f"broker pid {reply.broker_pid}: {reply.jobs_idle} idle, {reply.jobs_running} running, "
        f"{reply.jobs_held} held"
    )
    if not any(s.connected for s in reply.starters):
        print("no starters connected")
    now = time.time()
    for s in reply.starters:
        if not s.connected:
            ago = f"last seen {_ago(now - s.last_seen)} ago" if s.last_seen else "never seen"
            print(printable(f"starter {s.starter_id}: disconnected, {ago}"))
            continue
        print(
            printable(
                f"starter {s.starter_id} ({s.address}): connected, {s.busy}/{s.slots} slots busy"
                + (f", Slurm sessions tracked by {s.tracking}" if s.tracking else "")
                + (f": {' '.join(s.jobs)}" if s.jobs else "")
            )
        )
    return 0


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def cmd_output(a: argparse.Namespace) -> int:
    try:
        jid = wire.parse_job_id(a.id)
    except ValueError as exc:
        return die(str(exc), 2)
    with _client(a) as bc:
        reply = bc.call(
            wire.Output(id=jid.one, stream="stderr" if a.stderr else "stdout"), wire.OutputReply
        )
    sys.stdout.buffer.write(reply.data)
    return 0


def cmd_token(a: argparse.Namespace) -> int:
    with _client(a) as bc:
        reply = bc.call(wire.TokenCreate(ttl=a.ttl or 0.0), wire.TokenCreated)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reply.expires_at))
    print(reply.token)
    print(
        f"stj: one-time join token, valid until {when}; on the new execute host run\n"
        "  stj starter --join BROKER:PORT --token TOKEN",
        file=sys.stderr,
    )
    return 0


def cmd_revoke(a: argparse.Namespace) -> int:
    with _client(a) as bc:
        reply = bc.call(wire.StarterRevoke(name=a.starter_name), wire.StarterRevoked)
    print(
        printable(
            f"starter {a.starter_name} revoked (certificate serials {', '.join(reply.serials)}); "
            f"{reply.cut} live connection(s) cut"
        )
    )
    return 0


def cmd_keys(a: argparse.Namespace) -> int:
    """``stj keys add|list|remove|show`` and ``stj pool-ca [--trust BROKER:PORT FILE]``."""
    from . import _remote

    if a.cmd == "pool-ca" and a.trust:
        return _remote.cmd_trust(a.trust, a.file)
    if a.cmd == "keys" and a.keys_cmd == "show":
        return _remote.cmd_keys_show()
    if a.cmd == "pool-ca":
        with _client(a) as bc:
            ca = bc.call(wire.PoolCa(), wire.PoolCaReply)
        sys.stdout.write(ca.ca_cert)
        if ca.ssh_host_ca:
            # After the PEM blocks, where TLS libraries ignore it: what plain ssh trusts.
            print(f"{_remote.SSH_CA_TAG} {ca.ssh_host_ca}")
        print(
            f"stj: pool {ca.pool_id}, CA SHA-256 {_remote.ca_fingerprint(ca.ca_cert)}; on your "
            "laptop: stj pool-ca --trust BROKER:PORT FILE",
            file=sys.stderr,
        )
        return 0
    if a.keys_cmd == "add":
        text = sys.stdin.read() if a.file == "-" else pathlib.Path(a.file).read_text()
        with _client(a) as bc:
            added = bc.call(wire.KeyAdd(key=text.strip(), comment=a.comment), wire.KeyAdded)
        print(f"registered key {added.fingerprint} in pool {added.pool_id}")
        return 0
    if a.keys_cmd == "remove":
        with _client(a) as bc:
            gone = bc.call(wire.KeyRemove(fingerprint=a.fingerprint), wire.KeyRemoved)
        print(f"removed key {gone.fingerprint}")
        return 0
    with _client(a) as bc:
        listed = bc.call(wire.KeyList(), wire.KeyListReply)
    if a.json:
        print(json.dumps([attrs.asdict(k) for k in listed.keys], indent=1))
        return 0
    for k in listed.keys:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.added))
        print(printable(f"{k.fingerprint}  {k.user:<10} {when}  {k.comment}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:2] == ["starter", "revoke"]:
        # An admin command, not the daemon: `stj starter revoke NAME`.
        args = ["starter-revoke", *args[2:]]
    elif args and args[0] in DAEMONS:
        return run_daemon(args[0], args[1:])
    ap = _parser()
    a = ap.parse_args(args)
    try:
        if a.cmd == "pool":
            return cmd_pool(a)
        if a.cmd == "submit":
            return cmd_submit(a)
        if a.cmd == "history" and a.sessions:
            return cmd_sessions(a)
        if a.cmd in ("q", "history"):
            return cmd_q(a, history=a.cmd == "history")
        if a.cmd in ("rm", "hold", "release", "suspend", "continue"):
            return cmd_act(a)
        if a.cmd == "status":
            return cmd_status(a)
        if a.cmd == "ssh-allow":
            return cmd_ssh_allow(a)
        if a.cmd == "output":
            return cmd_output(a)
        if a.cmd == "token":
            return cmd_token(a)
        if a.cmd == "starter-revoke":
            return cmd_revoke(a)
        if a.cmd in ("keys", "pool-ca"):
            return cmd_keys(a)
        if a.cmd == "ssh-config":
            from .ideproxy import ssh_config_block

            try:
                block = ssh_config_block(a.broker_name or a.state_dir, a.config, a.pool)
            except ValueError as exc:
                return die(str(exc))
            sys.stdout.write(block)
            return 0
    except common.ConfigError as exc:
        return die(f"config: {exc}", 2)
    except RequestTooLarge as exc:
        return die(str(exc), 2)
    except (BrokerUnavailable, BrokerRefused) as exc:
        return die(str(exc))
    except OSError as exc:
        # E.g. a --state-dir whose parent this user cannot write.
        where = f": {exc.filename}" if exc.filename else ""
        return die(f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        return 130
    raise AssertionError(a.cmd)


if __name__ == "__main__":
    sys.exit(main())
