"""``smtp://``: aiosmtplib with a small pool of open connections.

Opening an SMTP session (TCP, greeting, EHLO, STARTTLS, AUTH) costs several round trips, so
connections are reused across messages. A message the server refuses (4xx/5xx to MAIL, RCPT or
DATA) is followed by RSET and the connection goes back to the pool; after any other error it is
closed, its protocol state being unknown. aiosmtplib's exceptions are mapped here to the two
kinds the retry policy knows (4xx and network trouble → transient, 5xx → permanent).

``timeout`` bounds opening a connection and, separately, each attempt at a send as a whole
(MAIL, RCPT, DATA and the message); a message is tried a second time, on a new session, only
when a reused session turns out to be over before its content went out (see
:meth:`SmtpTransport.send`). The send deadline is kept by one watchdog per pool rather than by
a timer around every SMTP command, which cost ~18 us of the event loop per message: a connection
still busy past its deadline is closed, its pending command fails, and the send is reported
as a timeout (transient).

aiosmtplib opens each session (TCP or TLS, greeting, EHLO, STARTTLS, AUTH). The messages then
go over the same connection through :class:`_Session`, a small protocol that the connection's
transport is handed to (asyncio's ``set_protocol``): MAIL, RCPT, DATA and the message, one
command outstanding at a time as aiosmtplib sends them or, to a server that announces
PIPELINING (RFC 2920; Postfix and Exim do by default), MAIL, RCPT and DATA in one
write. The session writes each of them from the callback that reads the reply before it, so the
sending task wakes once per message rather than once per command: 3,000 messages over 20
connections to a loopback sink took a median of 69 us of client CPU each this way against 76 us
with a wake-up per reply (30 runs of each).
aiosmtplib's path per command (a lock, a timeout wrapper, a new future and a reply object per
reply, a control-character scan of the arguments, two regular-expression passes over the
message for line ends and dot-stuffing) cost the event loop ~35 us more per message: 182-218 us
of CPU each through it, 146-177 us through the session (the same run, on a slower day).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from typing import Any

import aiosmtplib
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH

from opensequence.mail.errors import PermanentSendError, SendError, TransientSendError
from opensequence.mail.message import Outgoing
from opensequence.validation import is_seed_email

log = logging.getLogger(__name__)

# The pause after a session failed to open, doubling to the longest while they keep failing
# (see SmtpTransport._open).
OPEN_PAUSE_SECONDS = 1.0
OPEN_PAUSE_MAX_SECONDS = 10.0
# How long an idle session may wait for its next message: servers end idle sessions (Postfix
# after 10 s when under stress), and a connection dropped without a word held a send to its
# deadline. Older ones are closed and a new session opened instead, a handshake.
IDLE_SESSION_SECONDS = 10.0
# The longest a closing transport waits for the answer to its QUIT (a courtesy to the server:
# every message is answered by then) before it drops the connection.
QUIT_SECONDS = 5.0


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
        self._idle: list[_Session] = []
        self._slots = asyncio.Semaphore(pool_size)
        self._deadlines: dict[_Session, float] = {}
        self._expired: set[_Session] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # No new session before this loop time, after one failed to open (see _open).
        self._closed_until = 0.0
        self._closed_reason = ""
        self._pause = 0.0

    async def _connect(self) -> _Session:
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
        if client.transport is None:  # closed by the server right after the handshake
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        return _Session(client)

    async def send(self, outgoing: Outgoing) -> None:
        """Send over an idle session, or a new one. A reused session that the server turns out
        to have given up on before this message's content went out (closed, silent, or a
        ``421`` to MAIL: servers end sessions idle for a while or after so many messages) is
        replaced, and the message tried once more on a new session at once: reported as a
        transient failure, it waited out a retry delay (a minute at first) for nothing.
        Once the content has been written the server may have taken it, so such a failure is
        the message's (a resend could be a duplicate)."""
        async with self._slots:
            session = self._reusable()
            if session is not None:
                try:
                    await self._send_on(session, outgoing, reused=True)
                    return
                except _Stale:
                    pass
            await self._send_on(await self._open(), outgoing, reused=False)

    def _reusable(self) -> _Session | None:
        """The most recently used idle session that is still open and has been idle for at most
        :data:`IDLE_SESSION_SECONDS`; older ones are retired on the way (a connection a NAT or
        the server dropped without a word would hold the send to its deadline)."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            session = self._idle.pop()
            if now - session.idle_since <= IDLE_SESSION_SECONDS and session.connected:
                return session
            session.retire()
        return None

    async def _send_on(self, session: _Session, outgoing: Outgoing, *, reused: bool) -> None:
        try:
            await self._sendmail(session, outgoing)
        except _Refused as refused:
            # This message was refused; the connection is reset and carries the next one
            # (reconnecting after every bounce would cost a handshake each).
            self._park(session)
            raise classify(refused.reply) from refused.reply
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            session.close()
            if reused and not session.content_written and _session_ended(exc):
                log.info(
                    "SMTP session to %s:%d was over (%s); sending on a new one",
                    self.host,
                    self.port,
                    exc,
                )
                raise _Stale from exc
            raise classify(exc) from exc
        except BaseException:
            session.close()  # cancelled mid-message: where the session stands is unknown
            raise
        self._park(session)

    def _park(self, session: _Session) -> None:
        session.idle_since = asyncio.get_running_loop().time()
        self._idle.append(session)

    async def _open(self) -> _Session:
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

    async def _sendmail(self, session: _Session, outgoing: Outgoing) -> None:
        loop = asyncio.get_running_loop()
        self._deadlines[session] = loop.time() + self.timeout
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch())
        try:
            await _transaction(session, outgoing)
        except aiosmtplib.SMTPServerDisconnected as exc:
            if session in self._expired:
                raise aiosmtplib.SMTPTimeoutError(f"no reply within {self.timeout:g} s") from exc
            raise
        finally:
            del self._deadlines[session]
            self._expired.discard(session)

    async def _watch(self) -> None:
        """Close the connections whose send is past its deadline, while any send is running."""
        loop = asyncio.get_running_loop()
        period = min(max(self.timeout / 10, 0.01), 1.0)
        while self._deadlines:
            await asyncio.sleep(period)
            now = loop.time()
            for session, deadline in list(self._deadlines.items()):
                if deadline <= now and session not in self._expired:
                    self._expired.add(session)
                    session.close()

    async def aclose(self) -> None:
        """QUIT on every idle connection at once, each dropped if its answer does not come
        within :data:`QUIT_SECONDS` (or the send timeout, if shorter); returns once all are
        closed. One after another, each waiting up to the send timeout, a worker stopping
        while its server had gone silent took the timeout times the pool (20 x 30 s with the
        defaults) to exit, and was killed long before."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(session) for session in idle))

    async def _quit(self, session: _Session) -> None:
        """QUIT, and the connection closed, within the bound; else (a server that answers but
        never closes: a TLS close waits up to 30 s for its peer) or on cancellation, dropped."""
        try:
            async with asyncio.timeout(min(self.timeout, QUIT_SECONDS)):
                await session.quit()
                await session.wait_closed()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            session.close()
            await session.wait_closed()
        except BaseException:
            session.close()
            raise


async def _transaction(session: _Session, outgoing: Outgoing) -> None:
    """MAIL, RCPT and DATA for one message on an open session.

    ``sendmail`` parses each envelope address twice with ``email.utils`` and normalises the
    message twice (once only to announce its SIZE, which is optional): ~35 us per message.
    Addresses the intake pattern admits (plain ASCII ``local@domain``) go out directly
    instead; anything else is left to aiosmtplib's ``sendmail`` (quoting, SMTPUTF8)."""
    sender, recipient = outgoing.sender, outgoing.recipient
    if not (is_seed_email(sender) and is_seed_email(recipient)):
        await session.sendmail(sender, recipient, outgoing.data)
        return
    try:
        stage, code, text = await session.transaction(sender, recipient, outgoing.data)
        if stage == _MESSAGE and code == aiosmtplib.SMTPStatus.completed:
            return
        if stage == _MAIL:
            raise aiosmtplib.SMTPSenderRefused(code, text, sender)
        if stage == _RCPT:
            raise aiosmtplib.SMTPRecipientRefused(code, text, recipient)
        raise aiosmtplib.SMTPDataError(code, text)
    except aiosmtplib.SMTPResponseException as refused:
        if refused.code == aiosmtplib.SMTPStatus.domain_unavailable or not session.connected:
            raise  # a 421 closes the connection; a reply out of step closed it
        # The refusal is the message's outcome whatever RSET gets: a 4xx must stay a retry
        # and a 5xx a bounce. Only the connection's fate depends on it (the caller drops it).
        try:
            code, text = await session.command(b"RSET\r\n")
        except (aiosmtplib.SMTPException, OSError) as failed:
            raise refused from failed
        if code < 400 and code != aiosmtplib.SMTPStatus.completed:
            # 354 to RSET: the server was answering DATA, so the refusal answered another
            # command (one had two replies). Not the message's bounce; the session is dropped.
            session.close()
            raise aiosmtplib.SMTPResponseException(
                -1, f"Reply out of step: {code} {text} to RSET"
            ) from refused
        if code != aiosmtplib.SMTPStatus.completed:
            raise
        raise _Refused(refused) from refused


_BARE_LINE_END = re.compile(rb"\r\n|\n|\r")

# The stages of a message's transaction (see _Session.transaction), and the replies that let
# each one before the message go on to the next.
_MAIL, _RCPT, _DATA, _MESSAGE = range(4)
_GOES_ON = (
    frozenset({aiosmtplib.SMTPStatus.completed}),
    frozenset({aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward}),
    frozenset({aiosmtplib.SMTPStatus.start_input}),
)


def data_lines(message: bytes) -> bytes:
    """The message as DATA carries it: CRLF line ends (a bare CR or LF becomes one), a line
    that starts with "." doubled, a CRLF at the end, then the ending "." line. The same bytes as
    aiosmtplib's ``execute_data_command`` writes (a property test holds the two), with a
    regular expression only when a line end is not CRLF, which the engine's messages never
    have (:func:`opensequence.mail.message.build_message`)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _BARE_LINE_END.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class _Session(asyncio.Protocol):
    """An SMTP session that aiosmtplib opened, carrying messages (see the module docstring).

    :meth:`command` writes one command and waits for its reply, a line ``NNN text`` after any
    number of ``NNN-text`` lines. :meth:`transaction` writes a message's MAIL, RCPT and DATA
    one after the other as their replies come in or, when the server announced PIPELINING
    (RFC 2920), all three at once; the message itself only once all three were accepted. A
    reply nobody waits for (a 421 sent to an idle connection before the server closes it), a
    malformed or oversized one, more replies than the commands written, or a positive one
    where that command's success is another (250 to DATA, which was taken for a refusal and
    answered with RSET before PIPELINING): the session is out of step with the server and is
    closed, and the pool opens a new one in its place. The first of several replies answers a
    command that ends the exchange; a message whose MAIL, RCPT or DATA got several is not sent
    (a transient failure), nor failed for a refusal that may have answered another command.

    Messages whose addresses need aiosmtplib's quoting go through its ``sendmail``: the
    transport is handed back to aiosmtplib's protocol for that transaction."""

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self._client = client
        transport = client.transport
        assert transport is not None  # checked by SmtpTransport._connect
        self._transport: Any = transport
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, int, str]] | None = None
        # Whether the server takes MAIL, RCPT and DATA in one write (see transaction).
        self.pipelining = client.supports_extension("pipelining")
        # The exchange under way (see _exchange): what it writes, one write per group of
        # commands; after how many replies in all each group is answered; the group being
        # answered; how many replies came; and a refusal whose group still has replies to come.
        self._writes: tuple[bytes, ...] = ()
        self._ends: tuple[int, ...] = ()
        self._group = 0
        self._stage = 0
        self._refused: tuple[int, int, str] | None = None
        # Whether the last message's content (after DATA) may have reached the server (see
        # SmtpTransport.send), and since when the session has been idle in its pool.
        self.content_written = False
        self.idle_since = 0.0
        self._lost = False
        # Done once the connection is closed (connection_lost), see wait_closed.
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        transport.set_protocol(self)

    @property
    def connected(self) -> bool:
        return not self._lost and not self._transport.is_closing()

    def close(self) -> None:
        """Drop the connection now, whatever is still unwritten: a server that stopped
        reading would otherwise hold a ``close()`` (and the send waiting on it) for good."""
        self._lost = True
        self._transport.abort()

    def retire(self) -> None:
        """End the session with QUIT, without waiting for the answer, and close the connection
        now: the server sees a session ended rather than a lost connection, and the connection
        no longer counts against a provider's cap on connections per client (one that held
        its place while a QUIT was answered, beside the new session opened in its stead, made
        twice the pool for a moment, and the new ones were refused). A QUIT that cannot be
        written within :data:`QUIT_SECONDS` (a peer gone silent) is dropped."""
        if not self.connected:
            self.close()
            return
        self._lost = True
        self._transport.write(b"QUIT\r\n")
        self._transport.close()
        asyncio.get_running_loop().call_later(QUIT_SECONDS, self._transport.abort)

    async def quit(self) -> None:
        """QUIT, then close once it is answered (see :meth:`close` for when it is not)."""
        await self.command(b"QUIT\r\n")
        self._transport.close()

    async def wait_closed(self) -> None:
        """Until the connection is closed: its socket is closed by a callback of the event
        loop, which a loop ending right after ``aclose`` would never run. Shielded: a caller's
        cancellation (a timeout around it) must not cancel the future every later wait reads."""
        await asyncio.shield(self._closed)

    async def command(self, line: bytes) -> tuple[int, str]:
        """Write ``line`` (a command) and return the reply's code and text."""
        _, code, text = await self._exchange((line,), (1,))
        return code, text

    async def transaction(self, sender: str, recipient: str, data: bytes) -> tuple[int, int, str]:
        """MAIL, RCPT, DATA and the message (plain ASCII addresses, see :func:`_transaction`).
        Returns the stage (``_MAIL`` … ``_MESSAGE``), code and text of the reply that ended it:
        the message's, or the first refusal.

        Each command is written by :meth:`data_received` as soon as the reply to the one before
        lets the transaction go on (:data:`_GOES_ON`); the sending task wakes once, to the reply
        that ended it. With PIPELINING, MAIL, RCPT and DATA go out in one write and the message
        once all three are accepted: two round trips a message instead of four, which over a
        link of 30 ms to the provider is 60 ms less per message and connection. A refusal
        among the three is the outcome once the others are answered too (the server answers
        every command of the group: typically 503 or 554 to the DATA after a refused RCPT), so
        the session stays in step for RSET and the next message. A server that takes DATA
        (354) after refusing MAIL or RCPT would wait for the message: the session is dropped
        instead, nothing of the message having been written."""
        self.content_written = False
        mail = f"MAIL FROM:<{sender}>\r\n".encode("ascii")
        rcpt = f"RCPT TO:<{recipient}>\r\n".encode("ascii")
        if self.pipelining:
            return await self._exchange((mail + rcpt + b"DATA\r\n", data_lines(data)), (3, 4))
        return await self._exchange((mail, rcpt, b"DATA\r\n", data_lines(data)), (1, 2, 3, 4))

    async def _exchange(
        self, writes: tuple[bytes, ...], ends: tuple[int, ...]
    ) -> tuple[int, int, str]:
        """Write ``writes[0]`` and each next one once the replies before it let the exchange go
        on; ``ends[i]``: how many replies in all answer the writes up to ``writes[i]``."""
        if not self.connected:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._writes, self._ends, self._group, self._stage = writes, ends, 0, 0
        self._refused = None
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self._transport.write(writes[0])
        try:
            return await waiter
        finally:
            # Not kept until the next exchange: an idle session would hold its last message.
            self._waiter, self._writes = None, ()

    async def sendmail(self, sender: str, recipient: str, data: bytes) -> None:
        client = self._client
        assert client.protocol is not None
        self.content_written = True  # aiosmtplib's stages are not followed: assume the worst
        self._transport.set_protocol(client.protocol)
        try:
            await client.sendmail(sender, [recipient], data)
        finally:
            if self._transport.is_closing():
                # Lost while aiosmtplib's protocol had it, which may have been told instead.
                self._lost = True
                if not self._closed.done():
                    self._closed.set_result(None)
            self._transport.set_protocol(self)

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._fail(aiosmtplib.SMTPResponseException(-1, "unexpected data from the server"))
            return
        buffer = self._buffer
        buffer += data
        if len(buffer) > MAX_RESPONSE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        lines: list[bytes] = []
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            line = bytes(buffer[start : end + 1])
            start = end + 1
            if len(line) > MAX_LINE_LENGTH or not line[:3].isdigit():
                reason = "Response too long" if len(line) > MAX_LINE_LENGTH else "Malformed"
                self._fail(aiosmtplib.SMTPResponseException(-1, f"{reason}: {line[:80]!r}"))
                return
            lines.append(line)
            if line[3:4] == b"-":
                continue
            text = "\n".join(
                each[4:].strip(b" \t\r\n").decode("utf-8", "replace") for each in lines
            )
            lines = []
            del buffer[:start]
            start = 0
            if not self._take(waiter, int(line[:3]), text, more=bool(buffer)):
                buffer.clear()
                return

    def _take(
        self, waiter: asyncio.Future[tuple[int, int, str]], code: int, text: str, *, more: bool
    ) -> bool:
        """One reply of the exchange; whether the exchange waits for more (the rest of its
        group's replies, or those to the write this one let go out). ``more``: the server
        wrote something after it. Past the last reply the exchange waits for, that would be
        taken for the next command's: a reply that ends the exchange answers it, and the
        session is closed; one that would go on fails the exchange first."""
        stage = self._stage
        self._stage = stage + 1
        answered = self._stage == self._ends[self._group]  # the last reply of its group
        refused = self._refused
        if refused is not None:
            # A later command of the group whose first refusal is ``refused``: its reply is a
            # refusal too (503 to a DATA after a refused RCPT), or the server's 354 to DATA
            # all the same (it would wait for the message: none is written), or a 421.
            if code < 400 and not (stage == _DATA and code == aiosmtplib.SMTPStatus.start_input):
                # 250 to DATA: the replies are out of step with the commands, and the refusal
                # may well have answered another one (a false bounce would suppress the address).
                return self._out_of_step(waiter, f"Reply out of step: {code} {text}")
            if answered and more:
                return self._out_of_step(waiter, "More than one reply")
            if code in (
                aiosmtplib.SMTPStatus.start_input,
                aiosmtplib.SMTPStatus.domain_unavailable,
            ):
                self.close()
            elif not answered:
                return True
            waiter.set_result(refused)
            return False
        last = self._ends[-1]
        if self._stage < last and code in _GOES_ON[stage]:
            if not answered:
                return True
            if more:
                return self._out_of_step(waiter, "More than one reply")
            self._group += 1
            if self._stage == _MESSAGE:
                self.content_written = True
            self._transport.write(self._writes[self._group])
            return True
        if self._stage < last and code < 400:
            # Positive, yet not what this command's success is (250 to DATA): the replies are
            # out of step with the commands, one before having had two.
            return self._out_of_step(waiter, f"Reply out of step: {code} {text}")
        if answered or code == aiosmtplib.SMTPStatus.domain_unavailable:
            # The exchange's last reply, a 421 (the server closes: nothing else comes), or a
            # refusal answering the last command written.
            if more:
                if self._stage < last and code != aiosmtplib.SMTPStatus.domain_unavailable:
                    # A refusal of MAIL, RCPT or DATA with a reply after it: one of the
                    # commands may have had two, and the refusal answered another command.
                    return self._out_of_step(waiter, "More than one reply")
                self.close()
            waiter.set_result((stage, code, text))
            return False
        self._refused = (stage, code, text)  # the rest of its group is answered first
        return True

    def _out_of_step(self, waiter: asyncio.Future[tuple[int, int, str]], reason: str) -> bool:
        """The replies no longer pair with the commands: the session is closed and the
        exchange fails (transient), nothing more of it written."""
        self.close()
        waiter.set_exception(aiosmtplib.SMTPResponseException(-1, reason))
        return False

    def eof_received(self) -> bool:
        # Fails the reply now: connection_lost comes only once what is being written has
        # drained, never if the server stopped reading as it hung up.
        self.close()
        self._end(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._closed.done():
            self._closed.set_result(None)
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._end(lost)

    def _fail(self, exc: Exception) -> None:
        """Output that is no SMTP reply (garbled, oversized, unasked for): the session is closed
        and the exchange under way fails with ``exc``, whatever it was refused before (that
        reply came from a server out of step)."""
        self.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _end(self, exc: Exception) -> None:
        """The connection ended: the exchange under way, if any, ends with ``exc``, or with the
        refusal the server wrote before the rest of its group's replies (see
        :meth:`transaction`), which is the message's outcome however the rest goes."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._refused is not None:
            waiter.set_result(self._refused)
        else:
            waiter.set_exception(exc)


def _session_ended(exc: BaseException) -> bool:
    """Whether a failure says the session is over rather than anything about the message: the
    connection lost or reset, no answer within the deadline, or ``421`` (the server closing
    the session)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == aiosmtplib.SMTPStatus.domain_unavailable
    ended = aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError | OSError | TimeoutError
    return isinstance(exc, ended)


class _Stale(Exception):
    """A reused session turned out to be over before the message's content went out."""


class _Refused(Exception):
    """The server refused one message and took RSET: its connection is fit for the next."""

    def __init__(self, reply: aiosmtplib.SMTPResponseException) -> None:
        super().__init__(str(reply))
        self.reply = reply
