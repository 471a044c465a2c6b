"""The SMTP transport's send deadline, against a real aiosmtpd server that stalls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from opensequence.mail.errors import TransientSendError
from opensequence.mail.message import Outgoing
from opensequence.mail.transports.smtp import SmtpTransport
from tests.engine.sink import Sink, SinkServer


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
