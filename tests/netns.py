"""Test hosts as network namespaces on one private switch, for the multi-host tests.

Not a test file: the multi-host tests import it (``from netns import Network, net_fixture``).

Layout: one namespace per host (``stj-<run>-<host>``) with an ``eth0`` whose other end sits in
the run's own *switch* namespace (``stj-<run>-sw``), plugged into a bridge there. Nothing is
created in the machine's own namespace (no bridge, no veth, no address, no route, no firewall
rule), and every address comes from 198.18.0.0/15, the benchmarking range (RFC 2544), used only
inside these namespaces; so parallel runs (each with its own random ``<run>``) cannot collide,
and deleting the namespaces removes everything (``Network.close``, called by the fixture's
teardown even when the test failed).

Execute hosts get ``drop_inbound=True``: an nftables table inside their namespace drops every
inbound new connection (anything the host did not start), as the firewall of a real execute
host would; traffic the host started itself (a starter dialling the broker) flows both ways.
``Host.link_down``/``link_up`` pull and replug the host's cable (the switch side of its veth),
for network-cut tests: the host keeps its address and routes, packets just stop.

Usage in a test module::

    from netns import Network, net_fixture  # noqa: F401  (net_fixture provides ``net``)

    def test_something(net: Network) -> None:
        broker, execute, submit = net.standard_pool()[0], ...
        proc = execute.popen([...])

``Site`` is what the pool tests on top share: config files and state dirs under one root,
daemons started in hosts with their logs, commands run in a host as a test user.

Requires root, ``ip`` (iproute2), ``nft`` (nftables), ``unshare`` and ``nsenter``
(util-linux); the fixture skips otherwise. Every wait here is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from conftest import BIN, ROOT, User

#: RFC 2544's benchmarking range: never routed on the internet, used only inside our namespaces.
RANGE = ipaddress.ip_network("198.18.0.0/15")
PREFIX_LEN = 24
NS_PREFIX = "stj-"
#: The standard pool's hosts and their addresses.
STANDARD = (
    ("broker", "198.18.0.1", False),
    ("exec1", "198.18.0.2", True),
    ("exec2", "198.18.0.3", True),
    ("submit", "198.18.0.4", False),
)

#: An nftables ruleset for an execute host: inbound new connections dropped, the rest allowed.
DROP_INBOUND = """
table inet stj_firewall {
    chain input {
        type filter hook input priority filter; policy accept;
        iif "lo" accept
        ct state established,related accept
        ct state new drop
        ct state invalid drop
    }
}
"""


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 20) -> str:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def missing_tools() -> list[str]:
    """What this machine lacks to build test networks (empty: all there)."""
    out = [t for t in ("ip", "nft", "unshare", "nsenter") if shutil.which(t) is None]
    if os.geteuid() != 0:
        out.append("root")
    return out


class Host:
    """One test host: a network namespace with ``eth0`` on the run's switch."""

    def __init__(
        self, net: Network, name: str, address: str, hostname: str | None, drop_inbound: bool
    ) -> None:
        self.net = net
        self.name = name
        self.ns = f"{net.prefix}{name}"
        self.address = address
        self.hostname = hostname
        self.drop_inbound = drop_inbound
        #: The switch-side end of this host's cable.
        self.port = f"p-{name}"[:15]

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} in {self.ns}>"

    def argv(self, argv: Sequence[str], *, hostname: str | None = None) -> list[str]:
        """``argv`` as it runs inside this host (its own UTS namespace if it has a hostname)."""
        name = hostname or self.hostname
        prefix = ["ip", "netns", "exec", self.ns]
        if name:
            # A UTS namespace of its own so `hostname` inside says this host's name.
            prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name]
        return prefix + list(argv)

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host and wait for it (bounded by ``timeout``)."""
        kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), text=True, timeout=timeout, check=check, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside this host; the caller ends it (``Network.close`` does too)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self.net.procs.append(proc)
        return proc

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` in this host's network namespace only. Unlike ``ip netns exec`` (``argv``),
        which remounts /sys for the namespace and so hides the cgroup hierarchies under
        /sys/fs/cgroup, this keeps the machine's mounts: for Slurm's daemons and a Slurm-mode
        starter, which track jobs in cgroups. The host name stays the machine's as well."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", *argv]

    def link_down(self) -> None:
        """Pull this host's cable: its packets stop, its address and routes stay."""
        _run(["ip", "-n", self.net.switch, "link", "set", self.port, "down"])

    def link_up(self) -> None:
        _run(["ip", "-n", self.net.switch, "link", "set", self.port, "up"])

    def can_connect(self, address: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from this host to ``address:port`` opens within ``timeout``."""
        code = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({address!r}, {port}), timeout={timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        proc = self.run([sys.executable, "-c", code], timeout=timeout + 10, check=False)
        return proc.returncode == 0


class Network:
    """A run's switch and hosts; ``close`` removes all of it (also as a context manager)."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.prefix = f"{NS_PREFIX}{self.run_id}-"
        self.switch = f"{self.prefix}sw"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self._namespaces: list[str] = []
        self._add_ns(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def add_host(
        self,
        name: str,
        address: str,
        *,
        hostname: str | None = None,
        drop_inbound: bool = False,
    ) -> Host:
        """A new host ``name`` with ``address`` (from 198.18.0.0/15) on the switch."""
        if ipaddress.ip_address(address) not in RANGE:
            raise ValueError(f"{address} is outside {RANGE}: test hosts use only that range")
        if name in self.hosts or not name.isalnum() or len(name) > 12:
            raise ValueError(f"host name {name!r} is taken or not short and alphanumeric")
        host = Host(self, name, address, hostname, drop_inbound)
        self._add_ns(host.ns)
        # Made inside the switch namespace with the far end moved straight into the host's:
        # no interface ever exists in the machine's own namespace.
        _run(
            [
                "ip", "-n", self.switch, "link", "add", host.port, "type", "veth",
                "peer", "name", "eth0", "netns", host.ns,
            ]
        )  # fmt: skip
        _run(["ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up"])
        _run(["ip", "-n", host.ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0"])
        _run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
        if drop_inbound:
            _run(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], input=DROP_INBOUND)
        self.hosts[name] = host
        return host

    def standard_pool(self) -> list[Host]:
        """broker (198.18.0.1), exec1 and exec2 (.2, .3, inbound dropped), submit (.4)."""
        return [
            self.add_host(name, addr, hostname=f"{name}.stj.test", drop_inbound=drop)
            for name, addr, drop in STANDARD
        ]

    def close(self) -> None:
        """End the processes started in hosts, delete every namespace; safe to call twice."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self.procs.clear()
        errors = []
        for ns in reversed(self._namespaces):
            try:
                _run(["ip", "netns", "del", ns])
            except RuntimeError as exc:
                errors.append(str(exc))
        self._namespaces.clear()
        if errors:
            raise RuntimeError("could not remove test namespaces: " + "; ".join(errors))


def leftovers(run_id: str) -> list[str]:
    """Namespaces and links of run ``run_id`` still on the machine (should be none)."""
    names = _run(["ip", "netns", "list"]).split()
    links = _run(["ip", "-o", "link", "show"])
    ours = [n for n in names if n.startswith(f"{NS_PREFIX}{run_id}-")]
    return ours + [line for line in links.splitlines() if run_id in line]


@pytest.fixture(name="net")
def net_fixture() -> Iterator[Network]:
    """A fresh empty ``Network``, removed after the test whatever happened."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"network namespaces need {', '.join(missing)}")
    net = Network()
    try:
        yield net
    finally:
        net.close()


class Site:
    """Pool daemons in test hosts: a config file and state dir each under ``root``, a log
    each, and commands run in a host as a test user (``broker_cfg`` is their default config).
    ``close`` stops the daemons, the last started first (starters before their broker)."""

    def __init__(self, net: Network, root: pathlib.Path) -> None:
        self.net = net
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.broker_cfg = root / "broker.toml"

    def _config(self, name: str, body: str) -> pathlib.Path:
        state = self.root / name
        state.mkdir(mode=0o755, exist_ok=True)
        cfg = self.root / f"{name}.toml"
        cfg.write_text(f'[pool]\nstate_dir = "{state}"\n\n{body}')
        cfg.chmod(0o644)
        return cfg

    def env(self, user: User, config: pathlib.Path | None = None, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "STJ_CONFIG": str(config or self.broker_cfg),
            "HOME": user.home,
            "USER": user.name or "",
            "LOGNAME": user.name or "",
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
            "TMPDIR": "/tmp",
        }
        env.update(extra)
        return env

    def log(self, name: str) -> pathlib.Path:
        return self.root / f"{name}.log"

    def start(
        self, name: str, host: Host, argv: list[str], config: pathlib.Path, *, mounts: bool = False
    ) -> None:
        """Start daemon ``name`` as root in ``host`` (``mounts``: keep the machine's mounts,
        see ``Host.enter``)."""
        with open(self.log(name), "ab") as out:
            kw: dict[str, Any] = dict(
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=self.env(ROOT, config)
            )
            if mounts:
                proc: subprocess.Popen[bytes] = subprocess.Popen(host.enter(argv), **kw)
                self.net.procs.append(proc)
            else:
                proc = host.popen(argv, **kw)
            self.procs[name] = proc

    def run(
        self,
        host: Host,
        user: User,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        r = host.run(
            [*user.prefix(), *argv],
            env=env or self.env(user),
            check=False,
            timeout=timeout,
            cwd="/tmp",
            input=input,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.logs()}"
            )
        return r

    def logs(self) -> str:
        out = []
        for name in sorted(self.procs):
            text = self.log(name).read_text(errors="replace") if self.log(name).exists() else ""
            out.append(f"--- {name} ---\n{text[-3000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
