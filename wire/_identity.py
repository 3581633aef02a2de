"""Who a pool certificate names: ``stj://<pool-id>/<role>/<name>``, parsed and built, no I/O.

Every certificate the pool's CA issues carries exactly one URI subject alternative name of this
form, and every TLS connection checks it: the role (a starter may not act as the broker), the
name (the starter it claims to be) and the pool id. The pool id is what makes a certificate of
one pool useless in another even if an admin ever reused a CA: each side refuses a peer whose
pool id is not its own. The grammar is deliberately narrow (no percent-encoding, no dots in a
pool id) so there is exactly one spelling of each identity and nothing to normalise.

This lives in ``wire`` because both the stdlib-only TLS layer (``transport``, which reads the
peer's certificate as ``ssl`` decodes it) and the CA (``common``, which writes it with
``cryptography``) must agree on it byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import attrs

SCHEME: Final = "stj"
ROLE_BROKER: Final = "broker"
ROLE_STARTER: Final = "starter"
ROLE_CLIENT: Final = "client"
ROLES: Final = frozenset({ROLE_BROKER, ROLE_STARTER, ROLE_CLIENT})

#: A pool id: a DNS-label-like token, lowercase, so it can sit in a URI authority unescaped.
POOL_ID_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: A starter, broker or user name: host and user names fit; nothing that would need escaping.
PEER_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_URI_RE: Final = re.compile(r"stj://([^/]*)/([^/]*)/([^/]*)")


def _check(
    regex: re.Pattern[str], what: str
) -> Callable[[object, attrs.Attribute[str], str], None]:
    def check(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"{what} {value!r} is not valid (allowed: {regex.pattern})")

    return check


def _check_role(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in ROLES:
        raise ValueError(f"role {value!r} is not one of {', '.join(sorted(ROLES))}")


@attrs.frozen
class PeerName:
    """The identity one pool certificate names: pool, role and name (no serial: see transport)."""

    pool_id: str = attrs.field(validator=_check(POOL_ID_RE, "pool id"))
    role: str = attrs.field(validator=_check_role)
    name: str = attrs.field(validator=_check(PEER_NAME_RE, "name"))

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.pool_id}/{self.role}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse_peer_uri(uri: str) -> PeerName:
    """The ``PeerName`` of a ``stj://pool/role/name`` URI; ``ValueError`` for anything else."""
    m = _URI_RE.fullmatch(uri) if isinstance(uri, str) else None
    if m is None:
        raise ValueError(f"{uri!r} is not a stj://<pool>/<role>/<name> identity")
    return PeerName(m[1], m[2], m[3])


def check_pool_id(pool_id: str) -> str:
    """``pool_id`` itself if it is a valid pool id, else ``ValueError`` saying why."""
    if not isinstance(pool_id, str) or not POOL_ID_RE.fullmatch(pool_id):
        raise ValueError(f"pool id {pool_id!r} is not valid (allowed: {POOL_ID_RE.pattern})")
    return pool_id
