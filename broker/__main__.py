"""``python -m ssh_to_job.broker``: run the broker (``stj broker`` execs this)."""

from __future__ import annotations

import argparse
import sys

import attrs

from ssh_to_job import common


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stj broker", description="run the ssh-to-job broker")
    common.add_pool_flags(ap)
    ap.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"where the TLS port for starters listens (default 127.0.0.1:{common.DEFAULT_PORT}; "
        "[broker] listen in the config)",
    )
    ap.add_argument("--port", type=int, help="TCP port for starters (0: any free port)")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    try:
        config, state = common.config_and_state(a)
        if a.port is not None:
            config = attrs.evolve(config, broker=attrs.evolve(config.broker, port=a.port))
        if a.listen is not None:
            config = attrs.evolve(config, broker=attrs.evolve(config.broker, listen=a.listen))
    except (common.ConfigError, ValueError) as exc:
        print(f"stj broker: config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stj broker: {exc}", file=sys.stderr)
        return 1
    import trio

    from ._queue import QueueVersionError
    from ._server import Broker, StateDirBusy, raise_nofile_limit

    try:
        common.setup_logging(a.debug, config.broker.log_file)
    except OSError as exc:
        print(f"stj broker: cannot open the log file: {exc}", file=sys.stderr)
        return 1
    raise_nofile_limit()
    try:
        broker = Broker(state, config)
    except (StateDirBusy, QueueVersionError, ValueError, OSError) as exc:
        print(f"stj broker: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(broker.serve)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
