"""What the CLI and both daemons share, with no trio and no networking.

Config loading (one TOML file into frozen objects), state directories, key files (0600 in
0700 directories, never a secret on a command line or in the environment) and logging set-up.
Anything here may be imported by every part, so it must stay small and import nothing heavy.
"""

from typing import TYPE_CHECKING, Any

from ._config import (
    ENV_CONFIG,
    ENV_STATE_DIR,
    SYSTEM_STATE_DIR,
    BrokerConfig,
    ConfigError,
    PoolConfig,
    StarterConfig,
    default_state_dir,
    load_config,
    parse_config,
    state_dir_for,
)

if TYPE_CHECKING:
    from ._cli import add_pool_flags, config_and_state
    from ._files import (
        load_or_create_key,
        private_dir,
        public_hex,
        read_public_key,
        write_private,
        write_public,
    )
    from ._logging import setup_logging

# Loaded on first use: ssh-to-job's session path needs only the config, and must not pay for
# argparse and logging at start-up (tests/test_client_imports.py pins what it imports).
_LAZY = {
    "add_pool_flags": "_cli",
    "config_and_state": "_cli",
    "load_or_create_key": "_files",
    "private_dir": "_files",
    "public_hex": "_files",
    "read_public_key": "_files",
    "write_private": "_files",
    "write_public": "_files",
    "setup_logging": "_logging",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ssh_to_job.common' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ENV_CONFIG",
    "ENV_STATE_DIR",
    "SYSTEM_STATE_DIR",
    "BrokerConfig",
    "ConfigError",
    "PoolConfig",
    "StarterConfig",
    "add_pool_flags",
    "config_and_state",
    "default_state_dir",
    "load_config",
    "load_or_create_key",
    "parse_config",
    "private_dir",
    "public_hex",
    "read_public_key",
    "setup_logging",
    "state_dir_for",
    "write_private",
    "write_public",
]
