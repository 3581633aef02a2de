"""The client's in-process ed25519 keys are exactly what OpenSSH reads and writes."""

from __future__ import annotations

import pathlib
import subprocess

from ssh_to_job.wire import ed25519_keypair


def test_ssh_keygen_reads_our_private_key(tmp_path: pathlib.Path) -> None:
    """ssh-keygen -y derives, from our private key file, exactly our public line."""
    for _ in range(5):
        private, public = ed25519_keypair()
        key = tmp_path / "id"
        key.unlink(missing_ok=True)
        key.write_bytes(private)
        key.chmod(0o600)
        derived = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert derived[:2] == public.split()
        assert public.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI")


def test_keys_are_fresh() -> None:
    """Two calls never give the same key."""
    assert ed25519_keypair()[1] != ed25519_keypair()[1]
