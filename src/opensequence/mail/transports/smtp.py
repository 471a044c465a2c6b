"""``smtp://``: aiosmtplib with a small pool of open connections.

Opening an SMTP session (TCP, greeting, EHLO, STARTTLS, AUTH) costs several round trips, so
connections are reused across messages. A message the server refuses (4xx/5xx to MAIL, RCPT or
DATA) is followed by RSET and the connection goes back to the pool; after any other error it is
closed, its protocol state being unknown. aiosmtplib's exceptions are mapped here to the two
kinds the retry policy knows (4xx and network trouble → transient, 5xx → permanent).

``timeout`` bounds opening a connection and, separately, each send as a whole (MAIL, RCPT, DATA
and the message). The send deadline is kept by one watchdog per pool rather than by a timer
around every SMTP command, which cost ~18 us of the event loop per message: a connection
still busy past its deadline is closed, its pending command fails, and the send is reported
as a timeout (transient).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import aiosmtplib

from opensequence.mail.errors import PermanentSendError, SendError, TransientSendError
from opensequence.mail.message import Outgoing
from opensequence.validation import is_seed_email

# The pause after a session failed to open, doubling to the longest while they keep failing
# (see SmtpTransport._open).
OPEN_PAUSE_SECONDS = 1.0
OPEN_PAUSE_MAX_SECONDS = 10.0


def classify(exc: BaseException) -> SendError:
    """The retry-policy view of an aiosmtplib (or socket) failure."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 0:
        reason = _reply(exc)
        if exc.code == 530:
            # "Authentication required" (to MAIL FROM): our configuration, not the message.
            return TransientSendError(reason)
        if 500 <= exc.code < 600:
            if isinstance(exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError):
                return PermanentSendError(f"bounced: {reason}")
            return PermanentSendError(f"rejected: {reason}", bounce=False)
        return TransientSendError(reason)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return TransientSendError(f"timeout: {exc}")
    return TransientSendError(f"{type(exc).__name__}: {exc}")


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    """``550 5.1.1 no such mailbox``: the server's reply on one line."""
    return f"{exc.code} {' '.join(str(exc.message).split())}".strip()


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
        self._deadlines: dict[aiosmtplib.SMTP, float] = {}
        self._expired: set[aiosmtplib.SMTP] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # No new session before this loop time, after one failed to open (see _open).
        self._closed_until = 0.0
        self._closed_reason = ""
        self._pause = 0.0

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
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except BaseException:
            client.close()  # a session that did not open is not left open
            raise
        # From here on the send's deadline (see _watch) bounds the commands.
        client.timeout = None
        return client

    async def send(self, outgoing: Outgoing) -> None:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            if client is None or not client.is_connected:
                client = await self._open()
            try:
                await self._sendmail(client, outgoing)
            except _Refused as refused:
                # This message was refused; the connection is reset and carries the next one
                # (reconnecting after every bounce would cost a handshake each).
                assert client is not None
                self._idle.append(client)
                raise classify(refused.reply) from refused.reply
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                raise classify(exc) from exc
            self._idle.append(client)

    async def _open(self) -> aiosmtplib.SMTP:
        """A new session, or a transient error whatever the server answered: a 5xx to EHLO,
        STARTTLS or AUTH (``535`` for a wrong password) speaks of this server and our
        configuration, not of the message or its recipient, so it must not fail the send (it
        failed every due send of every campaign until the password was fixed).

        After a session fails to open, none is tried for a pause (:data:`OPEN_PAUSE_SECONDS`,
        doubling to :data:`OPEN_PAUSE_MAX_SECONDS` while it keeps failing): every send of a
        batch would otherwise try its own, and a queue retrying for a day behind a wrong
        password would make the server see a failed login per send and attempt, enough to lock
        the account."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._closed_until:
            wait = self._closed_until - loop.time()
            raise TransientSendError(f"{self._closed_reason} (no new session for {wait:.0f} s)")
        try:
            client = await self._connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 0:
                error: SendError = TransientSendError(f"no SMTP session: {_reply(exc)}")
            else:
                error = classify(exc)
            self._pause = min(max(self._pause * 2, OPEN_PAUSE_SECONDS), OPEN_PAUSE_MAX_SECONDS)
            self._closed_until = loop.time() + self._pause
            self._closed_reason = error.reason
            raise error from exc
        self._pause = 0.0
        return client

    async def _sendmail(self, client: aiosmtplib.SMTP, outgoing: Outgoing) -> None:
        loop = asyncio.get_running_loop()
        self._deadlines[client] = loop.time() + self.timeout
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch())
        try:
            await _transaction(client, outgoing)
        except aiosmtplib.SMTPServerDisconnected as exc:
            if client in self._expired:
                raise aiosmtplib.SMTPTimeoutError(f"no reply within {self.timeout:g} s") from exc
            raise
        finally:
            del self._deadlines[client]
            self._expired.discard(client)

    async def _watch(self) -> None:
        """Close the connections whose send is past its deadline, while any send is running."""
        loop = asyncio.get_running_loop()
        period = min(max(self.timeout / 10, 0.01), 1.0)
        while self._deadlines:
            await asyncio.sleep(period)
            now = loop.time()
            for client, deadline in list(self._deadlines.items()):
                if deadline <= now and client not in self._expired:
                    self._expired.add(client)
                    client.close()

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit(timeout=self.timeout)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()


async def _transaction(client: aiosmtplib.SMTP, outgoing: Outgoing) -> None:
    """MAIL, RCPT and DATA for one message on an open connection.

    ``sendmail`` parses each envelope address twice with ``email.utils`` and normalises the
    message twice (once only to announce its SIZE, which is optional): ~35 us per message.
    Addresses the intake pattern admits (plain ASCII ``local@domain``) go out directly
    instead; anything else is left to ``sendmail``."""
    sender, recipient = outgoing.sender, outgoing.recipient
    if not (is_seed_email(sender) and is_seed_email(recipient)):
        await client.sendmail(sender, [recipient], outgoing.data)
        return
    try:
        reply = await client.execute_command(b"MAIL", f"FROM:<{sender}>".encode("ascii"))
        if reply.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)
        reply = await client.execute_command(b"RCPT", f"TO:<{recipient}>".encode("ascii"))
        if reply.code not in (aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward):
            raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
        await client.data(outgoing.data)
    except aiosmtplib.SMTPResponseException as refused:
        if not client.is_connected:  # a 421 closes the connection
            raise
        await client.rset()  # anything but 250 raises, and the caller drops the connection
        raise _Refused(refused) from refused


class _Refused(Exception):
    """The server refused one message and took RSET: its connection is fit for the next."""

    def __init__(self, reply: aiosmtplib.SMTPResponseException) -> None:
        super().__init__(str(reply))
        self.reply = reply
