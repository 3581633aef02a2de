"""``stj keys`` and ``stj pool-ca``: client keys registered over the unix socket (the kernel says
who registers), one owner per key, and the pool CA handed out over the same trusted channel."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from conftest import STJ, Pool, User

from ssh_to_job import wire
from ssh_to_job.broker._keys import KeyBook, Registered
from ssh_to_job.broker._queue import JobQueue


@pytest.fixture
def config_dirs(pool: Pool, users: dict[str, User]) -> Iterator[dict[str, dict[str, str]]]:
    """A private XDG_CONFIG_HOME per test user (their 'laptop' files), removed afterwards."""
    out = {}
    made = []
    for name in ("a", "b"):
        u = users[name]
        d = pool.state / f"xdg-{name}"
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, u.uid, u.gid)
        made.append(d)
        out[name] = {"XDG_CONFIG_HOME": str(d)}
    yield out
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _show(pool: Pool, user: User, env: dict[str, str]) -> str:
    r = pool.run(user, [STJ, "keys", "show"], env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_keys_add_list_remove_one_owner_per_key(
    pool: Pool, users: dict[str, User], config_dirs: dict[str, dict[str, str]]
) -> None:
    """A user registers their key from stdin and sees it listed; another uid can neither
    register that key nor remove it nor see it; a superuser sees every key; the owner removes it."""
    a, b, su = users["a"], users["b"], users["su"]
    pub = _show(pool, a, config_dirs["a"])
    assert _show(pool, a, config_dirs["a"]) == pub, "the key is made once and then kept"
    fp = wire.ssh_fingerprint(pub)
    r = pool.run(a, [STJ, "keys", "add", "--comment", "laptop"], input=pub + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"registered key {fp} in pool ")
    r = pool.run(a, [STJ, "keys", "add"], input=pub + "\n")
    assert r.returncode == 0, "registering one's own key again is harmless"
    listed = json.loads(pool.stj(a, "keys", "list", "--json").stdout)
    assert [(k["fingerprint"], k["uid"], k["comment"]) for k in listed] == [(fp, a.uid, "laptop")]
    assert fp in pool.stj(a, "keys", "list").stdout

    r = pool.run(b, [STJ, "keys", "add"], input=pub + "\n")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"stj: key {fp} is already registered by another user; a key belongs to one user: "
        "make your own (stj keys show on your laptop)"
    ]
    r = pool.stj(b, "keys", "remove", fp, check=False)
    assert r.returncode == 1
    assert f"you have no registered key {fp}" in r.stderr
    assert json.loads(pool.stj(b, "keys", "list", "--json").stdout) == []
    everyone = json.loads(pool.stj(su, "keys", "list", "--json").stdout)
    assert fp in [k["fingerprint"] for k in everyone]

    assert pool.stj(a, "keys", "remove", fp).stdout == f"removed key {fp}\n"
    assert json.loads(pool.stj(a, "keys", "list", "--json").stdout) == []
    # Now free, the key may be registered by b (it is b's laptop now).
    r = pool.run(b, [STJ, "keys", "add"], input=pub + "\n")
    assert r.returncode == 0, r.stderr
    pool.stj(b, "keys", "remove", fp)


def test_keys_add_refuses_what_is_not_an_ed25519_public_key(
    pool: Pool, users: dict[str, User]
) -> None:
    """An RSA key, a private key or garbage is refused in one line that says what to give."""
    a = users["a"]
    for text in (
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "",
    ):
        r = pool.run(a, [STJ, "keys", "add"], input=text)
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "only ed25519 keys are accepted" in r.stderr
        assert "give the contents of a .pub file" in r.stderr


def test_pool_ca_is_the_pools_and_trust_keeps_it(
    pool: Pool, users: dict[str, User], config_dirs: dict[str, dict[str, str]]
) -> None:
    """stj pool-ca prints the pool's CA certificate and OpenSSH host CA to any local user,
    with the CA's fingerprint; stj pool-ca --trust keeps both for a BROKER:PORT (the host CA as
    a @cert-authority line), and refuses a file that is no certificate."""
    a = users["a"]
    r = pool.stj(a, "pool-ca")
    pem, ssh_line = r.stdout.rsplit("-----\n", 1)
    assert pem + "-----\n" == (pool.state / "pki" / "ca.crt").read_text()
    # The pool's OpenSSH host CA follows the PEM, for the laptop's @cert-authority line.
    assert ssh_line.startswith("ssh-host-ca: ssh-ed25519 ")
    assert "CA SHA-256 " in r.stderr
    fingerprint = r.stderr.split("CA SHA-256 ")[1].split(";")[0]
    t = pool.run(
        a, [STJ, "pool-ca", "--trust", "198.18.0.1:9620", "-"], input=r.stdout, env=config_dirs["a"]
    )
    assert t.returncode == 0, t.stderr
    assert t.stdout.startswith(f"trusted the pool CA {fingerprint} for 198.18.0.1:9620")
    pools = pathlib.Path(config_dirs["a"]["XDG_CONFIG_HOME"]) / "ssh-to-job/pools"
    assert (pools / "198.18.0.1_9620.crt").read_text() == r.stdout
    known = (pools / "198.18.0.1_9620.known_hosts").read_text()
    assert known == f"@cert-authority job-* {ssh_line.split(': ', 1)[1]}"
    bad = pool.run(
        a, [STJ, "pool-ca", "--trust", "198.18.0.1:9620", "-"], input="nope", env=config_dirs["a"]
    )
    assert bad.returncode == 1
    assert "not a PEM CA certificate" in bad.stderr


def test_ssh_key_helpers_agree_with_openssh(tmp_path: pathlib.Path) -> None:
    """wire's fingerprint, public-key and private-seed readers give what ssh-keygen says, for a
    key ssh-keygen made and for one wire made; what is not an ed25519 public line is refused."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    pub = (tmp_path / "k.pub").read_text()
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], capture_output=True, text=True
    ).stdout
    assert listed.split()[1] == wire.ssh_fingerprint(pub)
    seed = wire.ed25519_seed((tmp_path / "k").read_bytes())
    assert wire.public_key_of(seed) == wire.ed25519_public_of(pub)
    assert wire.ed25519_line(wire.ed25519_public_of(pub)) == " ".join(pub.split()[:2])
    private, public = wire.ed25519_keypair()
    (tmp_path / "w").write_bytes(private)
    (tmp_path / "w").chmod(0o600)
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(tmp_path / "w")], capture_output=True, text=True
    ).stdout
    assert derived.split()[:2] == public.split()
    assert wire.ed25519_line(wire.public_key_of(wire.ed25519_seed(private))) == public
    blob = pub.split()[1]
    for bad in ("ssh-rsa " + blob, "ssh-ed25519 !!!", "ssh-ed25519 " + blob[:-8], "", "x"):
        with pytest.raises(ValueError, match=r"ed25519|base64"):
            wire.ed25519_public_of(bad)


def test_key_book_verifies_only_this_connection_and_pool(tmp_path: pathlib.Path) -> None:
    """KeyBook.verify names the uid of a registered key whose signature covers this pool id
    and this nonce; a changed nonce, pool, job or session key, an unknown key, and a key
    registered by another uid are each refused with their own code."""
    queue = JobQueue(tmp_path / "queue.db")
    try:
        book = KeyBook(queue.db)
        private, public = wire.ed25519_keypair()
        seed = wire.ed25519_seed(private)
        assert isinstance(book.add(1001, public + " laptop", "", "a"), wire.KeyAdded)
        assert book.add(1002, public, "", "b") == wire.Error(
            "key_taken",
            f"key {wire.ssh_fingerprint(public)} is already registered by another user; a key "
            "belongs to one user: make your own (stj keys show on your laptop)",
        )
        _s, session_key = wire.ed25519_keypair()
        nonce = os.urandom(32)

        def request(pool: str, n: bytes, job: str = "32.0", key: str = public) -> wire.RemoteSsh:
            statement = wire.remote_request_statement(pool, n, job, session_key, key)
            return wire.RemoteSsh(
                job="32.0", client_key=session_key, key=key, signature=wire.sign(seed, statement)
            )

        who = book.verify("pool1", nonce, request("pool1", nonce))
        assert who == Registered(1001, wire.ssh_fingerprint(public))
        for bad in (
            request("pool1", os.urandom(32)),
            request("pool2", nonce),
            request("pool1", nonce, job="33.0"),
        ):
            reply = book.verify("pool1", nonce, bad)
            assert isinstance(reply, wire.Error)
            assert reply.code == "bad_signature"
        _p, stranger = wire.ed25519_keypair()
        reply = book.verify("pool1", nonce, request("pool1", nonce, key=stranger))
        assert isinstance(reply, wire.Error)
        assert reply.code == "unknown_key"
        assert [k.comment for k in book.list(1001)] == ["laptop"]
        assert book.list(1002) == []
        fp = wire.ssh_fingerprint(public)
        assert isinstance(book.remove(1002, fp, superuser=False), wire.Error)
        assert book.remove(1001, fp, superuser=False) == wire.KeyRemoved(fingerprint=fp)
        reply = book.verify("pool1", nonce, request("pool1", nonce))
        assert isinstance(reply, wire.Error)
        assert reply.code == "unknown_key"
    finally:
        queue.close()
