"""The measuring half of the benchmark: runs as the (non-root) bench user, prints JSON.

``bench/run.py`` (root) sets up the pool and the floor, then runs this file through ``setpriv``
as the bench user, once per measurement: ``python bench_worker.py MODE '<json args>'``. Timing
happens here, in the same uid as the commands measured, so no ``setpriv`` or root shell start-up
is inside any figure. It imports only the standard library and the installed product (for the
session-phase breakdown and the broker load drivers), never the tests, and never writes a byte
into a session.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import resource
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

BIN = pathlib.Path(sys.executable).parent


def _run_timed(
    argv: list[str],
    stdin: str | None,
    stdout: str | None,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One command's wall time (and its CPU, from wait4), stdout to a file or /dev/null."""
    with (
        open(stdin or os.devnull, "rb") as fin,
        open(stdout or os.devnull, "wb") as fout,
        tempfile.TemporaryFile() as ferr,
    ):
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=env)
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        killer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        ferr.seek(0)
        err = ferr.read()[-600:].decode(errors="replace")
    return {"wall": wall, "rc": p.returncode, "cpu": ru.ru_utime + ru.ru_stime, "stderr": err}


def mode_times(a: dict[str, Any]) -> dict[str, Any]:
    """Run named commands ``reps`` times, interleaved (A B A B ...), alternating (A B B A ...) or
    in blocks (A A ... B B)."""
    cmds: dict[str, dict[str, Any]] = a["cmds"]
    reps: int = a["reps"]
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in cmds}
    order = [(r, name) for r in range(reps) for name in cmds]
    if a.get("order") == "block":
        order = [(r, name) for name in cmds for r in range(reps)]
    elif a.get("order") == "alternate":  # A B C, then C B A, ...
        names = list(cmds)
        order = [(r, name) for r in range(reps) for name in (names[::-1] if r % 2 else names)]
    for _r, name in order:
        c = cmds[name]
        if c.get("before"):
            subprocess.run(c["before"], check=False, capture_output=True)
        env = {**os.environ, **c.get("env", {})}
        out[name].append(
            _run_timed(c["argv"], c.get("stdin"), c.get("stdout"), c.get("timeout", 120.0), env)
        )
    return {"runs": out}


def mode_breakdown(a: dict[str, Any]) -> dict[str, Any]:
    """``ssh-to-job JOB true`` rebuilt from the product's own functions, with a clock per phase.

    Mirrors ``client.ssh_to_job._session``: key, broker grant (broker + starter attach), the
    capability exchange (the starter's checks, host key and sshd spawn), then ssh with the
    ProxyCommand hand-over, to the remote command's exit. Process start-up is measured apart.
    """
    from ssh_to_job import wire
    from ssh_to_job.client import ssh_to_job as stj
    from ssh_to_job.client._broker import BrokerClient, find_socket

    job: str = a["job"]
    shells = ("/bin/bash",)
    phases: dict[str, list[float]] = {
        k: [] for k in ("keygen", "grant", "starter", "ssh_spawn_handover", "ssh_to_exit", "total")
    }
    # Warm the in-process imports so the first repetition is not charged for them.
    stj.generate_key("")
    for _ in range(a["reps"]):
        t = [time.perf_counter()]
        d = stj.runtime_dir()[0] / secrets.token_hex(6)
        os.mkdir(d, 0o700)
        try:
            private, public = stj.generate_key("")
            stj._write(d / "id", private)
            t.append(time.perf_counter())
            with BrokerClient(find_socket(None)) as bc:
                reply, fd = bc.ssh(wire.SshRequest(job=job, client_key=public))
            if not isinstance(reply, wire.SshGrant) or fd is None:
                raise RuntimeError(f"breakdown: no session granted: {reply}")
            t.append(time.perf_counter())
            session = socket.socket(fileno=fd)
            ready = stj.open_session(session, reply, shells)
            t.append(time.perf_counter())
            alias = f"bench-{reply.session_id[:8]}"
            stj._write(d / "known_hosts", f"{alias} {ready.host_key}\n".encode())
            name = f"stjbench-{secrets.token_hex(12)}"
            stj._write(
                d / "config", stj.ssh_config(d, ready.login, alias, name, None, False).encode()
            )
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind("\0" + name)
            listener.listen(1)
            argv = stj.build_argv(stj.Options(job=job, command=["true"]), d / "config")
            child = subprocess.Popen(argv, env={**os.environ, "SHELL": "/bin/sh"})
            with listener:
                handed = stj.hand_over(listener, session, child)
            session.close()
            t.append(time.perf_counter())
            rc = child.wait()
            t.append(time.perf_counter())
            if rc != 0 or not handed:
                raise RuntimeError(f"breakdown session failed: rc={rc} handed={handed}")
        finally:
            shutil.rmtree(d, ignore_errors=True)
        for key, (x, y) in zip(list(phases)[:-1], itertools.pairwise(t), strict=True):
            phases[key].append(y - x)
        phases["total"].append(t[-1] - t[0])
    return {"phases": phases}


def mode_importtime(a: dict[str, Any]) -> dict[str, Any]:
    """``python -X importtime``: the whole import time and the costliest modules imported
    directly by the top-level ones (median µs over the repetitions)."""
    per: dict[str, list[int]] = {}
    totals: list[int] = []
    for _ in range(a["reps"]):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", a["code"]],
            capture_output=True,
            text=True,
            check=True,
        )
        seen: dict[str, int] = {}
        total = 0
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            _, cum, name = line.split("|")
            stripped = name.lstrip()
            depth = (len(name) - len(stripped) - 1) // 2
            if depth == 0 and cum.strip().isdigit():
                total += int(cum)
            elif depth == 1 and cum.strip().isdigit():
                seen[stripped] = int(cum)  # what the module imports directly
        totals.append(total)
        for k, v in seen.items():
            per.setdefault(k, []).append(v)
    med = {k: int(statistics.median(v)) for k, v in per.items()}
    top = sorted(med.items(), key=lambda kv: -kv[1])[:12]
    return {"total_us": int(statistics.median(totals)), "top": top}


def _lines_then_hold(n: int, argvs: list[list[str]], timeout: float) -> dict[str, Any]:
    """Open ``n`` sessions at once; each prints ``ok`` and holds until we close its stdin.

    Session ``i`` runs ``argvs[i % len(argvs)]`` (its last word is the remote command, which
    must print ``ok`` and then read stdin to its end). Set-up time = launch to the ``ok`` line.
    We reap the children ourselves (wait4) to get each one's CPU time with its descendants'.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # three pipes per session
    sel = selectors.DefaultSelector()
    procs: list[subprocess.Popen[bytes]] = []
    started: list[float] = []
    ready: list[float | None] = [None] * n
    rcs: list[int | None] = [None] * n
    cpu: list[float] = [0.0] * n
    errs: list[bytes] = [b""] * n
    t_launch0 = time.perf_counter()
    for i in range(n):
        started.append(time.perf_counter())
        p = subprocess.Popen(
            argvs[i % len(argvs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        assert p.stdout is not None
        assert p.stderr is not None
        sel.register(p.stdout, selectors.EVENT_READ, (i, "out"))
        sel.register(p.stderr, selectors.EVENT_READ, (i, "err"))
    t_launched = time.perf_counter() - t_launch0

    def pump(wait: float) -> None:
        for key, _ in sel.select(timeout=wait):
            i, kind = key.data
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
            elif kind == "out" and ready[i] is None and b"ok" in data:
                ready[i] = time.perf_counter()
            elif kind == "err":
                errs[i] = (errs[i] + data)[-2000:]
        for i, p in enumerate(procs):
            if p.returncode is None:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    p.returncode = rcs[i] = os.waitstatus_to_exitcode(status)
                    cpu[i] = ru.ru_utime + ru.ru_stime

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and any(
        ready[i] is None and procs[i].returncode is None for i in range(n)
    ):
        pump(0.1)
    all_open = sum(1 for i in range(n) if ready[i] is not None and procs[i].returncode is None)
    t_release = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        try:
            p.stdin.close()
        except OSError:
            pass
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and (
        any(p.returncode is None for p in procs) or sel.get_map()
    ):
        pump(0.1)
    t_closed = time.perf_counter() - t_release
    for i, p in enumerate(procs):
        if p.returncode is None:
            p.kill()
            _pid, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            cpu[i] = ru.ru_utime + ru.ru_stime
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
    sel.close()
    setup = [r - s for r, s in zip(ready, started, strict=True) if r is not None]
    ok = sum(1 for r, rc in zip(ready, rcs, strict=True) if r is not None and rc == 0)
    failures: dict[str, int] = {}
    for r, rc, e in zip(ready, rcs, errs, strict=True):
        if r is None or rc != 0:
            text = [x for x in e.decode(errors="replace").splitlines() if x.strip()]
            msg = text[-1] if text else f"no message, exit status {rc}"
            msg = re.sub(r"[0-9a-f]{8,}", "…", msg)[:200]
            failures[msg] = failures.get(msg, 0) + 1
    return {
        "n": n,
        "targets": min(n, len(argvs)),
        "ok": ok,
        "all_open": all_open,
        "setup": setup,
        "launch_spread": t_launched,
        "close_all": t_closed,
        "client_cpu_per_session": sum(cpu) / n,
        "failures": failures,
    }


def mode_concurrent(a: dict[str, Any]) -> dict[str, Any]:
    return _lines_then_hold(a["n"], a["argvs"], a.get("timeout", 180.0))


def _hammer(fn: Callable[[], bool], threads: int, seconds: float) -> dict[str, Any]:
    """Call ``fn`` from ``threads`` threads for ``seconds``: count, rate, latency."""
    lat: list[list[float]] = [[] for _ in range(threads)]
    fails = [0] * threads
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                good = fn()
            except Exception as exc:
                good = False
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
            if good:
                lat[k].append(time.perf_counter() - t0)
            else:
                fails[k] += 1

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    allat = sorted(x for xs in lat for x in xs)
    return {
        "threads": threads,
        "wall": wall,
        "ok": len(allat),
        "failed": sum(fails),
        "rate": len(allat) / wall,
        "latency": allat[:: max(1, len(allat) // 2000)],
        "client_cpu": time.process_time() - cpu0,
        "errors": errors,
    }


def mode_broker_load(a: dict[str, Any]) -> dict[str, Any]:
    """Grants (SshRequest to a running job: the real path, starter attach included),
    refusals (the same to an idle job: authorization only) or status round trips."""
    from ssh_to_job import wire
    from ssh_to_job.client._broker import BrokerClient, find_socket
    from ssh_to_job.client.ssh_to_job import generate_key

    sock = find_socket(None)
    _priv, public = generate_key("")
    kind: str = a["kind"]

    def grant() -> bool:
        with BrokerClient(sock) as bc:
            reply, fd = bc.ssh(wire.SshRequest(job=a["job"], client_key=public))
        if fd is not None:
            os.close(fd)  # the starter sees EOF instead of a capability and lets it go
        return isinstance(reply, wire.SshGrant)

    def refusal() -> bool:
        with BrokerClient(sock) as bc:
            reply, fd = bc.ssh(wire.SshRequest(job=a["job"], client_key=public))
        if fd is not None:
            os.close(fd)
        return isinstance(reply, wire.Error) and reply.code == a.get("code", "idle")

    def status() -> bool:
        with BrokerClient(sock) as bc:
            return isinstance(bc.request(wire.Status()), wire.StatusReply)

    def submit() -> bool:
        spec = wire.JobSpec(executable="/bin/sleep", args=("3600",), initialdir="/tmp")
        with BrokerClient(sock) as bc:
            return isinstance(bc.request(wire.Submit(spec=spec, count=1)), wire.SubmitReply)

    fn = {"grant": grant, "refusal": refusal, "status": status, "submit": submit}[kind]
    return _hammer(fn, a["threads"], a["seconds"])


def main() -> int:
    mode, arg = sys.argv[1], json.loads(sys.argv[2])
    modes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "times": mode_times,
        "breakdown": mode_breakdown,
        "importtime": mode_importtime,
        "concurrent": mode_concurrent,
        "broker_load": mode_broker_load,
    }
    json.dump(modes[mode](arg), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
