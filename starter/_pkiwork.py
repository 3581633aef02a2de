"""The starter's certificate work, done in a short-lived child process.

Parsing and checking X.509 certificates needs ``cryptography``, whose Rust library stays in a
process's memory once imported: about 9 MB of a starter's resident set (the whole starter idles
at ~32 MB without it). A starter needs that work only when it joins a pool, when it starts
(load or issue its certificate) and when it renews its certificate, so :func:`call` runs it
in a child
(``python -P -m ssh_to_job.starter._pkiwork``) that reads one JSON request on its standard
input and writes one JSON reply on its standard output. Key material goes over those pipes
only, never on a command line or in the environment, and is written 0600 by the child as
before (``common.write_leaf``).

Requests (``op``):

- ``load``: the enrolled identity in ``pki_dir``; issued first from the broker's CA in
  ``ca_dir`` when that CA is readable here (a personal pool) and there is none, or when
  ``want_name`` differs from the certificate's. Reply: ``name``, ``pool_id``,
  ``ca_file``/``cert_file``/``key_file``, ``not_before``/``not_after`` (epoch seconds), and
  ``logs`` ([level, message] pairs for the starter's log); or ``error`` (the starter's exit
  message).
- ``new_key``: a new Ed25519 key for a renewal: ``key_pem`` (PKCS#8) and ``public_pem``.
- ``renewed``: check ``certificate`` (PEM) against the pool CA, the starter's name and
  ``key_pem``, and store both. Reply: ``serial``, ``not_before``, ``not_after``; or ``error``.
- ``join``: enrol with the broker at ``address`` using the join ``token`` (``_enroll.join``),
  as ``name``, into ``pki_dir``, within ``within`` seconds. Reply: ``pool_id`` and ``name``;
  or ``error`` (why the join was refused or failed).

Must never: write a key or certificate that did not verify; print anything but the reply on
standard output.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

from ssh_to_job.wire import ROLE_STARTER

#: At most this many bytes of request (a certificate and a key are a few hundred).
MAX_REQUEST = 64 * 1024
#: Seconds a child may take (importing cryptography and one issue or check take ~0.2 s).
CHILD_TIMEOUT = 60.0
#: A certificate is renewed once less than this share of its life is left: ``common``'s
#: ``RENEW_FRACTION``, which cannot be imported here without cryptography (a test pins both).
RENEW_FRACTION = 1 / 3


class PkiWorkError(Exception):
    """The child failed in a way that is not a refusal (it crashed, or said nothing usable)."""


def call(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request in a child; its reply (which may hold ``error``)."""
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "ssh_to_job.starter._pkiwork"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=CHILD_TIMEOUT,
            check=False,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PkiWorkError(f"the certificate helper did not run: {exc}") from None
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        reply = None
    if done.returncode != 0 or not isinstance(reply, dict):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise PkiWorkError(
            f"the certificate helper failed (exit {done.returncode}): {' / '.join(tail)}"
        )
    return reply


def due(not_before: float, not_after: float, now: float) -> bool:
    """True once less than ``RENEW_FRACTION`` of a certificate's life is left."""
    return not_after - now < (not_after - not_before) * RENEW_FRACTION


# ----------------------------------------------------------------------------- in the child


def _times(cert: Any) -> dict[str, float]:
    return {
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
    }


def _issue_locally(
    common: Any, pki_dir: pathlib.Path, ca_dir: pathlib.Path, name: str, cert_days: int
) -> tuple[bool, list[list[str]]]:
    """Issue our certificate with the broker's CA if we can read it (same state dir)."""
    if not (ca_dir / common.CA_KEY).exists():
        return False, []
    try:
        ca = common.PoolCA.load(ca_dir)
        cas = common.load_ca_bundle(ca_dir / common.CA_CERT)
        broker_pki = common.BrokerPki(
            ca_dir, ca, common.RevocationList(ca_dir / common.REVOKED), cert_days
        )
        key = common.new_private_key()
        cert = broker_pki.issue(ROLE_STARTER, name, key.public_key())
        if pki_dir.resolve() == ca_dir.resolve():
            # The CA bundle is the broker's own file: leave it as it is.
            common.write_leaf(pki_dir, common.STARTER_KEY, common.STARTER_CERT, key, cert)
        else:
            common.StarterPki.save(pki_dir, key, cert, cas)
    except (common.PkiError, OSError) as exc:
        return False, [["warning", f"cannot issue a certificate from {ca_dir}: {exc}"]]
    return True, [
        ["info", f"issued this starter's certificate ({name}) from the pool CA in {ca_dir}"]
    ]


def _load(request: dict[str, Any]) -> dict[str, Any]:
    from ssh_to_job import common

    pki_dir = pathlib.Path(request["pki_dir"])
    ca_dir = pathlib.Path(request["ca_dir"])
    want, name, days = str(request["want_name"]), str(request["name"]), int(request["cert_days"])
    logs: list[list[str]] = []
    try:
        pki = common.StarterPki.load(pki_dir)
    except common.PkiError as exc:
        issued, said = _issue_locally(common, pki_dir, ca_dir, name, days)
        logs += said
        if not issued:
            return {
                "error": f"starter: not enrolled in a pool ({exc}); on this host run "
                "'stj starter --join BROKER:PORT --token TOKEN' with a token from "
                "'stj token create' on the broker host",
                "logs": logs,
            }
        pki = common.StarterPki.load(pki_dir)
    if want and want != pki.name:
        # A personal pool whose starter was renamed: its own CA vouches for the new name.
        issued, said = _issue_locally(common, pki_dir, ca_dir, want, days)
        logs += said
        if issued:
            pki = common.StarterPki.load(pki_dir)
    if want and want != pki.name:
        return {
            "error": f"starter: [starter] name is {want!r} but this host's certificate is for "
            f"{pki.name!r}; enrol again to change the name",
            "logs": logs,
        }
    return {
        "name": pki.name,
        "pool_id": pki.pool_id,
        "directory": str(pki.directory),
        "ca_file": str(pki.ca_file),
        "cert_file": str(pki.cert_file),
        "key_file": str(pki.key_file),
        "logs": logs,
        **_times(common.load_cert(pki.cert_file)),
    }


def _new_key() -> dict[str, Any]:
    from ssh_to_job import common

    key = common.new_private_key()
    return {
        "key_pem": common.private_key_pem(key).decode(),
        "public_pem": common.public_key_pem(key.public_key()),
    }


def _renewed(request: dict[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from ssh_to_job import common

    directory = pathlib.Path(request["directory"])
    try:
        key = serialization.load_pem_private_key(request["key_pem"].encode(), password=None)
        cert = common.parse_cert(request["certificate"])
        cas = common.load_ca_bundle(directory / common.CA_CERT)
        common.verify_leaf(
            cert, cas, pool_id=request["pool_id"], role=ROLE_STARTER, name=request["name"]
        )
        if common.public_key_pem(cert.public_key()) != common.public_key_pem(key.public_key()):  # type: ignore[arg-type]
            raise common.PkiError("the renewed certificate is not for our new key")
    except (common.PkiError, ValueError, TypeError) as exc:
        return {"error": str(exc)}
    common.write_leaf(directory, common.STARTER_KEY, common.STARTER_CERT, key, cert)  # type: ignore[arg-type]
    return {"serial": cert.serial_number, **_times(cert)}


def _join(request: dict[str, Any]) -> dict[str, Any]:
    import trio

    from ._enroll import JoinFailed, join

    try:
        pki = trio.run(
            join,
            str(request["address"]),
            str(request["token"]),
            str(request["name"]),
            pathlib.Path(request["pki_dir"]),
            float(request["within"]),
        )
    except JoinFailed as exc:
        return {"error": str(exc)}
    return {"pool_id": pki.pool_id, "name": pki.name}


def main() -> int:
    raw = sys.stdin.buffer.read(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        print("request too large", file=sys.stderr)
        return 2
    request = json.loads(raw)
    op = request.get("op")
    if op == "load":
        reply = _load(request)
    elif op == "new_key":
        reply = _new_key()
    elif op == "renewed":
        reply = _renewed(request)
    elif op == "join":
        reply = _join(request)
    else:
        print(f"unknown request {op!r}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
