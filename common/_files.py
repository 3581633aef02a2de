"""Key files and private directories, laid out the same way by every component.

Secrets live in files created 0600 (never chmod-ed down after the fact) inside directories
created 0700; public halves are plain hex files. Nothing here puts a secret on a command line
or in the environment.
"""

from __future__ import annotations

import os
import pathlib
import stat

from ssh_to_job.wire import new_signing_key, public_key_of


def private_dir(path: pathlib.Path, uid: int = -1, gid: int = -1) -> pathlib.Path:
    """Create ``path`` 0700 (or check an existing one is ours and private)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid)
    return path


def write_private(path: pathlib.Path, data: bytes, uid: int = -1, gid: int = -1) -> None:
    """Write ``data`` to a new 0600 file (replacing any old one atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def load_or_create_key(path: pathlib.Path) -> bytes:
    """An Ed25519 seed kept 0600; created on first use. Returns the 32-byte seed."""
    private_dir(path.parent)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        seed = new_signing_key()
        write_private(path, seed.hex().encode() + b"\n")
        return seed
    if st.st_mode & 0o077:
        raise PermissionError(f"key file {path} is readable by others; it must be 0600")
    return bytes.fromhex(path.read_text().strip())


def read_public_key(path: pathlib.Path) -> bytes:
    text = path.read_text().strip()
    key = bytes.fromhex(text)
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a 32-byte Ed25519 public key")
    return key


def public_hex(seed: bytes) -> str:
    return public_key_of(seed).hex()
