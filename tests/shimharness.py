"""Run a program as a bare uid with the installed shim preloaded and configured.

Used by tests/test_preload.py in two ways:

* imported, :func:`start` / :func:`spawn` run a program (``getent``, ``sshd``) as a uid with
  ``LD_PRELOAD`` set only for that program (never for ``setpriv``: preloaded there, the shim
  would make setpriv resolve the target uid to uid 0), passing it one end of a socketpair;
* as a script, it is an ssh ``ProxyCommand``: its stdin/stdout (the pipes from ssh) become
  ``sshd -i``'s fd 0/1, and it performs the shim handshake and sends GO, the way the starter
  does on a job's execute host::

      python shimharness.py --uid 61001 --gid 61001 --name job --home /h --shell /bin/sh \\
          -- /usr/sbin/sshd -i -e -f /path/sshd_config

It imports the installed ``preload`` package, like the tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ssh_to_job import preload

CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}

HANDSHAKE_TIMEOUT = 10.0


def setpriv(uid: int, gid: int) -> list[str]:
    """The argv prefix that switches to ``uid``/``gid`` with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def start(
    argv: Sequence[str],
    *,
    uid: int,
    gid: int,
    shim: Path,
    fd_value: str | None = None,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start ``argv`` as uid/gid with the shim preloaded; return it and our socket end.

    ``SSH_TO_JOB_SHIM_FD`` is the number of the child's socket end, or ``fd_value`` if given
    (to test how the shim treats a bad value). No handshake is done here.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        value = str(theirs.fileno()) if fd_value is None else fd_value
        full = [
            *setpriv(uid, gid),
            "env",
            f"LD_PRELOAD={shim}",
            f"{preload.ENV_FD}={value}",
            *argv,
        ]
        proc = subprocess.Popen(
            full,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=CLEAN_ENV,
            pass_fds=(theirs.fileno(),),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


def spawn(
    argv: Sequence[str],
    cfg: preload.ShimConfig,
    *,
    shim: Path,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``cfg.uid``/``cfg.gid``, configure the shim, check it, send GO."""
    proc, sock = start(
        argv, uid=cfg.uid, gid=cfg.gid, shim=shim, stdin=stdin, stdout=stdout, stderr=stderr
    )
    with sock:
        try:
            pid = preload.run_handshake(sock, cfg, HANDSHAKE_TIMEOUT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        # setpriv and env exec, so the shimmed program is the process we started.
        if pid != proc.pid:
            proc.kill()
            proc.wait()
            raise preload.ShimError(f"the shim answered from pid {pid}, expected {proc.pid}")
        sock.sendall(preload.GO)
    return proc


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--shell", default="/bin/sh")
    parser.add_argument("--gecos", default="")
    parser.add_argument("--show-tty-group", action="store_true", help="hide_tty_group=0")
    parser.add_argument("--no-shim", action="store_true", help="run the program without it")
    parser.add_argument("argv", nargs="+", help="the program, e.g. /usr/sbin/sshd -i ...")
    ns = parser.parse_args(args)

    if ns.no_shim:
        # The control case: same uid switch, no LD_PRELOAD.
        cmd = [*setpriv(ns.uid, ns.gid), *ns.argv]
        return subprocess.run(cmd, env=CLEAN_ENV, check=False).returncode

    cfg = preload.ShimConfig(
        uid=ns.uid,
        gid=ns.gid,
        name=ns.name,
        home=ns.home,
        shell=ns.shell,
        gecos=ns.gecos,
        hide_tty_group=not ns.show_tty_group,
    )
    try:
        # Our stdin/stdout (ssh's ProxyCommand pipes) are inherited as the program's fd 0/1.
        proc = spawn(ns.argv, cfg, shim=preload.check_shim())
    except preload.ShimError as e:
        print(f"shimharness: {e}", file=sys.stderr)
        return 1
    # The program owns the pipes now; keep none of our own copies open.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
