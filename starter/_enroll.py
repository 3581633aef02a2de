"""``stj starter --join BROKER:PORT --token T``: a new execute host joins the pool.

One TLS connection without a client certificate; the broker's certificate is not checked by
TLS (nothing to check it against yet) but by ``common.StarterEnrollment`` against the CA that
the token pins (its SHA-256), before the token's secret is sent. The broker answers with a
certificate for the key made here; the key never leaves this host. The result goes to the
starter's ``pki_dir``, and the broker's address to ``<state>/broker.addr`` for later starts.
"""

from __future__ import annotations

import logging
import pathlib

import trio

from ssh_to_job import common, transport, wire

log = logging.getLogger("stj.starter")


class JoinFailed(Exception):
    """Enrolment did not complete; the message is one line for the admin."""


async def join(
    address: str, token_text: str, name: str, pki_dir: pathlib.Path, within: float
) -> common.StarterPki:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise JoinFailed(f"--join wants BROKER:PORT, not {address!r}")
    try:
        token = common.parse_token(token_text)
        me = common.StarterEnrollment(token, name)
    except (common.TokenError, ValueError) as exc:
        raise JoinFailed(str(getattr(exc, "message", exc))) from None
    try:
        stream, _ = await transport.connect_tls(
            host.strip("[]"),
            int(port),
            transport.enrollment_context(),
            pool_id=None,
            handshake_timeout=within,
        )
    except (OSError, transport.TlsRefused) as exc:
        raise JoinFailed(f"cannot reach the broker at {address}: {exc}") from None
    decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME)

    async def say(msg: object) -> None:
        await stream.send_all(wire.encode_frame(common.encode_enroll(msg)))  # type: ignore[arg-type]

    async def hear() -> object:
        while not isinstance(payload := decoder.next_frame(), bytes):
            if payload is wire.CLOSED:
                raise JoinFailed("the broker closed the connection (enrolment disabled?)")
            decoder.receive_data(bytes(await stream.receive_some(65536)))
        return common.decode_enroll(payload)

    try:
        with trio.fail_after(within):
            await say(me.hello())
            await say(me.on_ca(await hear(), transport.peer_certificate_der(stream)))
            done = me.on_reply(await hear())
    except common.EnrollError as exc:
        raise JoinFailed(exc.message) from None
    except trio.TooSlowError:
        raise JoinFailed(f"the broker at {address} did not answer within {within:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise JoinFailed(f"connection to the broker broke: {exc}") from None
    except wire.RemoteProtocolError as exc:
        raise JoinFailed(f"the broker sent something unexpected: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)
    return common.StarterPki.save(pki_dir, done.key, done.certificate, done.ca_certs)
