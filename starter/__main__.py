"""``python -m ssh_to_job.starter``: run a starter (``stj starter`` execs this)."""

from __future__ import annotations

import argparse
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
    ap.add_argument("--print-key", action="store_true", help="print this starter's public key")
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
    import trio

    from ._daemon import Starter

    common.setup_logging(a.debug)
    try:
        trio.run(Starter(state, config, debug=a.debug).serve)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
