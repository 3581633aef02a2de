"""TLS 1.3 control channels (transport._tls) with real certificates over real sockets."""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ssh_to_job import common, transport, wire
from ssh_to_job.common import BrokerPki, PoolCA, StarterEnrollment, TokenBook
from ssh_to_job.transport import PeerIdentity, TlsRefused

pytestmark = pytest.mark.filterwarnings("error")


@attrs.frozen
class Leaf:
    cert: pathlib.Path
    key: pathlib.Path
    serial: int


def _leaf(pki_dir: pathlib.Path, ca: PoolCA, role: str, name: str, label: str = "") -> Leaf:
    label = label or name
    key = common.new_private_key()
    cert = ca.issue(role, name, key.public_key())
    common.write_leaf(pki_dir, f"{label}.key", f"{label}.crt", key, cert)
    return Leaf(pki_dir / f"{label}.crt", pki_dir / f"{label}.key", cert.serial_number)


@attrs.frozen
class World:
    pki: BrokerPki
    starter: Leaf
    client: Leaf
    foreign_ca: PoolCA
    foreign_ca_file: pathlib.Path
    foreign: Leaf

    def server_ctx(self, **kw: Any) -> Any:
        return transport.server_context(
            self.pki.cert_file, self.pki.key_file, self.pki.ca_file, **kw
        )

    def client_ctx(self, leaf: Leaf | None) -> Any:
        if leaf is None:
            return transport.client_context(self.pki.ca_file)
        return transport.client_context(self.pki.ca_file, leaf.cert, leaf.key)


@pytest.fixture
def world(tmp_path: pathlib.Path) -> World:
    pki = BrokerPki.open(tmp_path / "broker", hosts=("127.0.0.1",))
    leaves = tmp_path / "leaves"
    starter = _leaf(leaves, pki.ca, "starter", "exec-1")
    client = _leaf(leaves, pki.ca, "client", "alice")
    foreign_ca = PoolCA.generate()
    foreign_ca.save(tmp_path / "foreign")
    foreign = _leaf(leaves, foreign_ca, "starter", "exec-1", label="foreign")
    return World(pki, starter, client, foreign_ca, tmp_path / "foreign" / "ca.crt", foreign)


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def _client_side(
    stream: trio.SocketStream, ctx: Any, out: dict[str, Any], greet: bytes = b"hi"
) -> None:
    """Handshake as a client and read what the server says (or how it failed)."""
    ssl_stream = trio.SSLStream(stream, ctx, server_hostname="broker")
    try:
        await ssl_stream.do_handshake()
        await ssl_stream.send_all(greet)
        out["read"] = await ssl_stream.receive_some(1000)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        out["error"] = exc
    finally:
        await trio.aclose_forcefully(ssl_stream)


async def _accept(
    world: World,
    client_leaf: Leaf | None,
    *,
    server_ctx: Any = None,
    roles: tuple[str, ...] = ("starter", "client"),
    client_ctx: Any = None,
    **kw: Any,
) -> tuple[PeerIdentity | TlsRefused | None, dict[str, Any]]:
    """One accept_tls over a socketpair against one client; (identity or refusal, client)."""
    server, client = await _pair()
    out: dict[str, Any] = {}
    result: PeerIdentity | TlsRefused | None = None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _client_side, client, client_ctx or world.client_ctx(client_leaf), out
            )
            try:
                stream, ident = await transport.accept_tls(
                    server,
                    server_ctx or world.server_ctx(),
                    pool_id=world.pki.pool_id,
                    roles=roles,
                    **kw,
                )
            except TlsRefused as exc:
                result = exc
            else:
                result = ident
                await stream.receive_some(100)
                await stream.send_all(b"welcome")
                await stream.aclose()
    return result, out


async def test_mutual_auth_gives_both_sides_the_peer_identity(world: World) -> None:
    """A starter and the broker each learn the other's verified stj:// identity and serial."""
    ident, out = await _accept(world, world.starter)
    assert isinstance(ident, PeerIdentity)
    assert (ident.pool_id, ident.role, ident.name) == (world.pki.pool_id, "starter", "exec-1")
    assert ident.serial == world.starter.serial
    assert out["read"] == b"welcome"


async def test_connect_tls_checks_the_broker_and_serve_tls_the_starter(world: World) -> None:
    """Over loopback TCP: serve_tls and connect_tls authenticate each other, TLS 1.3 only."""
    seen: list[PeerIdentity | None] = []

    async def handler(stream: trio.SSLStream[Any], ident: PeerIdentity | None) -> None:
        seen.append(ident)
        await stream.send_all(b"ok " + stream.version().encode())
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: transport.serve_tls(
                    handler,
                    0,
                    world.server_ctx(),
                    host="127.0.0.1",
                    pool_id=world.pki.pool_id,
                    roles=("starter",),
                    task_status=task_status,
                )
            )
            port = listeners[0].socket.getsockname()[1]
            stream, broker = await transport.connect_tls(
                "127.0.0.1", port, world.client_ctx(world.starter), pool_id=world.pki.pool_id
            )
            assert broker is not None
            assert (broker.role, broker.name) == ("broker", "broker")
            assert await stream.receive_some(100) == b"ok TLSv1.3"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert [i.name if i else None for i in seen] == ["exec-1"]


async def test_foreign_ca_certificate_is_refused(world: World) -> None:
    """A certificate from another CA fails the handshake; the handler never runs."""
    result, out = await _accept(world, world.foreign)
    assert isinstance(result, TlsRefused)
    assert "certificate not accepted: unable to get local issuer certificate" in result.reason
    assert "read" not in out


async def test_certificate_of_another_pool_is_refused_even_under_a_trusted_ca(
    world: World, tmp_path: pathlib.Path
) -> None:
    """With both CAs trusted (a shared trust store), the pool id still keeps pools apart."""
    bundle = tmp_path / "both.crt"
    bundle.write_bytes(world.pki.ca_file.read_bytes() + world.foreign_ca_file.read_bytes())
    ctx = transport.server_context(world.pki.cert_file, world.pki.key_file, bundle)
    result, out = await _accept(world, world.foreign, server_ctx=ctx)
    assert isinstance(result, TlsRefused)
    assert f"belongs to pool {world.foreign_ca.pool_id!r}" in result.reason
    assert "read" not in out


async def test_revoked_serial_is_refused_with_a_farewell(world: World) -> None:
    """A revoked starter is cut right after the handshake and told why."""
    result, out = await _accept(
        world,
        world.starter,
        is_revoked=lambda serial: serial == world.starter.serial,
        farewell=lambda exc: f"refused: {exc.reason}".encode(),
    )
    assert isinstance(result, TlsRefused)
    assert "revoked" in result.reason
    assert out["read"].startswith(b"refused: peer stj://")
    assert out["read"].endswith(b"certificate revoked")


async def test_revocation_list_file_refuses_the_next_connection(world: World) -> None:
    """BrokerPki.revoke by name takes effect on the next accept through RevocationList."""
    pki = world.pki
    key = common.new_private_key()
    cert = pki.issue("starter", "exec-9", key.public_key())
    common.write_leaf(pki.directory, "exec-9.key", "exec-9.crt", key, cert)
    leaf = Leaf(pki.directory / "exec-9.crt", pki.directory / "exec-9.key", cert.serial_number)
    ok, _ = await _accept(world, leaf, is_revoked=pki.revocations.is_revoked)
    assert isinstance(ok, PeerIdentity)
    pki.revoke("starter", "exec-9")
    refused, _ = await _accept(world, leaf, is_revoked=pki.revocations.is_revoked)
    assert isinstance(refused, TlsRefused)


async def test_an_unreadable_revocation_list_refuses_everyone(world: World) -> None:
    """A damaged revoked file fails closed: the connection is refused with the reason."""
    (world.pki.directory / common.REVOKED).write_text("zz-not-hex\n")
    result, _ = await _accept(world, world.starter, is_revoked=world.pki.revocations.is_revoked)
    assert isinstance(result, TlsRefused)
    assert "revocation list unusable" in result.reason
    assert "not a hex serial" in result.reason


async def test_roles_are_enforced(world: World) -> None:
    """A client certificate is refused where only starters may connect."""
    result, _ = await _accept(world, world.client, roles=("starter",))
    assert isinstance(result, TlsRefused)
    assert "is a client; expected starter" in result.reason


async def test_a_starter_certificate_cannot_pose_as_the_broker(world: World) -> None:
    """A server presenting a starter's (clientAuth) certificate fails the client's check."""
    ctx = transport.server_context(world.starter.cert, world.starter.key, world.pki.ca_file)
    server, client = await _pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises(TlsRefused):
                    await transport.accept_tls(
                        server, ctx, pool_id=world.pki.pool_id, roles=("starter",)
                    )

            nursery.start_soon(serve)
            ssl_stream = trio.SSLStream(
                client, world.client_ctx(world.starter), server_hostname="b"
            )
            with pytest.raises(trio.BrokenResourceError) as info:
                await ssl_stream.do_handshake()
            await trio.aclose_forcefully(ssl_stream)
            assert "unsuitable certificate purpose" in str(info.value.__cause__)


async def test_no_client_certificate(world: World) -> None:
    """Without a certificate: refused, unless the context allows enrolment (identity None)."""
    refused, _ = await _accept(world, None)
    assert isinstance(refused, TlsRefused)
    strict, _ = await _accept(world, None, server_ctx=world.server_ctx(allow_enrollment=True))
    assert isinstance(strict, TlsRefused)
    assert "no certificate" in strict.reason
    anonymous, out = await _accept(
        world, None, server_ctx=world.server_ctx(allow_enrollment=True), allow_anonymous=True
    )
    assert anonymous is None
    assert out["read"] == b"welcome"
    # A certificate that is presented must still verify, even where enrolment is allowed.
    foreign, _ = await _accept(
        world,
        world.foreign,
        server_ctx=world.server_ctx(allow_enrollment=True),
        allow_anonymous=True,
    )
    assert isinstance(foreign, TlsRefused)


async def test_bad_peers_cost_only_their_own_connection(
    world: World, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage and a stalled handshake neither block a good starter nor outlive the deadline."""
    caplog.set_level(logging.INFO, "ssh_to_job.tls")
    served: list[str] = []

    async def handler(stream: trio.SSLStream[Any], ident: PeerIdentity | None) -> None:
        assert ident is not None
        served.append(ident.name)
        await stream.send_all(b"hello " + ident.name.encode())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: transport.serve_tls(
                handler,
                0,
                world.server_ctx(),
                host="127.0.0.1",
                pool_id=world.pki.pool_id,
                roles=("starter",),
                handshake_timeout=10,
                task_status=task_status,
            )
        )
        port = listeners[0].socket.getsockname()[1]
        garbage = await trio.open_tcp_stream("127.0.0.1", port)
        await garbage.send_all(b"GET / HTTP/1.0\r\n\r\n" * 10)
        staller = await trio.open_tcp_stream("127.0.0.1", port)
        await staller.send_all(b"\x16\x03\x01\x02\x00")  # a ClientHello header, then nothing
        start = trio.current_time()
        stream, _ = await transport.connect_tls(
            "127.0.0.1", port, world.client_ctx(world.starter), pool_id=world.pki.pool_id
        )
        assert await stream.receive_some(100) == b"hello exec-1"
        assert trio.current_time() - start < 1
        await stream.aclose()
        # The garbage got its connection closed at once, the staller only at the deadline.
        assert await garbage.receive_some(100) in (b"", b"\x15\x03\x03\x00\x02\x02\x32")
        with trio.fail_after(11):
            while await staller.receive_some(100):
                pass
        assert 9 < trio.current_time() - start < 11
        await garbage.aclose()
        await staller.aclose()
        await trio.sleep(1)  # let the server's task log the refusal before it is cancelled
        nursery.cancel_scope.cancel()
    assert served == ["exec-1"]
    reasons = [r.getMessage() for r in caplog.records]
    assert any("no TLS handshake from client within 10 s" in r for r in reasons)
    assert any("TLS handshake failed" in r for r in reasons)


async def test_connect_tls_gives_up_on_a_server_that_never_answers(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """A broker port that accepts but never handshakes costs the starter one deadline."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        start = trio.current_time()
        with pytest.raises(TlsRefused, match="no TLS handshake from server within 10 s"):
            await transport.connect_tls(
                "127.0.0.1",
                port,
                world.client_ctx(world.starter),
                pool_id=world.pki.pool_id,
                handshake_timeout=10,
            )
        assert trio.current_time() - start == pytest.approx(10)
        accepted = await listeners[0].accept()
        await accepted.aclose()


async def test_connect_tls_refuses_a_broker_of_another_pool(
    world: World, tmp_path: pathlib.Path
) -> None:
    """A server with a valid certificate of another pool (both CAs trusted) is refused."""
    other = BrokerPki.open(tmp_path / "other", hosts=("127.0.0.1",))
    bundle = tmp_path / "both.crt"
    bundle.write_bytes(world.pki.ca_file.read_bytes() + other.ca_file.read_bytes())

    async def handler(stream: trio.SSLStream[Any], ident: PeerIdentity | None) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server_ctx = transport.server_context(other.cert_file, other.key_file, bundle)
            listeners = await nursery.start(
                lambda task_status: transport.serve_tls(
                    handler,
                    0,
                    server_ctx,
                    host="127.0.0.1",
                    pool_id=other.pool_id,
                    roles=("starter",),
                    task_status=task_status,
                )
            )
            port = listeners[0].socket.getsockname()[1]
            ctx = transport.client_context(bundle, world.starter.cert, world.starter.key)
            with pytest.raises(TlsRefused, match="belongs to pool"):
                await transport.connect_tls("127.0.0.1", port, ctx, pool_id=world.pki.pool_id)
            nursery.cancel_scope.cancel()


async def test_watch_revocation_cuts_a_live_connection(
    world: World, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection whose serial is revoked mid-life is closed within one interval."""
    revoked: set[int] = set()
    server, client = await _pair()
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_client_side, client, world.client_ctx(world.starter), out, b"")
        stream, ident = await transport.accept_tls(
            server, world.server_ctx(), pool_id=world.pki.pool_id, roles=("starter",)
        )
        assert ident is not None

        async def revoke_later() -> None:
            await trio.sleep(30)
            revoked.add(ident.serial)

        nursery.start_soon(revoke_later)
        with pytest.raises(transport.PeerRevoked):
            await transport.watch_revocation(stream, ident.serial, revoked.__contains__, 1.0)
        assert 30 <= trio.current_time() <= 31
    assert "error" in out or out.get("read") == b""


async def test_a_session_connection_can_leave_tls_for_raw_bytes(world: World) -> None:
    """After an authenticated attach frame both sides unwrap TLS with nothing left over, and
    the bare socket carries raw bytes (the way session sockets go on to SSH)."""
    server, client = await _pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def starter() -> None:
                st = trio.SSLStream(client, world.client_ctx(world.starter), server_hostname="b")
                await st.do_handshake()
                await st.send_all(b"attach")
                raw, extra = await st.unwrap()
                assert extra == b""
                await raw.send_all(b"SSH-2.0-starter")
                assert await raw.receive_some(100) == b"SSH-2.0-client"
                await raw.aclose()

            nursery.start_soon(starter)
            stream, ident = await transport.accept_tls(
                server, world.server_ctx(), pool_id=world.pki.pool_id, roles=("starter",)
            )
            assert ident is not None
            assert await stream.receive_some(100) == b"attach"
            raw, extra = await stream.unwrap()
            assert extra == b""
            assert isinstance(raw, trio.SocketStream)
            assert await raw.receive_some(100) == b"SSH-2.0-starter"
            await raw.send_all(b"SSH-2.0-client")
            await raw.aclose()


async def _send_frame(stream: trio.abc.Stream, msg: Any) -> None:
    await stream.send_all(wire.encode_frame(common.encode_enroll(msg)))


async def _recv_frame(stream: trio.abc.Stream, dec: wire.FrameDecoder) -> Any:
    while True:
        frame = dec.next_frame()
        if isinstance(frame, bytes):
            return common.decode_enroll(frame)
        assert frame is wire.NEED_DATA
        dec.receive_data(bytes(await stream.receive_some(65536)))


async def test_enrolment_over_tls_then_mutual_auth_with_the_new_certificate(
    world: World, tmp_path: pathlib.Path
) -> None:
    """A starter with only a join token enrols over TLS, then connects with its certificate."""
    pki = world.pki
    book = TokenBook()
    token = book.create(pki.ca.fingerprint, 600, now=time.time())

    async def handler(stream: trio.SSLStream[Any], ident: PeerIdentity | None) -> None:
        dec = wire.FrameDecoder()
        if ident is None:
            side = common.BrokerEnrollment(
                pki.ca_file.read_bytes(),
                book,
                lambda name, key: pki.issue("starter", name, key),
            )
            await _send_frame(stream, side.on_hello(await _recv_frame(stream, dec)))
            try:
                reply = side.on_request(await _recv_frame(stream, dec))
            except common.EnrollError as exc:
                await _send_frame(stream, exc.error())
            else:
                await _send_frame(stream, reply)
        else:
            await stream.send_all(b"welcome " + ident.name.encode())
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: transport.serve_tls(
                    handler,
                    0,
                    world.server_ctx(allow_enrollment=True),
                    host="127.0.0.1",
                    pool_id=pki.pool_id,
                    roles=("starter",),
                    allow_anonymous=True,
                    task_status=task_status,
                )
            )
            port = listeners[0].socket.getsockname()[1]

            async def enrol(name: str) -> Any:
                stream, none = await transport.connect_tls(
                    "127.0.0.1", port, transport.enrollment_context(), pool_id=None
                )
                assert none is None
                me = StarterEnrollment(common.parse_token(str(token)), name)
                dec = wire.FrameDecoder()
                await _send_frame(stream, me.hello())
                request = me.on_ca(
                    await _recv_frame(stream, dec), transport.peer_certificate_der(stream)
                )
                await _send_frame(stream, request)
                try:
                    return me.on_reply(await _recv_frame(stream, dec))
                finally:
                    await stream.aclose()

            done = await enrol("exec-new")
            mine = common.StarterPki.save(
                tmp_path / "starter", done.key, done.certificate, done.ca_certs
            )
            ctx = transport.client_context(mine.ca_file, mine.cert_file, mine.key_file)
            stream, broker = await transport.connect_tls(
                "127.0.0.1", port, ctx, pool_id=mine.pool_id
            )
            assert broker is not None
            assert await stream.receive_some(100) == b"welcome exec-new"
            await stream.aclose()
            with pytest.raises(common.EnrollError, match="already used") as info:
                await enrol("exec-other")
            assert info.value.refused
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_openssl_s_client_completes_a_handshake(world: World) -> None:
    """`openssl s_client -tls1_3` with a starter certificate is served like our own client."""
    seen: list[str] = []

    async def handler(stream: trio.SSLStream[Any], ident: PeerIdentity | None) -> None:
        assert ident is not None
        seen.append(ident.name)
        await stream.send_all(b"hello from the broker\n")
        await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: transport.serve_tls(
                    handler,
                    0,
                    world.server_ctx(),
                    host="127.0.0.1",
                    pool_id=world.pki.pool_id,
                    roles=("starter",),
                    task_status=task_status,
                )
            )
            port = listeners[0].socket.getsockname()[1]
            argv: Callable[[Leaf], list[str]] = lambda leaf: [  # noqa: E731
                "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                "-cert", str(leaf.cert), "-key", str(leaf.key),
                "-CAfile", str(world.pki.ca_file), "-verify_return_error", "-ign_eof",
            ]  # fmt: skip
            proc = await trio.run_process(
                argv(world.starter), stdin=b"", capture_stdout=True, capture_stderr=True
            )
            out = proc.stdout.decode()
            assert "Verify return code: 0 (ok)" in out
            assert "TLSv1.3" in out
            assert "hello from the broker" in out
            foreign = await trio.run_process(
                argv(world.foreign), stdin=b"", capture_stdout=True, capture_stderr=True,
                check=False,
            )  # fmt: skip
            assert b"hello from the broker" not in foreign.stdout
            nursery.cancel_scope.cancel()
    assert seen == ["exec-1"]
