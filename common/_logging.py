"""Logging set-up for the daemons: one line per record, on stderr or in a file.

On stderr (the default) the lines suit journald, which adds its own time stamp and unit; with
``log_file`` set in the config they are appended to that file (created 0640), one line per
record with the time, for hosts without a journal.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(debug: bool = False, log_file: str = "") -> None:
    """Log to stderr, or append to ``log_file`` if one is given (OSError if it cannot be)."""
    level = logging.DEBUG if debug else logging.INFO
    if not log_file:
        logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr)
        return
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace")
    logging.basicConfig(level=level, format=FORMAT, stream=stream)
