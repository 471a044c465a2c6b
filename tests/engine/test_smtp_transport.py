"""The SMTP transport's send deadline, against a real aiosmtpd server that stalls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from opensequence.mail.errors import PermanentSendError, TransientSendError
from opensequence.mail.message import Outgoing
from opensequence.mail.transports import smtp as smtp_module
from opensequence.mail.transports.smtp import SmtpTransport
from tests.engine.sink import Sink, SinkServer, free_port


class StallingSink(Sink):
    """Holds its answer to the first DATA for ``stall`` seconds; answers the rest at once."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall
        self.stalled = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.stalled:
            self.stalled = True
            await asyncio.sleep(self.stall)
        return await super().handle_DATA(server, session, envelope)


def outgoing(n: int) -> Outgoing:
    data = (
        f"From: a@example.com\r\nTo: p{n}@example.org\r\nSubject: {n}\r\n\r\nbody {n}\r\n"
    ).encode()
    return Outgoing("a@example.com", f"p{n}@example.org", data)


def transport(server: SinkServer, timeout: float) -> SmtpTransport:
    return SmtpTransport(
        host="127.0.0.1",
        port=server.port,
        username=None,
        password=None,
        tls="none",
        pool_size=1,
        timeout=timeout,
    )


async def test_a_send_past_its_deadline_is_a_transient_timeout_and_its_connection_is_dropped():
    with SinkServer(StallingSink(stall=5.0)) as server:
        smtp = transport(server, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TransientSendError, match=r"^timeout: no reply within 0\.5 s"):
            await smtp.send(outgoing(1))
        # The deadline (plus at most a tenth of it for the watchdog's tick), not the stall.
        assert time.monotonic() - started < 2.0
        await smtp.send(outgoing(2))
        await smtp.aclose()
        assert [m["Subject"] for m in server.sink.received] == ["2"]


async def test_a_slow_send_within_its_deadline_is_not_cut_off():
    with SinkServer(StallingSink(stall=0.6)) as server:
        smtp = transport(server, timeout=3.0)
        await smtp.send(outgoing(1))
        await smtp.send(outgoing(2))
        await smtp.aclose()
        assert [m["Subject"] for m in server.sink.received] == ["1", "2"]


class RefusingSink(Sink):
    """Refuses the recipients in ``refused`` at RCPT and the first DATA when ``refuse_data``;
    records which client connection (its address) carried each recipient."""

    def __init__(self, refused: set[str], refuse_data: bool = False) -> None:
        super().__init__()
        self.refused = refused
        self.refuse_data = refuse_data
        self.peers: list[Any] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.peers.append(session.peer)
        if address in self.refused:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse_data:
            self.refuse_data = False
            return "554 5.7.1 rejected"
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("pipelining", [False, True], ids=["one command at a time", "pipelined"])
async def test_a_refused_message_leaves_its_connection_usable_for_the_next(pipelining: bool):
    """Pipelined, the refused RCPT's DATA went out with it and aiosmtpd answered it 503: the
    refusal is still the outcome, and RSET keeps the connection."""
    sink = RefusingSink(refused={"p2@example.org"}, refuse_data=True)
    with SinkServer(sink, pipelining=pipelining) as server:
        smtp = transport(server, timeout=5.0)
        with pytest.raises(PermanentSendError, match=r"^bounced: 554 5\.7\.1"):
            await smtp.send(outgoing(1))  # refused after DATA
        with pytest.raises(PermanentSendError, match=r"^bounced: 550 5\.1\.1"):
            await smtp.send(outgoing(2))  # refused at RCPT
        await smtp.send(outgoing(3))
        await smtp.send(outgoing(4))
        await smtp.aclose()
    assert [m["Subject"] for m in sink.received] == ["3", "4"]
    # One connection all along: the refusals were answered with RSET, not a reconnect.
    assert len(sink.peers) == 4 and len(set(sink.peers)) == 1


def _authenticating_server(sink: Sink, logins: list[bytes] | None = None) -> tuple[Controller, int]:
    """A server that takes only user/right, and wants it before MAIL (530 otherwise); the
    passwords it was given go into ``logins``."""

    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if logins is not None:
            logins.append(data.password)
        ok = (data.login, data.password) == (b"user", b"right")
        return AuthResult(success=ok, handled=False)

    port = free_port()
    controller = Controller(
        sink,
        hostname="127.0.0.1",
        port=port,
        authenticator=check,
        auth_required=True,
        auth_require_tls=False,
    )
    return controller, port


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # loopback
@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [
        ("user", "wrong", r"^no SMTP session: 535 5\.7\.8 "),  # AUTH refused
        (None, None, r"^530 5\.7\.0 "),  # MAIL without AUTH
    ],
)
async def test_a_login_the_server_refuses_is_transient(
    username: str | None, password: str | None, reason: str
) -> None:
    """A wrong or missing password is our configuration, not the message's fault: it failed
    every due send for good (a 5xx), and fixing the password afterwards sent nothing."""
    sink = Sink()
    controller, port = _authenticating_server(sink)
    controller.start()
    try:
        refused = SmtpTransport(
            host="127.0.0.1", port=port, username=username, password=password, tls="none"
        )
        with pytest.raises(TransientSendError, match=reason):
            await refused.send(outgoing(1))
        await refused.aclose()
        fixed = SmtpTransport(
            host="127.0.0.1", port=port, username="user", password="right", tls="none"
        )
        await fixed.send(outgoing(2))
        await fixed.aclose()
    finally:
        controller.stop()
    assert [m["Subject"] for m in sink.received] == ["2"]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # loopback
async def test_after_a_session_fails_to_open_none_is_tried_for_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each send of a batch opened its own session: behind a wrong password, a queue retrying
    for a day made the server see a failed login per send and attempt."""
    monkeypatch.setattr(smtp_module, "OPEN_PAUSE_SECONDS", 60.0)  # longer than this test
    monkeypatch.setattr(smtp_module, "OPEN_PAUSE_MAX_SECONDS", 60.0)
    logins: list[bytes] = []
    controller, port = _authenticating_server(Sink(), logins)
    controller.start()
    try:
        smtp = SmtpTransport(
            host="127.0.0.1", port=port, username="user", password="wrong", tls="none"
        )
        with pytest.raises(TransientSendError, match=r"^no SMTP session: 535"):
            await smtp.send(outgoing(0))
        one_session = len(logins)  # aiosmtplib tries each AUTH mechanism the server offers
        assert one_session >= 1
        for n in range(1, 5):
            with pytest.raises(TransientSendError, match=r"\(no new session for 60 s\)$"):
                await smtp.send(outgoing(n))
        assert len(logins) == one_session
        monkeypatch.setattr(smtp, "_closed_until", 0.0)  # the pause is over
        with pytest.raises(TransientSendError, match=r"^no SMTP session: 535"):
            await smtp.send(outgoing(5))
        assert len(logins) == 2 * one_session
        await smtp.aclose()
    finally:
        controller.stop()
