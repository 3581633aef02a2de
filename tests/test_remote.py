"""Remote clients from a laptop, in network namespaces (tests/netns.py): the broker host, an
execute host that drops every inbound connection, and a laptop that has nothing but
ssh-to-job, OpenSSH and the files its user brought (a client key registered once, the pool
CA). A second pool's broker runs beside the first, for the keys-are-per-pool rules.

The first test follows docs/user.md's "From your laptop" section step by step. One set-up
serves the whole module (starting pools in namespaces is the expensive part).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import READ_FROM, ROOT, SERVE_ONCE, SSH_TO_JOB, STJ, User, new_state_dir, wait_for
from netns import Network, Site, missing_tools

PORT = 9620
OTHER_PORT = 9621


class RemoteSite(Site):
    """A pool (broker + one firewalled execute host), a second pool's broker, a laptop."""

    def __init__(self, net: Network, root: pathlib.Path, users: dict[str, User]) -> None:
        super().__init__(net, root)
        self.users = users
        self.broker = net.add_host("broker", "198.18.0.1", hostname="broker.stj.test")
        self.exec1 = net.add_host(
            "exec1", "198.18.0.2", hostname="exec1.stj.test", drop_inbound=True
        )
        self.laptop = net.add_host("laptop", "198.18.0.5", hostname="laptop.stj.test")
        self.pool = f"{self.broker.address}:{PORT}"
        self.other = f"{self.broker.address}:{OTHER_PORT}"
        self.broker_cfg = self._config("broker", f'[broker]\nlisten = "0.0.0.0:{PORT}"\n')
        self.other_cfg = self._config("other", f'[broker]\nlisten = "0.0.0.0:{OTHER_PORT}"\n')
        #: Each user's laptop files (XDG_CONFIG_HOME), as if on another machine.
        self.laptop_home: dict[str, pathlib.Path] = {}
        for name in ("a", "b"):
            u = users[name]
            d = root / f"laptop-{name}"
            d.mkdir(mode=0o700)
            os.chown(d, u.uid, u.gid)
            self.laptop_home[name] = d

    def on_laptop(
        self,
        who: str,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        mux: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as ``who`` on the laptop, with their laptop files and no pool config;
        each command a full session unless ``mux`` (repeat commands through a master)."""
        user = self.users[who]
        env = self.env(
            user, XDG_CONFIG_HOME=str(self.laptop_home[who]), SSH_TO_JOB_MUX="1" if mux else "0"
        )
        env["STJ_CONFIG"] = "/nonexistent/stj.toml"  # nothing of the pool's host applies here
        return self.run(
            self.laptop, user, *argv, check=check, timeout=timeout, input=input, env=env
        )

    def on_broker(
        self, who: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(self.broker, self.users[who], *argv, check=check)

    def set_up(self) -> None:
        self.start("broker", self.broker, [STJ, "broker"], self.broker_cfg)
        self.start("other", self.broker, [STJ, "broker"], self.other_cfg)
        for port in (PORT, OTHER_PORT):
            wait_for(
                "the brokers' TLS ports",
                lambda p=port: self.laptop.can_connect(self.broker.address, p),  # type: ignore[misc]
            )
        token = self.run(self.broker, ROOT, STJ, "token", "create").stdout.strip()
        cfg = self._config("exec1", "[starter]\nslots = 8\n")
        self.start(
            "exec1", self.exec1, [STJ, "starter", "--join", self.pool, "--token", token], cfg
        )

        def connected() -> bool:
            r = self.run(self.broker, ROOT, STJ, "status", "--json", check=False)
            return r.returncode == 0 and any(
                s["connected"] for s in json.loads(r.stdout)["starters"]
            )

        wait_for("the starter connected", connected, 30)

    def submit(self, who: str, *argv: str) -> str:
        r = self.on_broker(who, STJ, "submit", *argv)
        job = r.stdout.split(":", 1)[1].split()[0]

        def running() -> bool:
            r = self.run(self.broker, ROOT, STJ, "q", "--json")
            return any(j["id"] == job and j["state"] == "running" for j in json.loads(r.stdout))

        wait_for(f"job {job} running", running, 30)
        return job


def _register(site: RemoteSite, who: str) -> str:
    """docs/user.md, "From your laptop", steps 1-3 for user ``who``: the laptop's client key
    registered on the pool's host, the pool CA brought to the laptop and trusted there."""
    pub = site.on_laptop(who, STJ, "keys", "show").stdout
    site.run(site.broker, site.users[who], STJ, "keys", "add", input=pub)
    ca = site.on_broker(who, STJ, "pool-ca").stdout
    pem = site.laptop_home[who] / "pool-ca.pem"
    pem.write_text(ca)
    pem.chmod(0o644)
    site.on_laptop(who, STJ, "pool-ca", "--trust", site.pool, str(pem))
    return pub.strip()


@pytest.fixture(scope="module")
def site(users: dict[str, User]) -> Iterator[RemoteSite]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"network namespaces need {', '.join(missing)}")
    root = new_state_dir()
    net = Network()
    s = RemoteSite(net, root, users)
    try:
        s.set_up()
        _register(s, "a")
        yield s
    finally:
        s.close()
        net.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def job(site: RemoteSite) -> str:
    """One running job of user a's on the firewalled execute host, with a file to fetch."""
    a = site.users["a"]
    d = site.root / "job-a"
    d.mkdir(mode=0o755)
    os.chown(d, a.uid, a.gid)
    return site.submit(
        "a", "-d", str(d), "/bin/sh", "-c", "head -c 3000000 /dev/urandom > data.bin; sleep 600"
    )


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ssh-to-job: "), r.stderr
    return lines[0]


def test_from_the_laptop_ssh_scp_sftp_rsync(site: RemoteSite, job: str) -> None:
    """From the laptop, ssh-to-job -pool runs a command in the job on the firewalled execute
    host, scp and sftp fetch a file, rsync -e 'ssh-to-job -pool ...' copies it; each session
    is recorded with the laptop's key and address, and the broker relayed its bytes by splice."""
    a = site.users["a"]
    r = site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, job, "hostname; id -un; pwd")
    host, login, cwd = r.stdout.split()
    assert (host, login) == ("exec1.stj.test", a.name)
    out = site.root / "fetched"
    out.mkdir(mode=0o777, exist_ok=True)
    out.chmod(0o777)
    site.on_laptop(
        "a", SSH_TO_JOB, "-pool", site.pool, "-ssh", "scp", job, "remote:data.bin", f"{out}/scp"
    )
    site.on_laptop(
        "a",
        SSH_TO_JOB,
        "-pool",
        site.pool,
        "-ssh",
        "sftp -b -",
        job,
        input=f"get data.bin {out}/sftp\n",
    )
    site.on_laptop(
        "a", "rsync", "-e", f"{SSH_TO_JOB} -pool {site.pool}", f"{job}:data.bin", f"{out}/rsync"
    )
    original = pathlib.Path(cwd) / "data.bin"
    for name in ("scp", "sftp", "rsync"):
        assert (out / name).read_bytes() == original.read_bytes(), name
    # Session records: the laptop's key fingerprint and its address.
    records = json.loads(site.on_broker("a", STJ, "history", "--sessions", "--json", job).stdout)
    granted = [s for s in records if s["outcome"] == "granted"]
    assert len(granted) == 4
    fp = json.loads(site.on_broker("a", STJ, "keys", "list", "--json").stdout)[0]["fingerprint"]
    assert {(s["client_key"], s["client_addr"]) for s in granted} == {(fp, site.laptop.address)}
    # "relayed N bytes to the starter, M to the client (spliced, not copied)" per session:
    # the three downloads (3 MB each) went through the kernel relay.
    to_client = [
        int(m[1])
        for m in re.finditer(
            r"(\d+) to the client \(spliced, not copied\)", site.log("broker").read_text()
        )
    ]
    assert len(to_client) >= 4
    assert sum(to_client) > 3 * 3_000_000


def test_repeat_commands_from_the_laptop_share_one_master(site: RemoteSite) -> None:
    """From the laptop, with the product default (repeat commands through a ControlMaster),
    three commands to one job make one granted, recorded session, and all three run."""
    a = site.users["a"]
    job = site.submit("a", "/bin/sleep", "300")
    try:
        outs = [
            site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, job, f"echo n{i}", mux=True)
            for i in range(3)
        ]
        assert [r.stdout.strip() for r in outs] == ["n0", "n1", "n2"]
        records = json.loads(
            site.on_broker("a", STJ, "history", "--sessions", "--json", job).stdout
        )
        assert [s["outcome"] for s in records] == ["granted"]
        assert records[0]["uid"] == a.uid
    finally:
        site.on_broker("a", STJ, "rm", job)


def test_unregistered_foreign_and_other_pools_keys_get_one_clear_line(
    site: RemoteSite, job: str
) -> None:
    """A laptop key nobody registered, a registered key of another user (for a's job), a key
    of this pool at another pool, a pool with no trusted CA and a broker that is not the
    trusted pool's are each refused in one line that says what to do."""
    line = _one_line(site.on_laptop("b", SSH_TO_JOB, "-pool", site.pool, job, "true", check=False))
    assert "no pool CA for 198.18.0.1:9620" in line
    assert "stj pool-ca --trust 198.18.0.1:9620" in line
    ca = site.on_broker("b", STJ, "pool-ca").stdout
    site.on_laptop("b", STJ, "pool-ca", "--trust", site.pool, "-", input=ca)
    line = _one_line(site.on_laptop("b", SSH_TO_JOB, "-pool", site.pool, job, "true", check=False))
    assert "is not registered in this pool" in line
    assert "stj keys add" in line
    _register(site, "b")
    line = _one_line(site.on_laptop("b", SSH_TO_JOB, "-pool", site.pool, job, "true", check=False))
    assert f"job {job} belongs to {site.users['a'].name}" in line
    # The other pool: a's key is registered only in the first one.
    other_ca = site.run(
        site.broker, ROOT, STJ, "pool-ca", env=site.env(ROOT, site.other_cfg)
    ).stdout
    site.on_laptop("a", STJ, "pool-ca", "--trust", site.other, "-", input=other_ca)
    line = _one_line(
        site.on_laptop("a", SSH_TO_JOB, "-pool", site.other, "1.0", "true", check=False)
    )
    assert "is not registered in this pool" in line
    # The other pool's CA trusted under the first pool's address: its broker is refused.
    site.on_laptop("b", STJ, "pool-ca", "--trust", site.pool, "-", input=other_ca)
    try:
        line = _one_line(
            site.on_laptop("b", SSH_TO_JOB, "-pool", site.pool, job, "true", check=False)
        )
        assert "is not the pool whose CA you trusted" in line
    finally:
        site.on_laptop("b", STJ, "pool-ca", "--trust", site.pool, "-", input=ca)


REPLAY = """
import json, socket, sys
from ssh_to_job import wire
from ssh_to_job.client import _remote
host, port, job = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seed, public = _remote.client_key()
_priv, session_key = wire.ed25519_keypair()

def connect():
    ctx = _remote._context(_remote.ca_path(host, port))
    tls = ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=host)
    conn = wire.Connection(wire.Channel.REMOTE, wire.Role.CLIENT, wire.Role.BROKER)
    tls.sendall(conn.send(wire.RemoteHello()))
    return tls, conn, _remote._receive(tls, conn, "broker"), _remote._broker_pool_id(tls, "b")

def signed(pool_id, nonce, job):
    statement = wire.remote_request_statement(pool_id, nonce, job, session_key, public)
    return wire.RemoteSsh(job=job, client_key=session_key, key=public,
                          signature=wire.sign(seed, statement))

out = {}
tls1, conn1, ch1, pool_id = connect()
captured = signed(pool_id, ch1.nonce, job)  # what a sniffer or a log could have kept
tls2, conn2, ch2, _ = connect()
assert ch2.nonce != ch1.nonce
tls2.sendall(conn2.send(captured))
out["replayed"] = _remote._receive(tls2, conn2, "broker").code
tls3, conn3, ch3, _ = connect()
tls3.sendall(conn3.send(signed("another-pool", ch3.nonce, job)))
out["other_pool"] = _remote._receive(tls3, conn3, "broker").code
tls1.sendall(conn1.send(signed(pool_id, ch1.nonce, "999999.0")))
out["fresh"] = _remote._receive(tls1, conn1, "broker").code
print(json.dumps(out))
"""


def test_a_replayed_or_misdirected_request_fails(site: RemoteSite, job: str) -> None:
    """A correctly signed request replayed on another connection (another nonce) and one
    signed for another pool id are refused for their signature; the same key's fresh request
    passes the signature check (and meets the next rule: the job is unknown)."""
    r = site.on_laptop("a", sys.executable, "-c", REPLAY, site.broker.address, str(PORT), job)
    assert json.loads(r.stdout) == {
        "replayed": "bad_signature",
        "other_pool": "bad_signature",
        "fresh": "unknown_job",
    }
    assert "a replayed or forged request" in site.log("broker").read_text()


def test_local_clients_are_unchanged(site: RemoteSite, job: str) -> None:
    """On the broker host the unix socket path still works as before, beside remote clients."""
    r = site.on_broker("a", SSH_TO_JOB, job, "hostname")
    assert r.stdout.strip() == "exec1.stj.test"


def _py(script: str, *args: str) -> str:
    return shlex.join(["python3", "-c", script, *args])


def test_plain_ssh_from_the_laptop_with_ssh_config(site: RemoteSite, job: str) -> None:
    """stj ssh-config -pool on the laptop gives a Host block with which plain OpenSSH reaches
    the job (a refusal is one line): a command, scp, rsync -e ssh, -L, -R and -D forwards,
    and four parallel `ssh -T -D PORT job-N bash` with a script on stdin (VS Code's way)."""
    block = site.on_laptop("a", STJ, "ssh-config", "-pool", site.pool).stdout
    assert f"-pool {site.pool} %n" in block
    pools = site.laptop_home["a"] / "ssh-to-job" / "pools"
    known = pools / "198.18.0.1_9620.known_hosts"
    assert f'UserKnownHostsFile "{known}"' in block
    ssh_ca = site.on_broker("a", STJ, "pool-ca").stdout.splitlines()[-1].split(": ", 1)[1]
    assert known.read_text() == f"@cert-authority job-* {ssh_ca}\n"
    cfg = site.laptop_home["a"] / "ssh_config"
    cfg.write_text(block)
    cfg.chmod(0o644)
    host = f"job-{job}"
    ssh = ["ssh", "-F", str(cfg)]
    r = site.on_laptop("a", *ssh, host, "hostname; pwd")
    name, cwd = r.stdout.split()
    assert name == "exec1.stj.test"
    # ssh itself checked the session's host certificate: nothing was pinned per session, and
    # the same connection with another pool's host CA in known_hosts is refused by ssh.
    assert not (site.laptop_home["a"] / "ssh-to-job" / "known_hosts").exists()
    assert site.on_laptop("a", *ssh, f"job-{job.split('.')[0]}", "echo proc0").stdout == "proc0\n"
    other_ca = site.run(site.broker, ROOT, STJ, "pool-ca", env=site.env(ROOT, site.other_cfg))
    wrong = site.laptop_home["a"] / "wrong_known_hosts"
    wrong.write_text(
        f"@cert-authority job-* {other_ca.stdout.splitlines()[-1].split(': ', 1)[1]}\n"
    )
    wrong_cfg = site.laptop_home["a"] / "wrong_ssh_config"
    wrong_cfg.write_text(block.replace(str(known), str(wrong)))
    wrong_cfg.chmod(0o644)
    r = site.on_laptop("a", "ssh", "-F", str(wrong_cfg), host, "true", check=False)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr, r.stderr
    r = site.on_laptop(
        "a", "ssh", "-F", str(wrong_cfg), f"job-{job.split('.')[0]}", "true", check=False
    )
    assert r.returncode == 255, "job-N (proc 0) is a principal too, and still checked"
    # A refusal through plain ssh is one line too: no fd-passing noise from OpenSSH.
    r = site.on_laptop("a", *ssh, "job-999999.0", "true", check=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["ssh-to-job: job 999999.0 is not in the queue"]
    out = site.root / "fetched-ssh"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    site.on_laptop("a", "scp", "-F", str(cfg), f"{host}:data.bin", f"{out}/scp")
    site.on_laptop("a", "rsync", "-e", shlex.join(ssh), f"{host}:data.bin", f"{out}/rsync")
    original = (pathlib.Path(cwd) / "data.bin").read_bytes()
    assert (out / "scp").read_bytes() == original
    assert (out / "rsync").read_bytes() == original

    a = site.users["a"]
    env = site.env(a, XDG_CONFIG_HOME=str(site.laptop_home["a"]))

    def background(*argv: str) -> subprocess.Popen[str]:
        return site.laptop.popen(
            [*a.prefix(), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd="/tmp",
        )

    forward = [*ssh, "-o", "ExitOnForwardFailure=yes"]
    # -L: the laptop's 7101 reaches a server on the execute host's loopback.
    local = background(
        *forward, "-L", "127.0.0.1:7101:127.0.0.1:7102", host, _py(SERVE_ONCE, "7102", "hello-L")
    )
    assert local.stdout is not None
    assert local.stdout.readline() == "ready\n"
    got = site.on_laptop("a", sys.executable, "-c", READ_FROM, "7101")
    assert got.stdout.strip() == "hello-L"
    local.wait(30)
    # -R: the execute host's 7103 reaches a server on the laptop.
    server = background(sys.executable, "-c", SERVE_ONCE, "7104", "hello-R")
    assert server.stdout is not None
    assert server.stdout.readline() == "ready\n"
    r = site.on_laptop(
        "a", *forward, "-R", "127.0.0.1:7103:127.0.0.1:7104", host, _py(READ_FROM, "7103")
    )
    assert r.stdout.strip() == "hello-R"
    server.wait(30)
    # -D: a SOCKS proxy on the laptop whose connections leave from the execute host.
    socks = background(*forward, "-D", "127.0.0.1:7105", host, _py(SERVE_ONCE, "7106", "hello-D"))
    assert socks.stdout is not None
    assert socks.stdout.readline() == "ready\n"
    got = site.on_laptop("a", sys.executable, "-c", READ_FROM, "7105", "7106")
    assert got.stdout.strip() == "hello-D"
    socks.wait(30)

    # VS Code Remote-SSH: several `ssh -T -D PORT host bash` at once, a script on stdin.
    editors = [
        site.laptop.popen(
            [*a.prefix(), *ssh, "-T", "-D", f"127.0.0.1:{7110 + i}", host, "bash"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/tmp",
        )
        for i in range(4)
    ]
    results = [
        p.communicate('echo "$(hostname) $((6 * 7)) $PWD"\nexit 0\n', timeout=60) for p in editors
    ]
    for p, (stdout, stderr) in zip(editors, results, strict=True):
        assert p.returncode == 0, stderr
        assert stdout.split() == ["exec1.stj.test", "42", cwd], stderr


def test_allow_ssh_from_limits_remote_clients_only(site: RemoteSite) -> None:
    """A job submitted --allow-ssh-from refuses a laptop outside those networks in one line
    naming the rule, admits it from inside them, and leaves local clients alone; a network
    that is not one is refused at submit."""
    elsewhere = site.submit(
        "a", "--allow-ssh-from", "198.19.0.0/16,2001:db8::/32", "/bin/sleep", "600"
    )
    line = _one_line(
        site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, elsewhere, "true", check=False)
    )
    assert line == (
        f"ssh-to-job: job {elsewhere} accepts remote sessions only from "
        "198.19.0.0/16,2001:db8::/32 "
        f"(stj submit --allow-ssh-from); you connect from {site.laptop.address}"
    )
    assert site.on_broker("a", SSH_TO_JOB, elsewhere, "echo local").stdout == "local\n"
    here = site.submit(
        "a", "--allow-ssh-from", f"198.19.0.0/16,{site.laptop.address}/32", "/bin/sleep", "600"
    )
    r = site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, here, "echo remote")
    assert r.stdout == "remote\n"
    bad = site.on_broker(
        "a", STJ, "submit", "--allow-ssh-from", "198.19.0.300/16", "/bin/true", check=False
    )
    assert bad.returncode == 2
    assert "ssh_from takes networks like 10.1.0.0/16" in bad.stderr
    site.on_broker("a", STJ, "rm", elsewhere, here)


FLOOD = """
import socket, sys
from ssh_to_job.client import _remote
host, port = sys.argv[1], int(sys.argv[2])
ctx = _remote._context(_remote.ca_path(host, port))
held = [
    ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=host)
    for _ in range(64)
]
extra = ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=host)
print(extra.recv(4096)[4:].decode(), flush=True)
for t in held:
    t.close()
"""


def test_unauthenticated_connections_are_capped_per_address(site: RemoteSite, job: str) -> None:
    """Connections without a certificate that have not proved a key count against the
    per-address cap: past it the next one gets one error frame at once; once they are gone
    the laptop is served again."""
    r = site.on_laptop("a", sys.executable, "-c", FLOOD, site.broker.address, str(PORT))
    assert json.loads(r.stdout)["code"] == "busy", r.stdout
    assert "connections open to the broker (the limit)" in r.stdout
    r = site.on_laptop("a", SSH_TO_JOB, "-pool", site.pool, job, "echo again")
    assert r.stdout == "again\n"
