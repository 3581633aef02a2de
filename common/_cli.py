"""Command-line pieces the daemons' entry points and ``stj`` share (no trio, no daemon code)."""

from __future__ import annotations

import argparse
import pathlib

from ._config import PoolConfig, load_config, state_dir_for


def add_pool_flags(p: argparse.ArgumentParser) -> None:
    """``--state-dir`` and ``--config``: where a pool lives and how it is configured."""
    p.add_argument(
        "--state-dir",
        help="pool state directory (default: $STJ_STATE_DIR, the config's, or your personal one)",
    )
    p.add_argument(
        "--config", help="config file (default: $STJ_CONFIG or /etc/ssh-to-job/config.toml)"
    )


def config_and_state(args: argparse.Namespace) -> tuple[PoolConfig, pathlib.Path]:
    """The config file and the state directory the flags name (the directory is created)."""
    config = load_config(args.config)
    state = state_dir_for(args.state_dir, config)
    state.mkdir(parents=True, exist_ok=True, mode=0o755)
    return config, state
