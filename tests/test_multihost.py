"""One pool across hosts: a broker host and execute hosts as network namespaces (tests/netns.py).

The execute hosts drop every inbound new connection (nftables), so everything here works only
because starters dial out. The first test follows docs/admin.md's multi-host guide command for
command (only the config paths differ); the others build on the same set-up: join tokens used
twice or too late, revocation, a broker SIGKILL and a pulled cable, bad input on the TLS port.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import netns
import pytest
from conftest import ROOT, SSH_TO_JOB, STJ, User, new_state_dir, wait_for
from netns import Host, Network, net_fixture  # noqa: F401

from ssh_to_job import common, wire

PORT = common.DEFAULT_PORT


class Site(netns.Site):
    """The guide's set-up in a test: config files, state dirs and daemons of each host."""

    def __init__(self, net: Network, root: pathlib.Path, su: str) -> None:
        super().__init__(net, root)
        self.broker, self.exec1, self.exec2, self.submit = net.standard_pool()
        self.su = su
        self.broker_cfg = self._config(
            "broker",
            f'[broker]\nlisten = "0.0.0.0:{PORT}"\n'
            f'cert_hosts = ["broker.stj.test", "{self.broker.address}"]\n'
            f'superusers = ["{su}"]\n',
        )

    def start_broker(self, *args: str) -> None:
        self.start("broker", self.broker, [STJ, "broker", *args], self.broker_cfg)
        wait_for(
            "the broker's TLS port", lambda: self.submit.can_connect(self.broker.address, PORT)
        )

    def token(self, *args: str) -> str:
        return self.run(self.broker, ROOT, STJ, "token", "create", *args).stdout.strip()

    def join(self, name: str, host: Host, token: str, slots: int = 2) -> None:
        cfg = self._config(name, f"[starter]\nslots = {slots}\n")
        self.start(
            name,
            host,
            [STJ, "starter", "--join", f"{self.broker.address}:{PORT}", "--token", token],
            cfg,
        )

    def status(self) -> dict[str, dict[str, Any]]:
        r = self.run(self.broker, ROOT, STJ, "status", "--json")
        return {s["starter_id"]: s for s in json.loads(r.stdout)["starters"]}

    def connected(self, *names: str, timeout: float = 30) -> None:
        wait_for(
            f"starters {names} connected",
            lambda: all(self.status().get(n, {}).get("connected") for n in names),
            timeout,
        )

    def submit_job(self, user: User, *argv: str) -> str:
        r = self.run(self.broker, user, STJ, "submit", *argv)
        return r.stdout.split(":", 1)[1].split()[0]

    def job(self, job_id: str) -> dict[str, Any]:
        for kind in ("q", "history"):
            r = self.run(self.broker, ROOT, STJ, kind, "--json")
            for j in json.loads(r.stdout):
                if j["id"] == job_id:
                    return j  # type: ignore[no-any-return]
        return {}

    def wait_running(self, job_id: str, timeout: float = 30) -> None:
        wait_for(
            f"job {job_id} running",
            lambda: (j := self.job(job_id)).get("state") == "running" and bool(j.get("pids")),
            timeout,
        )


@pytest.fixture
def site(net: Network, users: dict[str, User]) -> Iterator[Site]:
    root = new_state_dir()
    s = Site(net, root, users["su"].name or "")
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def _processes() -> list[tuple[bytes, str]]:
    """(command line, memory map) of every process that can still be read."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            maps = pathlib.Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found.append((cmdline, maps))
    return found


def _guide(site: Site) -> None:
    """docs/admin.md, "A pool across hosts", steps 1-4, as written there."""
    # 1. The broker host.
    site.start_broker()
    # 2. and 3. A join token per execute host; each joins with its own and then runs.
    site.join("exec1", site.exec1, site.token("--ttl", "10m"))
    site.join("exec2", site.exec2, site.token("--ttl", "10m"))
    # 4. stj status lists both, connected.
    site.connected("exec1.stj.test", "exec2.stj.test")


def test_guide_pool_across_hosts(site: Site, users: dict[str, User]) -> None:
    """The admin guide's steps give a pool whose jobs on both firewalled execute hosts take
    ssh sessions from the broker host, while the execute hosts listen on no port at all."""
    _guide(site)
    # Joined with a token, each starter runs without cryptography loaded: the enrolment ran
    # in a child (starter/_pkiwork.py), as the certificate checks at start do.
    starters = [m for c, m in _processes() if b"ssh_to_job.starter\0--join" in c]
    assert len(starters) == 2
    assert all("cryptography" not in m and "[heap]" in m for m in starters)
    a = users["a"]
    jobs = [site.submit_job(a, "-n", "1", "/bin/sleep", "300") for _ in range(4)]
    hosts = {}
    for job in jobs:
        site.wait_running(job)
        r = site.run(site.broker, a, SSH_TO_JOB, job, "hostname; id -un", timeout=60)
        name, login = r.stdout.split()
        assert login == a.name
        hosts[job] = name
    # Two slots per host, four jobs: both execute hosts run two each.
    assert sorted(hosts.values()) == ["exec1.stj.test"] * 2 + ["exec2.stj.test"] * 2
    for execute in (site.exec1, site.exec2):
        assert execute.run(["ss", "-Hltn"]).stdout.strip() == "", "an execute host listens"
        assert not site.broker.can_connect(execute.address, 22, timeout=1)
    text = site.run(site.broker, ROOT, STJ, "status").stdout
    assert "starter exec1.stj.test (198.18.0.2:" in text
    assert "starter exec2.stj.test (198.18.0.3:" in text
    site.run(site.broker, ROOT, STJ, "rm", *jobs)


def test_used_expired_and_foreign_tokens_are_refused_and_revoke_cuts_at_once(
    site: Site, users: dict[str, User]
) -> None:
    """A used, an expired and a malformed join token are each refused with one clear line; a
    revoked starter loses its control channel and its open session at once, is no longer
    listed, and cannot come back. (The broker listens where `stj broker --listen` says.)"""
    site.start_broker("--listen", f"{site.broker.address}:{PORT}")
    token = site.token()
    site.join("exec1", site.exec1, token)
    site.connected("exec1.stj.test")
    cfg = site._config("exec2", "")
    again = site.exec2.run(
        [STJ, "starter", "--join", f"{site.broker.address}:{PORT}", "--token", token],
        env=site.env(ROOT, cfg),
        check=False,
    )
    assert again.returncode == 1
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "join token already used (by exec1.stj.test" in again.stderr
    short = site.token("--ttl", "1")
    time.sleep(1.5)
    late = site.exec2.run(  # the token from stdin, off the command line
        [STJ, "starter", "--join", f"{site.broker.address}:{PORT}", "--token", "-"],
        env=site.env(ROOT, cfg),
        check=False,
        input=short + "\n",
    )
    assert late.returncode == 1
    assert "join token expired at" in late.stderr
    bad = site.exec2.run(
        [STJ, "starter", "--join", f"{site.broker.address}:{PORT}", "--token", "stj1.x.y.z"],
        env=site.env(ROOT, cfg),
        check=False,
    )
    assert bad.returncode == 1
    assert "join refused" in bad.stderr
    assert "exec2.stj.test" not in site.status()
    a = users["a"]
    for who, cmd in ((a, ["token", "create"]), (a, ["starter", "revoke", "exec1.stj.test"])):
        r = site.run(site.broker, who, STJ, *cmd, check=False)
        assert r.returncode == 1
        assert "only root or a queue superuser" in r.stderr, r.stderr
    su = users["su"]
    assert site.run(site.broker, su, STJ, "token", "create").stdout.startswith("stj1.")

    job = site.submit_job(a, "/bin/sleep", "300")
    site.wait_running(job)
    session = site.broker.popen(
        [*a.prefix(), SSH_TO_JOB, job, "echo in; exec sleep 300"],
        env=site.env(a),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/tmp",
    )
    assert session.stdout is not None
    assert session.stdout.readline() == b"in\n"
    start = time.monotonic()
    r = site.run(site.broker, ROOT, STJ, "starter", "revoke", "exec1.stj.test")
    assert "starter exec1.stj.test revoked" in r.stdout
    assert "1 live connection(s) cut" in r.stdout
    session.wait(timeout=20)
    assert time.monotonic() - start < 10, "the session outlived the revocation"
    assert "exec1.stj.test" not in site.status()
    wait_for(
        "the starter to see it is revoked",
        lambda: "this starter was revoked" in site.log("exec1").read_text(),
    )
    assert "exec1.stj.test" not in site.status()
    # A revoked starter never gets a session again, and its certificate opens no channel.
    r = site.run(site.broker, a, SSH_TO_JOB, job, "true", check=False, timeout=60)
    assert r.returncode != 0
    assert "is not connected" in r.stderr, r.stderr
    pki = site.root / "exec1" / "pki"
    probe = site.exec1.run(
        ["python3", "-c", REVOKED_PROBE, site.broker.address, str(PORT), str(pki)], timeout=30
    )
    assert "certificate revoked" in probe.stdout, probe.stdout + probe.stderr


REVOKED_PROBE = """
import socket, ssl, sys
host, port, pki = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(pki + "/ca.crt")
ctx.load_cert_chain(pki + "/starter.crt", pki + "/starter.key")
with ctx.wrap_socket(socket.create_connection((host, port), timeout=10)) as t:
    data = b""
    try:
        while chunk := t.recv(4096):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
print(data.decode(errors="replace"))
"""


def _marks(d: pathlib.Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in d.iterdir()}


@pytest.mark.slow
def test_broker_sigkill_and_a_cut_link_lose_and_duplicate_no_job(
    site: Site, users: dict[str, User]
) -> None:
    """SIGKILL of the broker and an execute host's cable pulled for 30 s: the starters come
    back by themselves (status shows the cut host disconnected with its last-seen time, then
    connected), and every job runs exactly once to completion."""
    _guide(site)
    a = users["a"]
    marks = site.root / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)
    jobs = [
        site.submit_job(
            a, "/bin/sh", "-c", 'echo "$(hostname)" >> "$0"; sleep 25', str(marks / f"m{i}")
        )
        for i in range(6)
    ]
    wait_for("four jobs running", lambda: len(_marks(marks)) == 4, 30)
    site.procs["broker"].kill()
    site.procs["broker"].wait()
    site.start_broker()
    site.connected("exec1.stj.test", "exec2.stj.test", timeout=30)
    site.exec1.link_down()
    try:
        time.sleep(30)
        st = site.status()
        # Both are still known; what the broker thinks of exec1 depends on whether its
        # silence deadline passed, but it is never forgotten.
        assert "exec1.stj.test" in st
        assert st["exec1.stj.test"]["last_seen"] > 0
    finally:
        site.exec1.link_up()
    site.connected("exec1.stj.test", "exec2.stj.test", timeout=60)

    def finished() -> bool:
        return all(site.job(j).get("state") == "completed" for j in jobs)

    wait_for("every job to complete", finished, 120)
    assert _marks(marks) == {f"m{i}": 1 for i in range(6)}, site.logs()
    for j in jobs:
        assert site.job(j)["exit_code"] == 0


@pytest.mark.slow
def test_bad_input_on_the_tls_port_costs_only_that_connection(site: Site) -> None:
    """Garbage before the handshake, a certificate of another pool and a handshake that never
    finishes, all from the submit host, cost only their own connections: `stj q` there answers
    within a second meanwhile, and the starters stay connected."""
    _guide(site)
    port = (site.broker.address, PORT)
    code = f"""
import socket, ssl, sys, time
garbage = [socket.create_connection({port!r}, timeout=30) for _ in range(20)]
for s in garbage:
    s.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n" + b"\\x00" * 512)
stalled = [socket.create_connection({port!r}, timeout=30) for _ in range(20)]
for s in stalled:
    s.sendall(b"\\x16\\x03\\x01")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(sys.argv[1])
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
refused = 0
for _ in range(5):
    try:
        with ctx.wrap_socket(socket.create_connection({port!r}, timeout=30)) as t:
            t.sendall(b"\\x00\\x00\\x00\\x02{{}}")
            refused += t.recv(10) == b""
    except (ssl.SSLError, OSError):
        refused += 1
print("refused", refused, flush=True)
time.sleep(8)
"""
    foreign = common.BrokerPki.open(site.root / "foreign")
    key = common.new_private_key()
    cert = foreign.issue(wire.ROLE_STARTER, "exec1.stj.test", key.public_key())
    leaf = site.root / "foreign-leaf"
    common.write_leaf(leaf, common.STARTER_KEY, common.STARTER_CERT, key, cert)
    ca = site.root / "broker" / "pki" / common.CA_CERT
    attacker = site.submit.popen(
        [
            "python3",
            "-c",
            code,
            str(ca),
            str(leaf / common.STARTER_CERT),
            str(leaf / common.STARTER_KEY),
        ],
        stdout=subprocess.PIPE,
    )
    assert attacker.stdout is not None
    assert attacker.stdout.readline() == b"refused 5\n"
    for _ in range(3):
        start = time.monotonic()
        site.run(site.submit, ROOT, STJ, "q")
        assert time.monotonic() - start < 1.0
    attacker.wait(timeout=30)
    st = site.status()
    assert st["exec1.stj.test"]["connected"]
    assert st["exec2.stj.test"]["connected"]
    log = site.log("broker").read_text()
    assert "certificate not accepted" in log
    # A starter that stops is still listed: disconnected, with when it was last seen.
    site.procs["exec2"].send_signal(signal.SIGTERM)
    site.procs["exec2"].wait(20)
    wait_for("exec2 disconnected", lambda: not site.status()["exec2.stj.test"]["connected"])
    assert site.status()["exec2.stj.test"]["last_seen"] > time.time() - 60
    text = site.run(site.broker, ROOT, STJ, "status").stdout
    assert "starter exec2.stj.test: disconnected, last seen" in text
    assert "starter exec1.stj.test (198.18.0.2:" in text
