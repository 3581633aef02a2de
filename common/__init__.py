"""What the CLI and both daemons share, with no trio and no networking.

Config loading (one TOML file into frozen objects), state directories, key files (0600 in
0700 directories, never a secret on a command line or in the environment) and logging set-up.
Anything here may be imported by every part, so it must stay small and import nothing heavy.
"""

from ._cli import add_pool_flags, config_and_state
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
from ._files import (
    load_or_create_key,
    private_dir,
    public_hex,
    read_public_key,
    write_private,
    write_public,
)
from ._logging import setup_logging

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
