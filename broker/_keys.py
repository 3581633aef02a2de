"""Registered client keys (``stj keys``) and the check of a remote client's signed request.

A user registers a key once, over the unix socket, where the kernel says who they are
(SO_PEERCRED): the key then stands for that uid on the TLS port, where nobody has a uid. Keys
live in this pool's queue (``client_keys``, schema v4), so a key registered in one pool means
nothing in another; a key belongs to one uid only (registering another user's key is refused).

A remote request is never a bearer secret: the client signs, with the registered key, the
pool id, a nonce the broker chose for this very TLS connection and the request itself
(``wire.remote_request_statement``). A replayed request meets another nonce and fails; a
signature made for another pool names another pool id. This module must never accept a
request whose signature it did not verify, and never let one uid touch another's keys.
"""

from __future__ import annotations

import sqlite3
import time

import attrs

from ssh_to_job import wire

from ._jobs import user_name

#: Longest comment kept with a key.
MAX_COMMENT = 200
#: Keys one uid may register.
MAX_KEYS_PER_UID = 100


@attrs.frozen
class Registered:
    """Who a verified remote request comes from."""

    uid: int
    fingerprint: str


class KeyBook:
    """The ``client_keys`` table of the pool's queue."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def add(self, uid: int, line: str, comment: str, user: str) -> wire.Message:
        """Register ``line`` for ``uid``: ``KeyAdded`` (also when it is already theirs), or an
        error saying why not (not an ed25519 line, someone else's key, too many keys)."""
        try:
            public = wire.ed25519_public_of(line)
        except ValueError as exc:
            return wire.Error("bad_key", f"{exc}; give the contents of a .pub file")
        words = line.strip().split()
        if not comment and len(words) > 2:
            comment = " ".join(words[2:])
        comment = "".join(c for c in comment if c.isprintable())[:MAX_COMMENT]
        key = wire.ed25519_line(public)
        fp = wire.ssh_fingerprint(key)
        with self.db:
            row = self.db.execute(
                "SELECT uid FROM client_keys WHERE fingerprint = ?", (fp,)
            ).fetchone()
            if row is not None and row[0] != uid:
                return wire.Error(
                    "key_taken",
                    f"key {fp} is already registered by another user; a key belongs to one "
                    "user: make your own (stj keys show on your laptop)",
                )
            if row is None:  # a new key: within the per-user limit
                (n,) = self.db.execute(
                    "SELECT count(*) FROM client_keys WHERE uid = ?", (uid,)
                ).fetchone()
                if n >= MAX_KEYS_PER_UID:
                    return wire.Error(
                        "too_many_keys",
                        f"you have {n} keys registered (the limit); remove one first",
                    )
            if row is not None:
                # Registered again: keep when it was added, and its comment unless a new one.
                if comment:
                    self.db.execute(
                        "UPDATE client_keys SET comment = ? WHERE fingerprint = ?", (comment, fp)
                    )
                return wire.KeyAdded(fingerprint=fp, pool_id="")
            self.db.execute(
                "INSERT INTO client_keys (fingerprint, uid, key, comment, added)"
                " VALUES (?, ?, ?, ?, ?)",
                (fp, uid, key, comment, time.time()),
            )
        return wire.KeyAdded(fingerprint=fp, pool_id="")

    def list(self, uid: int | None) -> list[wire.ClientKeyInfo]:
        """``uid``'s keys (every key for None: a superuser)."""
        sql = "SELECT fingerprint, key, uid, comment, added FROM client_keys"
        args: tuple[int, ...] = ()
        if uid is not None:
            sql += " WHERE uid = ?"
            args = (uid,)
        out = []
        for fp, key, owner, comment, added in self.db.execute(sql + " ORDER BY added", args):
            out.append(wire.ClientKeyInfo(fp, key, owner, user_name(owner), comment, added))
        return out

    def remove(self, uid: int, fingerprint: str, superuser: bool) -> wire.Message:
        with self.db:
            row = self.db.execute(
                "SELECT uid FROM client_keys WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is None or (row[0] != uid and not superuser):
                # The same answer for someone else's key: fingerprints are not to be probed.
                return wire.Error("unknown_key", f"you have no registered key {fingerprint}")
            self.db.execute("DELETE FROM client_keys WHERE fingerprint = ?", (fingerprint,))
        return wire.KeyRemoved(fingerprint=fingerprint)

    def verify(self, pool_id: str, nonce: bytes, msg: wire.RemoteSsh) -> Registered | wire.Error:
        """Who signed ``msg`` for this connection's ``nonce``; an error if nobody we know."""
        try:
            public = wire.ed25519_public_of(msg.key)
        except ValueError:
            return wire.Error("unknown_key", "the request names no ed25519 client key")
        fp = wire.ssh_fingerprint(wire.ed25519_line(public))
        row = self.db.execute("SELECT uid FROM client_keys WHERE fingerprint = ?", (fp,)).fetchone()
        if row is None:
            return wire.Error(
                "unknown_key",
                f"your client key {fp} is not registered in this pool; on a host of the pool "
                "run: stj keys add < client_ed25519.pub",
            )
        statement = wire.remote_request_statement(pool_id, nonce, msg.job, msg.client_key, msg.key)
        if not wire.verify(public, statement, msg.signature):
            return wire.Error(
                "bad_signature",
                "the request's signature does not verify for this connection (a replayed or "
                "forged request)",
            )
        return Registered(int(row[0]), fp)
