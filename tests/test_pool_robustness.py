"""The pool loses nothing and survives bad input (issue 2).

A broker killed with SIGKILL while jobs run comes back with every job, the starter redials by
itself, and an exit that happened meanwhile is recorded. Garbage on either of the broker's
endpoints costs the sender its connection and nothing else: the same broker process goes on
running jobs. Secrets stay in private files, and bad configuration or job ids get a clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ROOT, STJ, Pool, User, wait_for

from ssh_to_job import common, wire


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def submit(pool: Pool, user: User, *argv: str) -> str:
    (job,) = pool.submit(user, *argv)
    return job


# --------------------------------------------------------------------------- nothing lost


def test_broker_sigkill_and_restart_loses_nothing(
    make_pool: Callable[..., Pool], users: dict[str, User]
) -> None:
    """With the broker killed by SIGKILL, jobs keep running and one finishes; the broker that
    stj pool restarts on the same state directory has every job back, the starter redials by
    itself, and the exit code of the job that ended meanwhile is recorded."""
    a = users["a"]
    pool = make_pool(config="[starter]\nreconnect_max = 0.3\n")
    long = submit(pool, a, "/bin/sleep", "120")
    ends = submit(pool, a, "/bin/sh", "-c", "while [ ! -e go ]; do sleep 0.05; done; exit 5")
    held = submit(pool, a, "/bin/sleep", "122")
    pool.stj(a, "hold", "--reason", "keep me held", held)
    (long_pid,) = pool.wait_state(long, "running")["pids"]
    ends_info = pool.wait_state(ends, "running")
    (ends_pid,) = ends_info["pids"]
    (broker_pid,) = pool.pids("broker")
    (starter_pid,) = pool.pids("starter")
    assert pool.proc is not None

    # Pause the supervisor so that the broker stays down while we look; it restarts the broker
    # when it runs again.
    os.kill(pool.proc.pid, signal.SIGSTOP)
    try:
        os.kill(broker_pid, signal.SIGKILL)
        wait_for("the broker to die", lambda: not alive(broker_pid), 5)
        r = pool.stj(a, "q", check=False)
        assert r.returncode == 1
        assert "cannot reach the broker" in r.stderr
        # Jobs keep running without a broker; one of them finishes meanwhile.
        procs = {"long job": long_pid, "ending job": ends_pid, "starter": starter_pid}
        assert {k: alive(p) for k, p in procs.items()} == dict.fromkeys(procs, True)
        scratch = pathlib.Path(ends_info["scratch"])
        (scratch / "go").touch()
        wait_for("the job to end while the broker is down", lambda: not alive(ends_pid), 5)
        wait_for("the starter to clean up after it", lambda: not scratch.exists(), 5)
        time.sleep(0.2)
        assert alive(long_pid)
        assert alive(starter_pid)
    finally:
        os.kill(pool.proc.pid, signal.SIGCONT)

    pool.wait_for_starter(timeout=15)
    new_broker = wait_for("the pool to restart the broker", lambda: pool.pids("broker"), 10)
    assert new_broker != [broker_pid]
    assert "the broker (pid" in pool.log_text()
    # The new broker (almost always) listens on a new port: the starter found it.
    assert pool.pids("starter") == [starter_pid]
    live = pool.jobs()
    assert live[long]["state"] == "running"
    assert live[long]["pids"] == [long_pid]
    assert alive(long_pid)
    assert (live[held]["state"], live[held]["hold_reason"]) == ("held", "keep me held")
    done = wait_for("the exit to be recorded", lambda: pool.jobs(history=True).get(ends), 10)
    assert (done["state"], done["exit_code"], done["exit_signal"]) == ("completed", 5, None)
    st = json.loads(pool.stj(a, "status", "--json").stdout)
    assert [st["broker_pid"]] == new_broker
    assert [s["jobs"] for s in st["starters"]] == [[long]]
    # The restarted broker runs new work, and can still end the old.
    new = submit(pool, a, "/bin/true")
    assert pool.wait_state(new, "completed")["exit_code"] == 0
    pool.stj(a, "rm", long)
    pool.wait_state(long, "removed")
    wait_for("the old job to be killed", lambda: not alive(long_pid), 5)
    # The queue that survived is SQLite in WAL mode (the mode is stored in the file).
    db = pool.state / "queue.db"
    header = db.read_bytes()[:20]
    assert header[:16] == b"SQLite format 3\0"
    assert header[18:20] == b"\x02\x02"
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert ro.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        ro.close()


# --------------------------------------------------------------------------- bad input


def _read_until_closed(sock: socket.socket) -> list[wire.Message]:
    """Every frame the broker sends before it closes the connection."""
    dec = wire.FrameDecoder()
    out: list[wire.Message] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        dec.receive_data(data)
        while True:
            frame = dec.next_frame()
            if frame is wire.NEED_DATA or frame is wire.CLOSED:
                break
            assert isinstance(frame, bytes)
            out.append(wire.decode_message(frame))
        if not data:
            return out


def _frame(body: dict[str, object]) -> bytes:
    return wire.encode_frame(json.dumps(body).encode())


#: (name, bytes to send, then half-close?, what the broker's error must say)
BAD_INPUT = [
    (
        "garbage",
        b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",
        False,
        "peer announced a 1195725856-byte frame; the limit is 1048576",
    ),
    (
        "not-json",
        wire.encode_frame(b"\xff\x00this is {not json"),
        False,
        "frame is not valid UTF-8 JSON",
    ),
    (
        "oversize-header",
        b"\xff\xff\xff\xff" + b"x" * 64,
        False,
        "peer announced a 4294967295-byte frame",
    ),
    (
        "disconnect-mid-frame",
        wire.FRAME_HEADER.pack(100) + b'{"type": "sub',
        True,
        "in the middle of a frame",
    ),
    (
        "wrong-field-type",
        _frame({"type": "submit", "spec": {"executable": 5}}),
        False,
        "field spec.executable: expected a string",
    ),
    (
        "unknown-type",
        _frame({"type": "launch_missiles"}),
        False,
        "unknown message type 'launch_missiles'",
    ),
]


@pytest.fixture
def serving(pool: Pool, users: dict[str, User]) -> Iterator[int]:
    """The broker's pid; afterwards, that same broker must still run real work."""
    (pid,) = pool.pids("broker")
    yield pid
    assert pool.pids("broker") == [pid], "the broker process changed"
    a = users["a"]
    job = submit(pool, a, "/bin/sh", "-c", "echo still serving")

    def finished() -> list[dict[str, object]]:
        return json.loads(pool.stj(a, "history", "--json", job).stdout)  # type: ignore[no-any-return]

    (info,) = wait_for(f"job {job} to run", finished)
    assert (info["state"], info["exit_code"]) == ("completed", 0)
    assert pool.stj(a, "output", job).stdout == "still serving\n"


@pytest.mark.parametrize(
    ("name", "data", "half_close", "says"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT]
)
def test_bad_input_on_unix_socket_costs_only_that_connection(
    pool: Pool, serving: int, name: str, data: bytes, half_close: bool, says: str
) -> None:
    """Malformed bytes on the broker's unix socket get one clear protocol error back and the
    connection closed; the broker goes on serving."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(pool.state / "broker.sock"))
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        replies = _read_until_closed(s)
    assert len(replies) == 1, replies
    (err,) = replies
    assert isinstance(err, wire.Error), err
    assert err.code == "protocol", err
    assert says in err.message, err


def _tls_port(pool: Pool) -> tuple[str, int]:
    host, _, port = (pool.state / "broker.addr").read_text().strip().rpartition(":")
    return host, int(port)


def _q_answers_quickly(pool: Pool) -> None:
    start = time.monotonic()
    pool.stj(ROOT, "q")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("name", "data", "half_close", "says"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT]
)
def test_bad_input_on_tls_port_costs_only_that_connection(
    pool: Pool, serving: int, name: str, data: bytes, half_close: bool, says: str
) -> None:
    """Bytes that are not TLS on the broker's port (where starters dial in) end that
    connection at once, no frame is ever sent back in clear, and `stj q` answers meanwhile."""
    with socket.create_connection(_tls_port(pool), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
        assert time.monotonic() - start < 5
    # At most a TLS alert record (content type 21), never a protocol frame in clear.
    assert got == b"" or got[0] == 21, got
    _q_answers_quickly(pool)


def test_openssl_s_client_inspects_the_broker_port(pool: Pool, serving: int) -> None:
    """An admin's `openssl s_client -tls1_3` against the broker's port completes a verified
    TLS 1.3 handshake with the pool CA and shows the broker's certificate and pool id."""
    host, port = _tls_port(pool)
    ca = common.parse_cert((pool.state / "pki" / common.CA_CERT).read_text())
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_3",
         "-CAfile", str(pool.state / "pki" / common.CA_CERT), "-verify_return_error"],
        input=b"", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    out = r.stdout.decode()
    assert "Verify return code: 0 (ok)" in out, out + r.stderr.decode()
    assert "Protocol  : TLSv1.3" in out or "TLSv1.3" in out
    assert f"OU = {common.pool_id_of_ca(ca)}" in out
    assert "CN = broker" in out


def test_foreign_certificate_and_stalled_handshake_cost_only_their_connection(
    pool: Pool, serving: int, tmp_path: pathlib.Path
) -> None:
    """A starter certificate of another pool (even under the real starter's name) is refused
    in the TLS handshake, a client that never finishes its handshake holds only its own socket,
    and the connected starter keeps its place; `stj q` answers within a second meanwhile."""
    before = json.loads(pool.stj(ROOT, "status", "--json").stdout)["starters"]
    name = before[0]["starter_id"]
    foreign = common.BrokerPki.open(tmp_path / "foreign")
    key = common.new_private_key()
    cert = foreign.issue(wire.ROLE_STARTER, name, key.public_key())
    common.write_leaf(tmp_path, common.STARTER_KEY, common.STARTER_CERT, key, cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pool.state / "pki" / common.CA_CERT)
    ctx.load_cert_chain(tmp_path / common.STARTER_CERT, tmp_path / common.STARTER_KEY)
    with socket.create_connection(_tls_port(pool), timeout=10) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
        with (
            socket.create_connection(_tls_port(pool), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            hello = wire.StarterHello(starter_id=name, starter_key=b"k" * 32, slots=64)
            conn = wire.Connection(wire.Channel.STARTER, wire.Role.STARTER, wire.Role.BROKER)
            # TLS 1.3: the server judges the client's certificate after the client's side of
            # the handshake is done, so the refusal shows on the first read.
            try:
                tls.sendall(conn.send(hello))
                got = tls.recv(100)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                got = b""
            assert got == b"", "a certificate of another pool was let in"
        _q_answers_quickly(pool)
    after = json.loads(pool.stj(ROOT, "status", "--json").stdout)["starters"]
    assert [(s["starter_id"], s["slots"]) for s in after] == [
        (s["starter_id"], s["slots"]) for s in before
    ]
    assert "certificate not accepted: unable to get local issuer certificate" in pool.log_text()


def test_unanswerable_requests_get_errors_on_a_live_connection(pool: Pool, serving: int) -> None:
    """Well-formed requests naming absurd jobs (ids too large for the queue, negative, not a
    job id) get an error reply, and the same connection then answers a query."""
    conn = wire.Connection(wire.Channel.CONTROL, wire.Role.CLIENT, wire.Role.BROKER)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(pool.state / "broker.sock"))

        def ask(msg: wire.Message) -> wire.Message:
            s.sendall(conn.send(msg))
            while True:
                event = conn.next_event()
                if isinstance(event, wire.Message):
                    return event
                assert event is wire.NEED_DATA, "the broker closed the connection"
                conn.receive_data(s.recv(65536))

        for msg, code in (
            (wire.Output(id="99999999999999999999999"), "unknown_job"),
            (wire.Output(id="1.99999999999999999999"), "unknown_job"),
            (wire.Output(id="-1"), "unknown_job"),
            (wire.Act(action="rm", ids=("99999999999999999999999",)), None),
            (wire.Query(ids=("not-a-job",)), "bad_request"),
        ):
            reply = ask(msg)
            if code is None:
                assert isinstance(reply, wire.ActReply), reply
                assert not reply.results[0].ok
                assert "not a job id" in reply.results[0].message
            else:
                assert isinstance(reply, wire.Error), (msg, reply)
                assert reply.code == code, (msg, reply)
        reply = ask(wire.Query())
        assert isinstance(reply, wire.JobList)
        assert reply.last


def test_unknown_and_malformed_job_ids_get_clear_errors(pool: Pool, users: dict[str, User]) -> None:
    """Every job command given an unknown job id says it is not in the queue (exit 1), and a
    malformed id is a usage error (exit 2) that names it."""
    a = users["a"]
    for action in ("rm", "hold", "release", "suspend", "continue"):
        r = pool.stj(a, action, "4242", "4243.7", check=False)
        assert r.returncode == 1, r
        assert "job 4242 is not in the queue" in r.stderr
        assert "job 4243.7 is not in the queue" in r.stderr
    r = pool.stj(a, "output", "4242", check=False)
    assert r.returncode == 1
    assert "job 4242.0 is not in the queue" in r.stderr
    assert json.loads(pool.stj(a, "q", "--json", "4242").stdout) == []
    bad_ids = [
        ["rm", "abc"],
        ["hold", "1.x"],
        ["release", "-"],
        ["suspend", "1..2"],
        ["continue", "١٢"],
        ["output", "1.2.3.4"],
        ["q", "abc"],
        ["history", "x"],
    ]
    for argv in bad_ids:
        r = pool.stj(a, *argv, check=False)
        assert r.returncode == 2, (argv, r)
        assert f"{argv[1]!r} is not a job id" in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- secrets, config


def test_state_files_are_private_and_no_secret_is_in_argv_or_environ(
    pool: Pool, users: dict[str, User]
) -> None:
    """Key files are 0600 in a 0700 directory, the queue (with its WAL) is 0600, and no
    process of the pool, nor a job, carries a private key on its command line or environment."""
    a = users["a"]
    job = submit(pool, a, "-e", "SOME=value", "/bin/sleep", "60")
    try:
        (job_pid,) = pool.wait_state(job, "running")["pids"]
        keys = pool.state / "keys"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        key_files = sorted(keys.glob("*.key"))
        assert {k.name for k in key_files} == {"broker.key", "starter.key"}
        for k in key_files:
            st = k.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0), k
        assert stat.S_IMODE((pool.state / "spool").stat().st_mode) == 0o700
        db_files = sorted(pool.state.glob("queue.db*"))
        assert pool.state / "queue.db" in db_files
        for f in db_files:  # the WAL holds every job's environment too
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        secrets_hex = [k.read_text().strip() for k in key_files]
        assert all(len(h) == 64 for h in secrets_hex)
        needles = [h.encode() for h in secrets_hex] + [h.upper().encode() for h in secrets_hex]
        needles += [bytes.fromhex(h) for h in secrets_hex]
        assert pool.proc is not None
        pids = {
            "pool": pool.proc.pid,
            "broker": pool.pids("broker")[0],
            "starter": pool.pids("starter")[0],
            "job": job_pid,
        }
        for role, pid in pids.items():
            for what in ("cmdline", "environ"):
                data = pathlib.Path(f"/proc/{pid}/{what}").read_bytes()
                assert data, (role, what)
                for needle in needles:
                    assert needle not in data, f"a private key is in the {what} of the {role}"
    finally:
        pool.stj(ROOT, "rm", job, check=False)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[broker]\nprot = 1\n", "unknown key 'prot' in [broker]"),
        ("[starter]\nslots = 2\nsesion_grace = 5\n", "unknown key 'sesion_grace' in [starter]"),
        ("[brokers]\nport = 1\n", "unknown section(s) ['brokers']"),
        ("[pool]\nstatedir = '/x'\n", "[pool] knows only state_dir"),
        ('[starter]\nslots = "four"\n', "starter.slots must be of type int"),
        ("[broker]\nport = 1\n[broker\n", "config is not valid TOML"),
        ("[starter]\nslots = 0\n", "[starter] slots must be between 1 and 100000, not 0"),
        ("[broker]\ncapability_lifetime = 61\n", "capability_lifetime must be between 1 and 60"),
        ("[broker]\nport = 70000\n", "port must be between 0 and 65535, not 70000"),
    ],
    ids=[
        "unknown-broker-key",
        "unknown-starter-key",
        "unknown-section",
        "unknown-pool-key",
        "wrong-type",
        "bad-toml",
        "zero-slots",
        "long-capability",
        "bad-port",
    ],
)
def test_config_with_unknown_or_bad_keys_is_refused(
    pool: Pool, users: dict[str, User], text: str, says: str
) -> None:
    """A config file with an unknown key (or section, or a bad value) makes every command exit
    2 naming the key, whether or not the state directory is also given."""
    bad = pool.state / f"bad-{secrets.token_hex(3)}.toml"
    bad.write_text(text)
    bad.chmod(0o644)
    a = users["a"]
    for argv in (
        ["q", "--config", str(bad)],
        ["q", "--config", str(bad), "--state-dir", str(pool.state)],
        ["submit", "--config", str(bad), "/bin/true"],
    ):
        r = pool.stj(a, *argv, check=False)
        assert (r.returncode, r.stdout) == (2, ""), (argv, r)
        assert re.search(rf"config: .*{re.escape(says)}", r.stderr), (argv, r.stderr)
    fresh = pool.state / f"never-{secrets.token_hex(3)}"
    r = pool.run(ROOT, [STJ, "broker", "--config", str(bad), "--state-dir", str(fresh)], timeout=20)
    assert r.returncode == 2, r
    assert says in r.stderr, r
    assert not fresh.exists()
