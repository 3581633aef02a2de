"""What ssh-to-job's session path imports is pinned, so that a heavy import cannot creep back
into every session's start-up unnoticed (a test of the set, never of a timing)."""

from __future__ import annotations

import sys

from conftest import BIN, Pool, User

#: Our modules a whole local session loads, no more: the wire's attrs-free session codec
#: (``lean``) and framing, never its message classes, connection or capability code; of
#: ``common`` only where the pool is (``_where``), never the config objects.
OURS = {
    "ssh_to_job",
    "ssh_to_job.client",
    "ssh_to_job.client._broker",
    "ssh_to_job.client._mux",
    "ssh_to_job.client._persist",
    "ssh_to_job.client.ssh_to_job",
    "ssh_to_job.common",
    "ssh_to_job.common._where",
    "ssh_to_job.wire",
    "ssh_to_job.wire._canonical",
    "ssh_to_job.wire._errors",
    "ssh_to_job.wire._frame",
    "ssh_to_job.wire.lean",
    "ssh_to_job.wire._sshkey",
}
#: Third-party distributions it may load (by top-level name): pynacl's libsodium binding.
THIRD_PARTY = {"nacl", "_cffi_backend"}
#: Modules that cost start-up time and that the session path does not need. attrs and
#: inspect came with the wire's message classes, nacl.signing and nacl.bindings load every
#: libsodium primitive. (tomllib, and the typing it imports, are needed: the pool here has a
#: config file, read for its [pool] section.)
NEVER = {
    "argparse",
    "logging",
    "asyncio",
    "tempfile",
    "ssl",
    "concurrent",
    "hmac",
    "attr",
    "attrs",
    "inspect",
    "dataclasses",
    "pathlib",
    "fnmatch",
    "subprocess",
    "shutil",
    "hashlib",
    "nacl.signing",
    "nacl.bindings",
    "cryptography",
    # re (and json, shlex and base64, which import it): wire.lean uses json's C half, the
    # client splits plain -ssh words itself, base64 is binascii's.
    "re",
    "json",
    "shlex",
    "base64",
    # enum (with functools, collections and operator) came with signal's and socket's enum
    # wrappers and wire._frame's sentinels: the client uses _signal and _socket; array
    # imports collections.abc.
    "array",
    "enum",
    "signal",
    "socket",
    "selectors",
    "functools",
    "collections",
}


def _imported(stderr: str) -> set[str]:
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


#: Modules the interpreter's own start-up may load, whatever the program, and "org" (the
#: standard library's copy module probes for Jython's org.python.core; the probe fails).
STARTUP = {
    "ssh_to_job",
    "sitecustomize",
    "usercustomize",
    "apport_python_hook",
    "_distutils_hack",
    "org",
}


def test_session_path_imports_only_what_it_uses(pool: Pool, users: dict[str, User]) -> None:
    """A real session through the installed entry point (ssh-to-job-py JOB true) loads exactly
    OURS of ours, only THIRD_PARTY distributions, and none of the NEVER modules."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    try:
        # ssh-to-job-py: the Python client, which the compiled `ssh-to-job` front execs for a
        # full session.
        argv = [sys.executable, "-X", "importtime", str(BIN / "ssh-to-job-py"), job, "true"]
        r = pool.run(a, argv)
    finally:
        pool.stj(a, "rm", job)
    assert r.returncode == 0, r.stderr[-2000:]
    names = _imported(r.stderr)
    ours = {n for n in names if n.split(".")[0] == "ssh_to_job"}
    assert ours == OURS, sorted(ours ^ OURS)
    third = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - STARTUP
    assert third == THIRD_PARTY, sorted(third)
    assert not names & NEVER, sorted(names & NEVER)
