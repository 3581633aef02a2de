"""``python -m ssh_to_job.starter``: run a starter (``stj starter`` execs this)."""

from __future__ import annotations

import argparse
import pathlib
import socket
import sys
from typing import Any

import attrs

from ssh_to_job import common


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="stj starter",
        description="run an ssh-to-job starter (it dials out to the broker and opens no port)",
    )
    common.add_pool_flags(ap)
    ap.add_argument("--broker", help="broker host:port")
    ap.add_argument("--starter-name")
    ap.add_argument("--slots", type=int, help="how many jobs run here at once")
    ap.add_argument(
        "--join",
        metavar="BROKER:PORT",
        help="join the pool of that broker with --token (from 'stj token create'), then run",
    )
    ap.add_argument("--token", help="the one-time join token for --join ('-': read it from stdin)")
    ap.add_argument("--print-key", action="store_true", help="print this starter's public key")
    ap.add_argument(
        "--slurm",
        action="store_true",
        help="run no jobs: serve sessions into the Slurm jobs on this node (docs/slurm.md)",
    )
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    try:
        config, state = common.config_and_state(a)
        changes: dict[str, Any] = {}
        if a.broker:
            changes["broker"] = a.broker
        if a.starter_name:
            changes["name"] = a.starter_name
        if a.slots is not None:
            changes["slots"] = a.slots
        if a.slurm:
            changes["backend"] = "slurm"
        config = attrs.evolve(config, starter=attrs.evolve(config.starter, **changes))
    except (common.ConfigError, ValueError) as exc:
        print(f"stj starter: config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stj starter: {exc}", file=sys.stderr)
        return 1
    if a.print_key:
        seed = common.load_or_create_key(state / "keys" / "starter.key")
        print(common.public_hex(seed))
        return 0
    if bool(a.join) != bool(a.token):
        print("stj starter: --join and --token go together", file=sys.stderr)
        return 2
    import trio

    from ._daemon import Starter

    try:
        common.setup_logging(a.debug, config.starter.log_file)
    except OSError as exc:
        print(f"stj starter: cannot open the log file: {exc}", file=sys.stderr)
        return 1
    if a.join:
        from . import _pkiwork

        cfg = config.starter
        pki_dir = pathlib.Path(cfg.pki_dir) if cfg.pki_dir else state / "pki"
        name = cfg.name or socket.gethostname()
        # The token is spent within a second, but '-' keeps it off the command line entirely.
        from_stdin = a.token == "-"  # noqa: S105 (the conventional "read it from stdin")
        token = sys.stdin.readline().strip() if from_stdin else a.token
        # In a child (as all of the starter's certificate work): the daemon below then never
        # loads cryptography. The token goes to it on a pipe.
        request = {
            "op": "join",
            "address": a.join,
            "token": token,
            "name": name,
            "pki_dir": str(pki_dir),
            "within": cfg.handshake_timeout,
        }
        try:
            joined = _pkiwork.call(request)
        except _pkiwork.PkiWorkError as exc:
            print(f"stj starter: {exc}", file=sys.stderr)
            return 1
        if "error" in joined:
            print(f"stj starter: join refused: {joined['error']}", file=sys.stderr)
            return 1
        # Later starts (and redials) find the broker here unless [starter] broker says else.
        common.write_public(state / "broker.addr", f"{a.join}\n".encode())
        print(f"stj starter: joined pool {joined['pool_id']} as {joined['name']}", file=sys.stderr)
    try:
        trio.run(Starter(state, config, debug=a.debug).serve)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
