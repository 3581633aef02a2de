"""The ProxyCommand helpers hand the session socket from ssh-to-job to ssh, and nothing else."""

from __future__ import annotations

import os
import pathlib
import secrets
import socket
import subprocess
import sys

import pytest

from ssh_to_job import client

HERE = pathlib.Path(client.__file__).parent
HELPERS = {
    "c": [str(HERE / "stj-fdpass")],
    "python": [sys.executable, "-I", "-S", str(HERE / "_fdproxy.py")],
}


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_helper_passes_the_socket_on(kind: str) -> None:
    """The helper takes a socket from the abstract listener and gives ssh that same socket."""
    name = f"stj-test-{secrets.token_hex(8)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    ssh_end, helper_out = socket.socketpair()
    session_a, session_b = socket.socketpair()
    proc = subprocess.Popen([*HELPERS[kind], name], stdout=helper_out.fileno())
    helper_out.close()
    conn, _ = listener.accept()
    socket.send_fds(conn, [b"\0"], [session_a.fileno()])
    _msg, fds, _flags, _addr = socket.recv_fds(ssh_end, 1, 1)
    assert proc.wait(10) == 0
    assert len(fds) == 1
    with socket.socket(fileno=fds[0]) as got:
        got.sendall(b"through the passed socket")
        assert session_b.recv(100) == b"through the passed socket"
    for s in (conn, listener, ssh_end, session_a, session_b):
        s.close()


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_helper_fails_clearly_without_a_listener(kind: str) -> None:
    """With nothing to connect to, the helper says so and exits non-zero."""
    r = subprocess.run(
        [*HELPERS[kind], f"stj-none-{secrets.token_hex(8)}"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 1
    assert "ssh-to-job proxy" in r.stderr


def test_installed_client_uses_the_compiled_helper() -> None:
    """The installed package carries the compiled helper, and it is what the config names."""
    from ssh_to_job.client.ssh_to_job import ssh_config

    helper = HERE / "stj-fdpass"
    assert os.access(helper, os.X_OK)
    cfg = ssh_config(pathlib.Path("/tmp/x"), "u", "alias", "name", None, False)
    assert f"ProxyCommand {helper} name" in cfg
