"""``smtp://``: aiosmtplib with a small pool of open connections.

Opening an SMTP session (TCP, greeting, EHLO, STARTTLS, AUTH) costs several round trips, so
connections are reused across messages. A connection that saw any error is closed rather than
returned: its protocol state is unknown. aiosmtplib's exceptions are mapped here to the two kinds
the retry policy knows (4xx and network trouble → transient, 5xx → permanent).
"""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib

from opensequence.mail.errors import PermanentSendError, SendError, TransientSendError
from opensequence.mail.message import Outgoing


def classify(exc: BaseException) -> SendError:
    """The retry-policy view of an aiosmtplib (or socket) failure."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 0:
        text = " ".join(str(exc.message).split())
        reason = f"{exc.code} {text}".strip()
        if 500 <= exc.code < 600:
            if isinstance(exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError):
                return PermanentSendError(f"bounced: {reason}")
            return PermanentSendError(f"rejected: {reason}", bounce=False)
        return TransientSendError(reason)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return TransientSendError(f"timeout: {exc}")
    return TransientSendError(f"{type(exc).__name__}: {exc}")


class SmtpTransport:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        tls: str,
        pool_size: int = 10,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.tls = tls
        self.timeout = timeout
        self.tls_context = tls_context
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(pool_size)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            use_tls=self.tls == "tls",
            start_tls=self.tls == "starttls",
            tls_context=self.tls_context,
            timeout=self.timeout,
        )
        await client.connect()
        return client

    async def send(self, outgoing: Outgoing) -> None:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                await client.sendmail(outgoing.sender, [outgoing.recipient], outgoing.data)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if client is not None:
                    client.close()
                raise classify(exc) from exc
            self._idle.append(client)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
