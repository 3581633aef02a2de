"""ssh-to-job: brokered ssh into running batch jobs, with real OpenSSH.

The installed package is this one namespace. Its parts live in the repository's top-level
folders and are mapped here at install time (see pyproject.toml); the symlinks beside this
file give the same layout to type checkers and to a developer's interpreter. Which part may
import which is written once, in ``tests/test_boundaries.py``, and drawn in
docs/architecture.md:

- ``ssh_to_job.wire``: the protocol, sans-IO (frames, messages, states, capabilities).
- ``ssh_to_job.common``: what every process shares and that needs no trio (config, key files,
  logging, state directories).
- ``ssh_to_job.transport``: the trio adapter the daemons share (framed streams, bounded
  outboxes, the one place OS errors are translated). No client imports it.
- ``ssh_to_job.broker``, ``ssh_to_job.starter``: the daemons, each with its own entry point
  (``python -m ssh_to_job.broker``, ``python -m ssh_to_job.starter``).
- ``ssh_to_job.client``: ``ssh-to-job`` and ``stj``; never imports a daemon.
- ``ssh_to_job.preload``: the LD_PRELOAD shim and its Python checks.
"""

__version__ = "0.2.0"
