"""Copying files in and out of a job as HTCondor users do: scp, sftp and rsync via ssh-to-job.

The real OpenSSH ``scp``/``sftp`` and ``rsync`` run as the job's owner on the client side; the
remote side is the job's scratch directory (the session's home), served by the real sshd.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SSH_TO_JOB, Pool, User

TIMEOUT = 60

#: A tree with awkward names; built on the remote side by ``_MAKE_TREE``.
_MAKE_TREE = """\
set -e
mkdir -p "out/sub dir" out/empty
printf 'one\\n' > "out/with space.txt"
printf 'two\\n' > "out/sub dir/it's here.txt"
head -c 300000 /dev/urandom > out/blob.bin
"""


@pytest.fixture(scope="module")
def job(pool: Pool, users: dict[str, User]) -> dict[str, Any]:
    """A running job of user a whose scratch dir holds the ``out/`` tree."""
    (jid,) = pool.submit(users["a"], "/bin/sleep", "3000")
    info = pool.wait_state(jid, "running")
    r = pool.ssh(users["a"], jid, _MAKE_TREE)
    assert r.returncode == 0, r.stderr
    return info


@pytest.fixture
def local(users: dict[str, User]) -> Iterator[pathlib.Path]:
    """An empty directory on the client side that user a owns (pytest's tmp_path is root's)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="stju-files-", dir="/tmp"))
    os.chown(d, users["a"].uid, users["a"].gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tree(root: pathlib.Path) -> dict[str, str]:
    """Relative path -> sha256 (or "dir") of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
    return out


def remote_tree(pool: Pool, user: User, job: str, path: str) -> dict[str, str]:
    """The same listing, taken inside the job (find + sha256sum, NUL-safe enough for our names)."""
    r = pool.ssh(
        user,
        job,
        f"cd {path} && find . -mindepth 1 -type d -printf 'dir  %P\\n' && "
        "find . -type f -printf '%P\\0' | xargs -0 -r sha256sum",
    )
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        digest, name = line.split("  ", 1)
        out[name.removeprefix("./")] = digest
    return out


def test_scp_both_directions(
    pool: Pool, users: dict[str, User], job: dict[str, Any], local: pathlib.Path
) -> None:
    """-ssh scp copies files and trees out of and into the job, names with spaces included."""
    a, jid = users["a"], job["id"]
    r = pool.run(
        a, [SSH_TO_JOB, "-ssh", "scp", jid, "remote:out/with space.txt", "."], cwd=str(local)
    )
    assert r.returncode == 0, r.stderr
    assert (local / "with space.txt").read_text() == "one\n"
    r = pool.run(a, [SSH_TO_JOB, "-ssh", "scp -r", jid, "remote:out", "copy"], cwd=str(local))
    assert r.returncode == 0, r.stderr
    assert tree(local / "copy") == remote_tree(pool, a, jid, "out")
    # Upload, and the legacy scp protocol (scp -O runs "scp -t" through the session's shell).
    (local / "up load.txt").write_text("uploaded\n")
    for ssh, dest in (("scp", "remote:in box.txt"), ("scp -O", "remote:legacy.txt")):
        r = pool.run(a, [SSH_TO_JOB, "-ssh", ssh, jid, "up load.txt", dest], cwd=str(local))
        assert r.returncode == 0, r.stderr
    r = pool.ssh(a, jid, 'cat "in box.txt" legacy.txt; stat -c %u legacy.txt')
    assert r.stdout == f"uploaded\nuploaded\n{a.uid}\n"
    # A missing remote file is scp's failure (status 1), reported by scp.
    r = pool.run(a, [SSH_TO_JOB, "-ssh", "scp", jid, "remote:no-such-file", "."], cwd=str(local))
    assert r.returncode == 1
    assert "no-such-file" in r.stderr


def test_sftp_batch(
    pool: Pool, users: dict[str, User], job: dict[str, Any], local: pathlib.Path
) -> None:
    """-ssh "sftp -b -" runs a batch from stdin (mkdir, put, get, ls); a failing one fails it."""
    a, jid = users["a"], job["id"]
    (local / "local file.txt").write_text("via sftp\n")
    batch = """\
mkdir sftpdir
put "local file.txt" "sftpdir/remote name.txt"
get "out/sub dir/it's here.txt" fetched.txt
ls -1 sftpdir
"""
    r = pool.run(a, [SSH_TO_JOB, "-ssh", "sftp -b -", jid], input=batch, cwd=str(local))
    assert r.returncode == 0, r.stderr
    assert "sftpdir/remote name.txt" in r.stdout
    assert (local / "fetched.txt").read_text() == "two\n"
    r = pool.ssh(a, jid, 'cat "sftpdir/remote name.txt"')
    assert r.stdout == "via sftp\n"
    # Plain "-ssh sftp" reads the same commands from a pipe; -b makes errors fatal (status 1).
    r = pool.run(a, [SSH_TO_JOB, "-ssh", "sftp", jid], input="ls -1 sftpdir\n", cwd=str(local))
    assert r.returncode == 0, r.stderr
    assert "sftpdir/remote name.txt" in r.stdout
    r = pool.run(
        a, [SSH_TO_JOB, "-ssh", "sftp -b -", jid], input="get no-such-file\n", cwd=str(local)
    )
    assert r.returncode == 1
    assert "no-such-file" in r.stderr


def test_rsync_both_directions(
    pool: Pool, users: dict[str, User], job: dict[str, Any], local: pathlib.Path
) -> None:
    """rsync -e ssh-to-job pulls a tree out of the job and pushes it back, odd names intact."""
    a, jid = users["a"], job["id"]
    r = pool.run(
        a,
        ["rsync", "-a", "-e", "ssh-to-job", f"{jid}:out/", "./got/"],
        cwd=str(local),
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    pulled = tree(local / "got")
    assert pulled == remote_tree(pool, a, jid, "out")
    assert {"with space.txt", "sub dir/it's here.txt", "empty"} <= set(pulled)
    (local / "got" / "new one.txt").write_text("pushed\n")
    r = pool.run(
        a,
        ["rsync", "-av", "-e", "ssh-to-job", "./got/", f"{jid}:back up/"],
        cwd=str(local),
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    assert "new one.txt" in r.stdout
    assert remote_tree(pool, a, jid, "'back up'") == tree(local / "got")
    # A second push transfers nothing: rsync's own protocol really runs on both ends.
    r = pool.run(
        a,
        ["rsync", "-a", "--stats", "-e", "ssh-to-job", "./got/", f"{jid}:back up/"],
        cwd=str(local),
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    assert "Number of regular files transferred: 0" in r.stdout


def test_large_file_sha256(
    pool: Pool, users: dict[str, User], job: dict[str, Any], local: pathlib.Path
) -> None:
    """A 200 MB file made in the job arrives through scp with the same sha256."""
    a, jid = users["a"], job["id"]
    r = pool.ssh(
        a, jid, "head -c 200M /dev/urandom > big.bin && sha256sum big.bin", timeout=TIMEOUT
    )
    assert r.returncode == 0, r.stderr
    remote_digest = r.stdout.split()[0]
    try:
        r = pool.run(
            a,
            [SSH_TO_JOB, "-ssh", "scp", jid, "remote:big.bin", "."],
            cwd=str(local),
            timeout=TIMEOUT,
        )
        assert r.returncode == 0, r.stderr
        h = hashlib.sha256()
        with open(local / "big.bin", "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert (local / "big.bin").stat().st_size == 200 << 20
        assert h.hexdigest() == remote_digest
    finally:
        pool.ssh(a, jid, "rm -f big.bin")
