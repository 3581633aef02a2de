"""An ed25519 key pair in OpenSSH's own file format, made with libsodium (through pynacl).

Every session has two fresh keys: the client's user key and the starter's host key. pynacl is
loaded anyway for the signature checks, so writing the ``openssh-key-v1`` format here spares
the client the ~30 ms of importing ``cryptography`` (tested against ``ssh-keygen -y``). The
key comes from ``lean`` (a seed from the OS, libsodium's seed-to-key), so that making one does
not import ``nacl.signing`` either.
"""

from __future__ import annotations

import binascii
import os
import struct

from .lean import ed25519_seed_keypair

_MAGIC = b"openssh-key-v1\0"
_KEYTYPE = b"ssh-ed25519"


def _b64(data: bytes) -> str:
    """``base64.b64encode(data).decode()``: base64 imports re, ~3 ms of a session's start-up."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ed25519_keypair(comment: str = "") -> tuple[bytes, str]:
    """(private key file contents, ``ssh-ed25519 AAAA...`` public line)."""
    # As nacl.signing.SigningKey.generate(): 32 random bytes are the key's seed.
    seed = os.urandom(32)
    pk = ed25519_seed_keypair(seed)
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
    b64 = _b64(body)
    lines = [b64[i : i + 70] for i in range(0, len(b64), 70)]
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines)
    pem += "\n-----END OPENSSH PRIVATE KEY-----\n"
    public = "ssh-ed25519 " + _b64(public_blob)
    return pem.encode(), public


def ed25519_public_of(line: str) -> bytes:
    """The 32-byte key of an ``ssh-ed25519 AAAA... [comment]`` line; ValueError otherwise."""
    words = line.strip().split()
    if len(words) < 2 or words[0] != "ssh-ed25519":
        raise ValueError("not an ssh-ed25519 public key line (only ed25519 keys are accepted)")
    try:
        blob = binascii.a2b_base64(words[1].encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("the public key is not valid base64") from None
    if blob[:15] != _string(_KEYTYPE) or len(blob) != 15 + 4 + 32 or blob[15:19] != b"\0\0\0 ":
        raise ValueError("the public key blob is not an ed25519 key")
    return blob[19:]


def ed25519_line(public: bytes) -> str:
    """The canonical ``ssh-ed25519 AAAA...`` line (no comment) of a 32-byte key."""
    return "ssh-ed25519 " + _b64(_string(_KEYTYPE) + _string(public))


def ssh_fingerprint(line: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line (as ``ssh-keygen -l``)."""
    import hashlib  # not on a session's path: only listings and the daemons print these

    blob = binascii.a2b_base64(line.strip().split()[1].encode("ascii"))
    return "SHA256:" + _b64(hashlib.sha256(blob).digest()).rstrip("=")


def ed25519_seed(private_pem: bytes) -> bytes:
    """The 32-byte seed of an unencrypted ``openssh-key-v1`` ed25519 key (as we write them)."""
    text = private_pem.decode("ascii", "replace").strip().splitlines()
    if len(text) < 3 or "OPENSSH PRIVATE KEY" not in text[0]:
        raise ValueError("not an OpenSSH private key file")
    body = binascii.a2b_base64("".join(text[1:-1]))
    if not body.startswith(_MAGIC):
        raise ValueError("not an OpenSSH private key file")
    pos = len(_MAGIC)

    def take() -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from(">I", body, pos)
        pos += 4
        out = body[pos : pos + n]
        pos += n
        return out

    if take() != b"none" or take() != b"none":
        raise ValueError("the key file is encrypted (only unencrypted keys are supported)")
    take()  # kdf options
    pos += 4  # number of keys (1)
    take()  # public blob
    private = body[pos + 4 :]
    pos = 8  # check ints
    body = private
    if take() != _KEYTYPE:
        raise ValueError("the key file does not hold an ed25519 key")
    take()  # public key
    secret = take()
    if len(secret) != 64:
        raise ValueError("the key file's ed25519 secret is malformed")
    return secret[:32]
