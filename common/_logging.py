"""Logging set-up for the daemons: one line per record on stderr, journald-friendly."""

from __future__ import annotations

import logging
import sys


def setup_logging(debug: bool = False) -> None:
    """Plain lines on stderr; under systemd, journald adds the time and the unit itself."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
