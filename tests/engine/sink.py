"""A real SMTP server (aiosmtpd) on loopback that records what it accepted and can be told to
answer 4xx/5xx (DESIGN rule 7)."""

from __future__ import annotations

import email
import email.policy
import socket
import threading
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sink:
    """``answer(n)`` gives the reply to the n-th DATA (0-based); ``None`` accepts."""

    def __init__(self, answer: Callable[[int], str | None] | None = None) -> None:
        self.answer = answer
        self.received: list[EmailMessage] = []
        self.raw: list[bytes] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.attempts = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            attempt = self.attempts
            self.attempts += 1
        reply = self.answer(attempt) if self.answer else None
        if reply is not None:
            return reply
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.received.append(message)  # type: ignore[arg-type]
            self.raw.append(envelope.original_content or envelope.content)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


class Pipelining:
    """A handler's server that announces PIPELINING (RFC 2920) in its EHLO reply, as Postfix's
    and Exim's do: aiosmtpd reads commands in order however many arrive at once, but does not
    announce it. Every other hook is the wrapped handler's."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def __dir__(self) -> list[str]:  # aiosmtpd finds the hooks through dir()
        return sorted({*super().__dir__(), *dir(self._handler)})

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class SinkServer:
    def __init__(self, sink: Sink, *, pipelining: bool = False) -> None:
        self.sink = sink
        self.port = free_port()
        handler: Any = Pipelining(sink) if pipelining else sink
        self.controller = Controller(handler, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?tls=none"

    def __enter__(self) -> SinkServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()
