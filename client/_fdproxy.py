"""ProxyCommand helper: fetch the session socket from ssh-to-job and hand it to ssh.

ssh runs this (``ProxyUseFdpass yes``) with the name of ssh-to-job's one-shot abstract unix
socket. We receive the already-verified session socket (SCM_RIGHTS), pass it to ssh on our
stdout (SCM_RIGHTS again) and exit: from then on ssh talks to sshd over it directly.

Run as ``python -I -S _fdproxy.py NAME``: it imports only the standard library so that it
starts in a few milliseconds, and it must never read or write a byte of the session itself.
"""

import os
import select
import socket
import sys


def _ssh_gone() -> bool:
    """Whether the ssh that ran us is gone (its end of our stdout closed): ssh-to-job stops
    an ssh it started ahead of a session that then failed, and nobody is left to tell."""
    p = select.poll()
    p.register(1, select.POLLOUT)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, ev in p.poll(0))


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write("ssh-to-job proxy: expected one argument\n")
        return 2
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect("\0" + sys.argv[1])
        _msg, fds, _flags, _addr = socket.recv_fds(s, 1, 1)
    except OSError as exc:
        if not _ssh_gone():
            sys.stderr.write(f"ssh-to-job proxy: could not get the session socket: {exc}\n")
        return 1
    if not fds:
        if not _ssh_gone():
            sys.stderr.write("ssh-to-job proxy: ssh-to-job sent no socket\n")
        return 1
    out = socket.socket(fileno=os.dup(1))
    socket.send_fds(out, [b"\0"], fds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
