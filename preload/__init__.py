"""The ssh-to-job LD_PRELOAD shim: its configuration protocol and its install checks.

``libstjshim.so`` (built from ``stjshim.c`` when the package is installed) is preloaded into
the ``sshd -i`` that the starter runs as a job's uid. It answers ``getpwnam``/``getpwuid``
(and the ``_r`` variants) for that uid with an entry the starter supplies over an inherited
socket, and can hide the ``tty`` group; see docs/shim.md. This package holds the Python half:
the configuration record and its wire form, the ack parser, a blocking handshake helper, and
:func:`check_shim`, which opens the library in cffi's ABI mode to prove it is fit to preload.
"""

from ssh_to_job.preload._library import LIBRARY_NAME, SYMBOLS, check_shim, shim_path
from ssh_to_job.preload._protocol import (
    ACK_MAX,
    CONFIG_MAX,
    ENV_FD,
    GO,
    NOT_LOADED,
    ShimConfig,
    ShimError,
    ShimHandshake,
    encode_config,
    parse_ack,
    run_handshake,
)

__all__ = [
    "ACK_MAX",
    "CONFIG_MAX",
    "ENV_FD",
    "GO",
    "LIBRARY_NAME",
    "NOT_LOADED",
    "SYMBOLS",
    "ShimConfig",
    "ShimError",
    "ShimHandshake",
    "check_shim",
    "encode_config",
    "parse_ack",
    "run_handshake",
    "shim_path",
]
