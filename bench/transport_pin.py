"""Plain OpenSSH over ProxyCommand pipes against fd-passed loopback TCP, on two cores and one.

A throwaway measurement for docs/performance.md ("Cold session and throughput"): is the
transport ssh-to-job hands to ssh (a loopback TCP socket, ``ProxyUseFdpass``) slower than the
floor's pipes when both ends share one core? No ssh-to-job code runs: ssh, scp and ``sshd -i``
as root with throw-away keys in a temporary directory, the data in /dev/shm. Rounds are
interleaved (pipe, TCP, pipe, TCP, ...). Usage, as root: ``python bench/transport_pin.py
[ROUNDS] [MIB]``.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

SSHD = "/usr/sbin/sshd"

# The ProxyCommand of the TCP variant: a connected loopback pair, sshd -i on one end, the
# other end passed to ssh over its stdout (ProxyUseFdpass), as the product's helper does.
FDPROXY = """\
import socket, subprocess, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
c = socket.create_connection(ls.getsockname()); s, _ = ls.accept()
for x in (c, s): x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
subprocess.Popen([sys.argv[1], "-i", "-e", "-f", sys.argv[2]], stdin=s, stdout=s,
                 stderr=subprocess.DEVNULL, start_new_session=True)
socket.send_fds(socket.socket(fileno=1), [b"\\0"], [c.fileno()])
"""


def setup(d: pathlib.Path) -> list[str]:
    for name in ("hk", "id"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    (d / "ak").write_text((d / "id.pub").read_text())
    (d / "kh").write_text(f"floor {(d / 'hk.pub').read_text()}")
    (d / "sshd_config").write_text(
        f"HostKey {d}/hk\nAuthorizedKeysFile {d}/ak\nPermitRootLogin yes\nUsePAM no\n"
        "StrictModes no\nCiphers aes128-gcm@openssh.com\nLogLevel ERROR\n"
        # scp speaks SFTP since OpenSSH 9.0.
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )
    (d / "fdproxy.py").write_text(FDPROXY)
    return [
        *("-o", f"UserKnownHostsFile={d}/kh", "-o", "HostKeyAlias=floor"),
        *("-o", f"IdentityFile={d}/id", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"),
        *("-o", "Ciphers=aes128-gcm@openssh.com", "-o", "User=root"),
    ]


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    mib = int(argv[1]) if len(argv) > 1 else 256
    with tempfile.TemporaryDirectory(prefix="stj-transport-") as tmp:
        d = pathlib.Path(tmp)
        common = setup(d)
        src, dst = f"/dev/shm/stj-transport-{os.getpid()}", f"/dev/shm/stj-tdst-{os.getpid()}"
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        transports = {
            "pipe": ["-o", f"ProxyCommand={SSHD} -i -e -f {d}/sshd_config"],
            "tcp": [
                *("-o", f"ProxyCommand={sys.executable} {d}/fdproxy.py {SSHD} {d}/sshd_config"),
                *("-o", "ProxyUseFdpass=yes"),
            ],
        }
        cases: dict[str, Callable[[list[str]], list[str]]] = {
            "scp down": lambda t: ["scp", *common, *t, f"floor:{src}", dst],
            "cat down": lambda t: ["ssh", *common, *t, "floor", f"cat {src}"],
        }
        rates: dict[tuple[str, str, str], list[float]] = {}
        try:
            for _ in range(rounds):
                for pin in ("2 cores", "one core"):
                    for cname, make in cases.items():
                        for tname, t in transports.items():
                            cmd = make(t)
                            if pin == "one core":
                                cmd = ["taskset", "-c", "0", *cmd]
                            t0 = time.perf_counter()
                            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
                            wall = time.perf_counter() - t0
                            rates.setdefault((pin, cname, tname), []).append(mib / wall)
        finally:
            for p in (src, dst):
                pathlib.Path(p).unlink(missing_ok=True)
    print(f"1-min load at the end: {os.getloadavg()[0]:.2f}; {mib} MiB, {rounds} rounds")
    for pin in ("2 cores", "one core"):
        for cname in cases:
            pipe, tcp = rates[(pin, cname, "pipe")], rates[(pin, cname, "tcp")]
            ratios = [b / a for a, b in zip(pipe, tcp, strict=True)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            print(
                f"{pin}, {cname}: pipe {statistics.median(pipe):.0f} MiB/s, tcp "
                f"{statistics.median(tcp):.0f} MiB/s; tcp/pipe {statistics.median(ratios):.2f} "
                f"[{q[0]:.2f}-{q[2]:.2f}] n={len(ratios)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
