"""The floor over loopback TCP: one plain ``sshd -i`` on one end of a TCP connection, and the
wrapped command's ssh on the other (``ProxyUseFdpass`` through the product's ``stj-fdpass``).

ssh-to-job's session is a TCP connection (the starter dials the broker, even on one host), and
the pipe floor (``ProxyCommand sshd -i``) never crosses a socket; this floor has ssh-to-job's
transport and nothing else of it. Usage, as the bench user::

    python3 tcp_floor.py SSHD_CONFIG SSHD_LOG -- scp -F ssh_config_tcp floor:src dst

``ssh_config_tcp`` says ``ProxyCommand <stj-fdpass> "$STJB_TCP_NAME"`` and
``ProxyUseFdpass yes``; we set the variable to an abstract socket name of our own, hand the
connection's other end to the helper with ssh-to-job's own ``client.ssh_to_job.hand_over``,
and exit with the command's status once it and sshd are done.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

SSHD = "/usr/sbin/sshd"


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: tcp_floor.py SSHD_CONFIG SSHD_LOG -- COMMAND...", file=sys.stderr)
        return 2
    sshd_config, log, command = argv[0], argv[1], argv[3:]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.create_connection(listener.getsockname(), timeout=10)
        theirs, _ = listener.accept()
    ours.settimeout(None)
    name = f"stjb-tcp-{secrets.token_hex(8)}"
    rendezvous = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rendezvous.bind("\0" + name)
    rendezvous.listen(1)
    with open(log, "ab") as err:
        sshd = subprocess.Popen(
            [SSHD, "-i", "-e", "-f", sshd_config],
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=err,
        )
    theirs.close()
    child = subprocess.Popen(command, env={**os.environ, "STJB_TCP_NAME": name})
    # Imported while ssh starts, so that it adds nothing to the floor's set-up.
    from ssh_to_job.client.ssh_to_job import hand_over

    try:
        # The product's own hand-over: to our uid only, and over as soon as ssh is gone.
        if not hand_over(rendezvous, ours, child):
            print("tcp_floor: no ssh came for the connection", file=sys.stderr)
    finally:
        rendezvous.close()
        ours.close()
    rc = child.wait()
    try:
        sshd.wait(timeout=30)
    except subprocess.TimeoutExpired:
        sshd.kill()
        sshd.wait()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
