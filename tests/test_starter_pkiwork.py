"""The starter's certificate work runs in a child, so the daemon never loads ``cryptography``.

``cryptography``'s Rust library stays resident once imported (~9 MB of a starter's idle RSS,
issue 12's ≤ 40 MB target). ``starter/_pkiwork.py`` does the loading, local issuing and renewal
checks in a short-lived child over JSON on pipes. The renewal round trip itself is tested in
``test_starter_inprocess.py``; here: the real daemon's memory map, and the child's refusals.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import Pool, new_state_dir

from ssh_to_job import common, wire
from ssh_to_job.starter import _pkiwork


def test_a_running_starter_has_its_certificate_without_cryptography(pool: Pool) -> None:
    """A pool's starter is connected with a certificate issued at its start, and neither the
    ``cryptography`` package nor its Rust library is mapped in the daemon. (And the pool's
    supervisor, ``stj pool``, runs isolated through the compiled ``stj`` front.)"""
    (starter,) = pool.pids("starter")
    maps = pathlib.Path(f"/proc/{starter}/maps").read_text()
    assert "site-packages/ssh_to_job/starter" in maps  # our spawner library: the right process
    assert "cryptography" not in maps
    cert = common.load_cert(pool.state / "pki" / common.STARTER_CERT)
    assert common.identity_of(cert).role == wire.ROLE_STARTER
    assert "connected to broker" in pool.log_text()
    # The pool's supervisor is `stj pool` through the compiled stj front: Python, isolated,
    # named "stj" as the script was (client/_boot.py).
    assert pool.proc is not None
    supervisor = pathlib.Path(f"/proc/{pool.proc.pid}")
    assert (supervisor / "comm").read_text() == "stj\n"
    assert b"\0-I\0-S\0" in (supervisor / "cmdline").read_bytes()


def test_a_renewed_certificate_for_another_key_is_refused_and_nothing_is_written() -> None:
    """The child checks a renewed certificate against the key it was asked for: a certificate
    of the pool for another key is refused and the stored key and certificate stay."""
    state = new_state_dir()
    try:
        pki_dir = state / "pki"
        broker = common.BrokerPki.open(pki_dir)
        loaded = _pkiwork.call(
            {
                "op": "load",
                "pki_dir": str(pki_dir),
                "ca_dir": str(pki_dir),
                "want_name": "",
                "name": "st9",
                "cert_days": 30,
            }
        )
        assert loaded["name"] == "st9"
        assert _pkiwork.RENEW_FRACTION == common.RENEW_FRACTION
        assert not _pkiwork.due(loaded["not_before"], loaded["not_after"], loaded["not_before"])
        assert _pkiwork.due(loaded["not_before"], loaded["not_after"], loaded["not_after"] - 1)
        before = {p: (pki_dir / p).read_bytes() for p in ("starter.key", "starter.crt")}
        asked = _pkiwork.call({"op": "new_key"})
        other = common.new_private_key()
        cert = broker.issue(wire.ROLE_STARTER, "st9", other.public_key())
        reply = _pkiwork.call(
            {
                "op": "renewed",
                "directory": str(pki_dir),
                "pool_id": loaded["pool_id"],
                "name": "st9",
                "certificate": common.cert_pem(cert).decode(),
                "key_pem": asked["key_pem"],
            }
        )
        assert reply == {"error": "the renewed certificate is not for our new key"}
        assert {p: (pki_dir / p).read_bytes() for p in before} == before
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_without_a_ca_or_enrolment_the_child_says_how_to_join() -> None:
    state = new_state_dir()
    try:
        reply = _pkiwork.call(
            {
                "op": "load",
                "pki_dir": str(state / "pki"),
                "ca_dir": str(state / "pki"),
                "want_name": "",
                "name": "st9",
                "cert_days": 30,
            }
        )
        assert "stj starter --join BROKER:PORT --token TOKEN" in reply["error"]
        assert not (state / "pki").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_an_oversized_or_unknown_request_is_an_error() -> None:
    child = [sys.executable, "-P", "-m", "ssh_to_job.starter._pkiwork"]
    big = json.dumps({"op": "load", "pad": "x" * _pkiwork.MAX_REQUEST}).encode()
    done = subprocess.run(child, input=big, capture_output=True, check=False)
    assert done.returncode == 2
    assert done.stdout == b""
    assert b"request too large" in done.stderr
    with pytest.raises(_pkiwork.PkiWorkError, match=r"exit 2.*unknown request 'steal'"):
        _pkiwork.call({"op": "steal"})
