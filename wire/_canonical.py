"""The canonical encoding of everything signed, and its domains: no imports beyond ``struct``.

Everything signed is ``DOMAIN || field || field ...`` where each field is a 4-byte big-endian
length and its bytes, and DOMAIN names what the statement is (so a signature over one kind of
statement can never be replayed as another). It lives apart from ``_crypto`` so that the
client's lean session path (``lean``) builds the very same statements without loading attrs.
"""

from __future__ import annotations

import struct

CAP_DOMAIN = b"ssh-to-job capability v1\0"
HOSTKEY_DOMAIN = b"ssh-to-job host key v1\0"
REMOTE_DOMAIN = b"ssh-to-job remote request v1\0"

SIG_LEN = 64
KEY_LEN = 32

_LEN = struct.Struct(">I")


def canonical(domain: bytes, *fields: bytes | str | int) -> bytes:
    out = bytearray(domain)
    for f in fields:
        if isinstance(f, int):
            b = str(f).encode("ascii")
        elif isinstance(f, str):
            b = f.encode("utf-8")
        else:
            b = f
        out += _LEN.pack(len(b)) + b
    return bytes(out)


def host_key_statement(session_id: str, login: str, host_key: str) -> bytes:
    return canonical(HOSTKEY_DOMAIN, session_id, login, host_key)
