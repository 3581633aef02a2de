"""An ed25519 key pair in OpenSSH's own file format, made with pynacl.

Every session has two fresh keys: the client's user key and the starter's host key. pynacl is
loaded anyway for the signature checks, so writing the ``openssh-key-v1`` format here spares
the client the ~30 ms of importing ``cryptography`` (tested against ``ssh-keygen -y``).
"""

from __future__ import annotations

import base64
import os
import struct

import nacl.signing

_MAGIC = b"openssh-key-v1\0"
_KEYTYPE = b"ssh-ed25519"


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ed25519_keypair(comment: str = "") -> tuple[bytes, str]:
    """(private key file contents, ``ssh-ed25519 AAAA...`` public line)."""
    sk = nacl.signing.SigningKey.generate()
    seed, pk = bytes(sk), bytes(sk.verify_key)
    public_blob = _string(_KEYTYPE) + _string(pk)
    check = os.urandom(4)
    private = (
        check
        + check
        + _string(_KEYTYPE)
        + _string(pk)
        + _string(seed + pk)
        + _string(comment.encode())
    )
    # Pad to the cipher block size ("none": 8) with 1, 2, 3, ... as the format requires.
    private += bytes(range(1, 1 + (-len(private) % 8)))
    body = (
        _MAGIC
        + _string(b"none")
        + _string(b"none")
        + _string(b"")
        + struct.pack(">I", 1)
        + _string(public_blob)
        + _string(private)
    )
    b64 = base64.b64encode(body).decode()
    lines = [b64[i : i + 70] for i in range(0, len(b64), 70)]
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines)
    pem += "\n-----END OPENSSH PRIVATE KEY-----\n"
    public = "ssh-ed25519 " + base64.b64encode(public_blob).decode()
    return pem.encode(), public
