"""The network-namespace harness (tests/netns.py) builds the hosts the multi-host tests need."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from netns import Host, Network, leftovers, missing_tools, net_fixture  # noqa: F401

LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
s.settimeout(60)
while True:
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.sendall(b"hi")
    c.close()
"""


def _listen(host: Host, port: int) -> subprocess.Popen[str]:
    """A TCP listener inside ``host``, started and ready (bounded wait)."""
    proc = host.popen(
        [sys.executable, "-c", LISTENER, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the listener prints at once or dies (EOF)
    assert line.strip() == "ready", f"listener in {host} did not start"
    return proc


def test_standard_pool_hosts_reach_each_other(net: Network) -> None:
    """Each host has its address and hostname, and broker and submit reach each other."""
    broker, exec1, exec2, submit = net.standard_pool()
    assert [h.address for h in (broker, exec1, exec2, submit)] == [
        "198.18.0.1",
        "198.18.0.2",
        "198.18.0.3",
        "198.18.0.4",
    ]
    assert exec1.run(["hostname"]).stdout.strip() == "exec1.stj.test"
    assert "198.18.0.2/24" in exec1.run(["ip", "-o", "addr", "show", "eth0"]).stdout
    _listen(broker, 9618)
    _listen(submit, 9000)
    assert submit.can_connect(broker.address, 9618)
    assert broker.can_connect(submit.address, 9000)
    # The machine's own namespace has no route into the test range.
    route = subprocess.run(
        ["ip", "route", "get", "198.18.0.1"], capture_output=True, text=True, check=False
    )
    assert "dev br" not in route.stdout


def test_execute_host_refuses_inbound_but_dials_out(net: Network) -> None:
    """nftables in an execute host drops connections to it; its own dial-outs work."""
    broker = net.add_host("broker", "198.18.0.1")
    execute = net.add_host("exec1", "198.18.0.2", drop_inbound=True)
    _listen(execute, 2222)
    _listen(broker, 9618)
    assert execute.can_connect("127.0.0.1", 2222)  # the listener is really there
    assert not broker.can_connect(execute.address, 2222, timeout=1.5)
    assert execute.can_connect(broker.address, 9618)
    ruleset = execute.run(["nft", "list", "ruleset"]).stdout
    assert "ct state new drop" in ruleset
    assert broker.run(["nft", "list", "ruleset"]).stdout.strip() == ""


def test_link_down_cuts_traffic_and_link_up_restores_it(net: Network) -> None:
    """With its cable pulled a host reaches nobody; plugged back in, it does again."""
    broker = net.add_host("broker", "198.18.0.1")
    execute = net.add_host("exec1", "198.18.0.2", drop_inbound=True)
    _listen(broker, 9618)
    assert execute.can_connect(broker.address, 9618)
    execute.link_down()
    assert not execute.can_connect(broker.address, 9618, timeout=1.5)
    execute.link_up()
    deadline = time.monotonic() + 10
    for _ in range(20):  # the bridge port needs a moment to forward again
        if execute.can_connect(broker.address, 9618, timeout=1.0):
            break
        assert time.monotonic() < deadline, "link up did not restore traffic"
    else:
        pytest.fail("link up did not restore traffic")


def test_teardown_leaves_nothing_behind() -> None:
    """After close (also after a failure inside ``with``), no namespace, link or process stays."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"network namespaces need {', '.join(missing)}")
    net = Network()
    procs = []

    def failing_test() -> None:
        with net:
            net.standard_pool()
            procs.append(net.hosts["exec1"].popen(["sleep", "600"]))
            assert len(leftovers(net.run_id)) >= 5
            raise RuntimeError("test failure")

    with pytest.raises(RuntimeError, match="test failure"):
        failing_test()
    assert leftovers(net.run_id) == []
    assert procs[0].poll() is not None
    net.close()  # twice is fine


def test_addresses_outside_the_benchmark_range_are_refused(net: Network) -> None:
    """A test cannot put a host on a real network's addresses."""
    with pytest.raises(ValueError, match=r"outside 198\.18\.0\.0/15"):
        net.add_host("x", "198.20.0.1")  # just past the range, and never used: refused first
