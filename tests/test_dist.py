"""The files shipped in dist/ for running as services are consistent with the code."""

from __future__ import annotations

import configparser
import pathlib

import pytest

from ssh_to_job import common

DIST = pathlib.Path(__file__).resolve().parent.parent / "dist"


@pytest.mark.parametrize("name", ["broker.toml", "starter.toml"])
def test_example_configs_parse(name: str) -> None:
    """Every example config parses with common.parse_config (unknown keys would fail)."""
    config = common.parse_config((DIST / "config" / name).read_text())
    assert config.state_dir == "/var/lib/ssh-to-job"


def test_example_configs_set_what_a_multi_host_pool_needs() -> None:
    """The broker listens on every address at a fixed port; the starter dials that port."""
    broker = common.parse_config((DIST / "config" / "broker.toml").read_text()).broker
    starter = common.parse_config((DIST / "config" / "starter.toml").read_text()).starter
    assert broker.host == "0.0.0.0"
    assert broker.port != 0
    assert starter.broker.endswith(f":{broker.port}")
    assert "198.18.0.1" in broker.cert_hosts


@pytest.mark.parametrize(("unit", "module"), [("broker", "broker"), ("starter", "starter")])
def test_units_run_the_installed_module_with_their_config(unit: str, module: str) -> None:
    """Each unit starts ``python -P -m ssh_to_job.<part> --config /etc/ssh-to-job/<part>.toml``."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DIST / "systemd" / f"ssh-to-job-{unit}.service")
    argv = parser["Service"]["ExecStart"].split()
    assert argv == [
        "/opt/ssh-to-job/venv/bin/python",
        "-P",
        "-m",
        f"ssh_to_job.{module}",
        "--config",
        f"/etc/ssh-to-job/{unit}.toml",
    ]
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_starter_unit_keeps_what_uid_switching_and_cgroups_need() -> None:
    """The starter's hardening leaves it setuid/setgid and a delegated cgroup subtree."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(DIST / "systemd" / "ssh-to-job-starter.service")
    service = parser["Service"]
    caps = service["CapabilityBoundingSet"].split()
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"} <= set(caps)
    assert service["Delegate"] == "yes"
    assert "ProtectControlGroups" not in service
    assert "NoNewPrivileges" not in service
