"""The SMTP transport's sessions once aiosmtplib has opened them (``smtp._Session``): replies
however the server writes them, servers that get out of step, TLS, dot-stuffing, and the
addresses that still go through aiosmtplib's ``sendmail``. Against real servers on loopback:
aiosmtpd, and for replies aiosmtpd cannot be made to write, a scripted one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from opensequence.cli.common import event_loop_factory
from opensequence.mail.errors import PermanentSendError, TransientSendError
from opensequence.mail.message import Outgoing
from opensequence.mail.transports import smtp as smtp_module
from opensequence.mail.transports.smtp import SmtpTransport
from tests.engine.sink import Sink, SinkServer, free_port


def outgoing(n: int, body: str | None = None, recipient: str | None = None) -> Outgoing:
    to = recipient or f"p{n}@example.org"
    text = body if body is not None else f"body {n}\r\n"
    data = f"From: a@example.com\r\nTo: p{n}@example.org\r\nSubject: {n}\r\n\r\n{text}".encode()
    return Outgoing("a@example.com", to, data)


def loopback(
    port: int,
    timeout: float = 5.0,
    pool_size: int = 1,
    *,
    tls: str = "none",
    tls_context: ssl.SSLContext | None = None,
) -> SmtpTransport:
    """A transport to a test server on 127.0.0.1 (in clear unless ``tls`` says otherwise)."""
    return SmtpTransport(
        host="127.0.0.1",
        port=port,
        username=None,
        password=None,
        tls=tls,
        pool_size=pool_size,
        timeout=timeout,
        tls_context=tls_context,
    )


# A scripted server: each command line (and each message, after DATA) gets the reply the test's
# ``answer`` returns, written in the pieces it lists, a few ms apart.


Answer = Callable[[bytes], list[bytes]]
# Last in an answer: the connection is closed (after the pieces before it, if any).
HANG_UP = b"<hang up>"


class Scripted:
    # Whether EHLO announces PIPELINING (see the ``pipelining`` fixture).
    pipelining = False

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.ended = 0  # connections whose client hung up or that the script ended
        self.messages: list[bytes] = []
        self.unfinished: list[bytes] = []  # what came of a message cut off by a hang-up
        self.commands: list[bytes] = []
        self.arrived = asyncio.Event()  # set at each command
        # Replies to the next DATA commands (then "354 go ahead"), each written at once or in
        # the pieces listed.
        self.go_aheads: list[bytes | list[bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []
        # Connections (numbered from 1) that answer nothing more, as one dropped by a NAT.
        self.muted: set[int] = set()
        self.quit_delays: dict[int, float] = {}  # by connection: before the answer to QUIT

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        writer.write(b"220 scripted ESMTP\r\n")
        # Whether MAIL, or MAIL or RCPT, of the transaction under way was refused.
        mail_refused = refused = False
        try:
            while line := await reader.readline():
                command = line.rstrip(b"\r\n").upper()
                self.commands.append(command)
                self.arrived.set()
                if number in self.muted:
                    continue
                if command.startswith(b"EHLO"):
                    extensions = b"250-PIPELINING\r\n" if self.pipelining else b""
                    pieces = [b"250-scripted\r\n" + extensions + b"250 8BITMIME\r\n"]
                elif command == b"DATA":
                    if self.go_aheads:
                        go_ahead = self.go_aheads.pop(0)
                    elif refused:  # as servers answer a pipelined DATA after a refusal
                        go_ahead = b"503 5.5.1 no valid recipients\r\n"
                    else:
                        go_ahead = b"354 go ahead\r\n"
                    refused = mail_refused = False
                    for piece in go_ahead if isinstance(go_ahead, list) else [go_ahead]:
                        writer.write(piece)
                        await writer.drain()
                        if isinstance(go_ahead, list):
                            await asyncio.sleep(0.001)
                    last = b"".join(go_ahead) if isinstance(go_ahead, list) else go_ahead
                    if not last.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1].startswith(b"354"):
                        continue  # refused: no message follows
                    message = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append(message)
                    pieces = self.answer(b"<message>")
                elif command == b"QUIT":
                    await asyncio.sleep(self.quit_delays.get(number, 0.0))
                    writer.write(b"221 bye\r\n")
                    break
                elif command.startswith(b"RCPT") and mail_refused:
                    pieces = [b"503 5.5.1 need MAIL command\r\n"]  # as servers answer
                else:
                    pieces = self.answer(command)
                    said = b"".join(pieces)[:1] in (b"4", b"5")
                    if command.startswith(b"MAIL"):
                        refused = mail_refused = said
                    elif command.startswith(b"RCPT"):
                        refused = refused or said
                    elif command == b"RSET":
                        refused = mail_refused = False
                hang_up = pieces[-1:] == [HANG_UP]
                for piece in pieces[:-1] if hang_up else pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.005)
                if hang_up:
                    break
        except asyncio.IncompleteReadError as cut:
            self.unfinished.append(cut.partial)
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            writer.close()


@asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[tuple[Scripted, int]]:
    server = Scripted(answer)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield server, port
    finally:
        listening.close()
        for writer in server.writers:
            writer.close()
            # Until its socket is closed: the test's loop ends right after this.
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await listening.wait_closed()


@pytest.fixture(params=[False, True], ids=["one command at a time", "pipelined"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Scripted servers announce PIPELINING, or not: the transport sends MAIL, RCPT and DATA in
    one write to those that do, one after the other to the others."""
    monkeypatch.setattr(Scripted, "pipelining", request.param)
    return bool(request.param)


def ok(command: bytes) -> list[bytes]:
    return [b"250 OK\r\n"]


async def send_two(
    answer: Answer,
    first_fails: tuple[type[Exception], str] | None = None,
    go_aheads: tuple[bytes, ...] = (),
) -> Scripted:
    """Messages 1 and 2 through a transport of one connection slot, the first failing as
    ``first_fails`` (the error's type and a pattern of its text) says, if given; the server
    answers the first DATA commands with ``go_aheads``. Returns the server, to count its
    connections and the messages it took."""
    async with scripted(answer) as (server, port):
        server.go_aheads.extend(go_aheads)
        smtp = loopback(port)
        if first_fails is None:
            await smtp.send(outgoing(1))
        else:
            kind, pattern = first_fails
            with pytest.raises(kind, match=pattern):
                await smtp.send(outgoing(1))
        await smtp.send(outgoing(2))
        await smtp.aclose()
    return server


@pytest.mark.usefixtures("pipelining")
async def test_replies_in_pieces_and_on_several_lines_are_read_whole() -> None:
    """A reply may arrive a few bytes at a time, and a line may continue (``250-``)."""

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"MAIL"):
            return [b"25", b"0 sender ", b"OK\r", b"\n"]
        if command.startswith(b"RCPT"):
            return [b"250-first\r\n", b"250-sec", b"ond\r\n250 third\r\n"]
        return [b"250 queued\r\n"]

    server = await send_two(answer)
    assert server.connections == 1 and len(server.messages) == 2


@pytest.mark.usefixtures("pipelining")
async def test_a_refusal_on_several_lines_bounces_with_all_of_them_and_keeps_the_session() -> None:
    def answer(command: bytes) -> list[bytes]:
        if command == b"RCPT TO:<P1@EXAMPLE.ORG>":
            return [b"550-5.1.1 no such mailbox\r\n550 5.1.1 see the postmaster\r\n"]
        return [b"250 OK\r\n"]

    server = await send_two(
        answer, first_fails=(PermanentSendError, r"^bounced: 550 5\.1\.1 no such mailbox ")
    )
    assert b"RSET" in server.commands
    assert server.connections == 1 and len(server.messages) == 1


@pytest.mark.usefixtures("pipelining")
async def test_two_replies_to_one_command_answer_it_and_end_the_session() -> None:
    """The second reply would be taken for the next command's: the first answers this one
    (the message was accepted), and the next message goes over a new session."""
    answers = iter([[b"250 queued\r\n250 and again\r\n"]])

    def answer(command: bytes) -> list[bytes]:
        if command == b"<message>":
            return next(answers, [b"250 queued\r\n"])
        return [b"250 OK\r\n"]

    server = await send_two(answer)
    assert server.connections == 2 and len(server.messages) == 2


@pytest.mark.parametrize(
    ("stage", "reply", "kind", "reason"),
    [
        (b"MAIL", b"451 4.3.0 try later\r\n", TransientSendError, r"^451 4\.3\.0 try later$"),
        (b"RCPT", b"550 5.1.1 unknown\r\n", PermanentSendError, r"^bounced: 550 5\.1\.1 unknown$"),
        (b"DATA", b"554 5.7.1 no\r\n", PermanentSendError, r"^bounced: 554 5\.7\.1 no$"),
        (b"<message>", b"452 4.3.1 full\r\n", TransientSendError, r"^452 4\.3\.1 full$"),
    ],
    ids=["MAIL", "RCPT", "DATA", "message"],
)
async def test_a_refusal_at_any_stage_is_the_messages_outcome_and_the_session_carries_the_next(
    stage: bytes, reply: bytes, kind: type[Exception], reason: str, pipelining: bool
) -> None:
    """Pipelined, a refusal of MAIL or RCPT comes with the server's 503 to the DATA written
    with them: the first refusal is the outcome."""
    refusals = iter([[reply]])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(stage):
            return next(refusals, [b"250 OK\r\n"])
        return [b"250 OK\r\n"]

    # The server answers DATA itself (its go-aheads), never through ``answer``.
    if stage == b"DATA":
        server = await send_two(ok, first_fails=(kind, reason), go_aheads=(reply,))
    else:
        server = await send_two(answer, first_fails=(kind, reason))
    assert server.commands.count(b"RSET") == 1 and server.connections == 1
    # The server read the refused message (refused once it had it all), then the next one.
    assert len(server.messages) == (2 if stage == b"<message>" else 1)
    # Nothing of the refused transaction was written after its refusal (pipelined, MAIL,
    # RCPT and DATA went out together).
    refused = server.commands[: server.commands.index(b"RSET")]
    sent = [command.split(b":")[0] for command in refused if not command.startswith(b"EHLO")]
    assert sent == {
        b"MAIL": [b"MAIL FROM"],
        b"RCPT": [b"MAIL FROM", b"RCPT TO"],
    }.get(stage if not pipelining else b"", [b"MAIL FROM", b"RCPT TO", b"DATA"])


@pytest.mark.parametrize("stage", [b"MAIL", b"RCPT", b"DATA"])
async def test_two_replies_to_a_command_before_the_message_send_nothing_and_end_the_session(
    stage: bytes, pipelining: bool
) -> None:
    """MAIL, RCPT and DATA follow one another as their replies come in: a second reply would be
    taken for the next command's, so the message is not sent (a transient failure, retried) and
    the next one goes over a new session. Pipelined, the second reply to MAIL or RCPT is taken
    for the next command's, and DATA's turns out to be a 250: out of step all the same."""
    answers = iter([[b"250 OK\r\n250 and again\r\n"]])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(stage):
            return next(answers, [b"250 OK\r\n"])
        return [b"250 OK\r\n"]

    extra = "Reply out of step: 250 " if pipelining and stage != b"DATA" else "More than one reply"
    fails = (TransientSendError, extra)
    # The server answers DATA itself (its go-aheads), never through ``answer``.
    if stage == b"DATA":
        server = await send_two(ok, fails, go_aheads=(b"354 go ahead\r\n354 again\r\n",))
    else:
        server = await send_two(answer, fails)
    assert server.connections == 2 and len(server.messages) == 1


_GROUP_REPLIES = b"250 sender OK\r\n250-recipient\r\n250 OK\r\n354 go ahead\r\n"


@pytest.mark.parametrize(
    "replies",
    [[_GROUP_REPLIES], [bytes([byte]) for byte in _GROUP_REPLIES]],
    ids=["in one piece", "a byte at a time"],
)
async def test_replies_to_a_pipelined_group_are_read_however_they_arrive(
    replies: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server may answer MAIL, RCPT and DATA together, or a byte at a time."""
    monkeypatch.setattr(Scripted, "pipelining", True)

    def answer(command: bytes) -> list[bytes]:
        return [] if command.startswith((b"MAIL", b"RCPT")) else ok(command)

    async with scripted(answer) as (server, port):
        server.go_aheads.append(replies)  # all three replies, once DATA has arrived
        smtp = loopback(port)
        await smtp.send(outgoing(1))
        await smtp.aclose()
    assert server.connections == 1 and len(server.messages) == 1


@pytest.mark.parametrize(
    ("stage", "refusal", "kind", "reason"),
    [
        (b"MAIL", b"550 5.7.1 sender refused\r\n", PermanentSendError, r"^rejected: 550 5\.7\.1 "),
        (b"RCPT", b"550 5.1.1 unknown\r\n", PermanentSendError, r"^bounced: 550 5\.1\.1 unknown$"),
    ],
    ids=["MAIL", "RCPT"],
)
async def test_a_server_that_takes_data_after_a_refusal_gets_none_of_the_message(
    stage: bytes,
    refusal: bytes,
    kind: type[Exception],
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pipelined, DATA went out with the refused MAIL or RCPT; a server that answers it 354 all
    the same waits for a message. None is written: the session is dropped, and the refusal (not
    the 354) is the outcome. (RFC 2920 would let the client end that message with a lone ".";
    closing writes nothing at all.)"""
    monkeypatch.setattr(Scripted, "pipelining", True)
    refusals = iter([[refusal]])

    def answer(command: bytes) -> list[bytes]:
        return next(refusals, ok(command)) if command.startswith(stage) else ok(command)

    server = await send_two(answer, first_fails=(kind, reason), go_aheads=(b"354 go ahead\r\n",))
    assert server.connections == 2 and len(server.messages) == 1
    assert server.unfinished == [b""]  # not a byte after the 354


@pytest.mark.parametrize(
    ("replies", "kind", "reason", "connections"),
    [
        (b"", PermanentSendError, r"^bounced: 550 5\.1\.1 unknown$", 1),
        (b"250 OK\r\n", TransientSendError, "More than one reply", 2),
    ],
    ids=["answered", "one reply too many"],
)
async def test_a_refused_group_answered_in_one_piece(
    replies: bytes,
    kind: type[Exception],
    reason: str,
    connections: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused RCPT and the 503 to its DATA in one read: the refusal is the outcome and RSET
    keeps the session. One reply more than the group's commands: which command each answered
    is no longer known, so no refusal is trusted (a false bounce would suppress the address)."""
    monkeypatch.setattr(Scripted, "pipelining", True)
    held = iter([True, True])  # the first MAIL and RCPT: answered with DATA, all at once

    def answer(command: bytes) -> list[bytes]:
        if command.startswith((b"MAIL", b"RCPT")) and next(held, False):
            return []
        return ok(command)

    group = b"250 OK\r\n550 5.1.1 unknown\r\n503 5.5.1 no valid recipients\r\n" + replies
    server = await send_two(answer, first_fails=(kind, reason), go_aheads=(group,))
    assert server.connections == connections and len(server.messages) == 1


async def test_replies_that_pair_a_refusal_with_the_wrong_command_are_no_bounce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAIL answered twice (250, then 550): the 550 would be taken for RCPT's, RCPT's 250 for
    DATA's. A 250 to DATA says the replies are out of step: the send fails as transient rather
    than as a bounce of an address the server never refused."""
    monkeypatch.setattr(Scripted, "pipelining", True)
    mails = iter([[b"250 OK\r\n550 5.1.1 unknown\r\n"]])

    def answer(command: bytes) -> list[bytes]:
        return next(mails, ok(command)) if command.startswith(b"MAIL") else ok(command)

    server = await send_two(answer, first_fails=(TransientSendError, "Reply out of step: 250 "))
    assert server.connections == 2 and len(server.messages) == 1


@pytest.mark.parametrize(
    ("group", "rset", "reason"),
    [
        (b"250 OK\r\n250 OK\r\n550 5.1.1 unknown\r\n354 go ahead\r\n", ok, "More than one reply"),
        (
            b"250 OK\r\n250 OK\r\n550 5.1.1 unknown\r\n",
            lambda command: [b"354 go ahead\r\n"],
            "Reply out of step: 354 go ahead to RSET",
        ),
    ],
    ids=["in the same read", "taken for RSET's"],
)
async def test_a_refusal_followed_by_the_replies_of_another_command_is_no_bounce(
    group: bytes, rset: Answer, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RCPT answered twice (250, then 550): the 550 would be taken for DATA's, and DATA's 354
    comes after it, with it or as the reply to the RSET that follows the refusal. Either way
    the replies are out of step: the send fails as transient, not as a bounce."""
    monkeypatch.setattr(Scripted, "pipelining", True)
    held = iter([True, True])  # the first MAIL and RCPT: answered with DATA, all at once

    def answer(command: bytes) -> list[bytes]:
        if command.startswith((b"MAIL", b"RCPT")) and next(held, False):
            return []
        return rset(command) if command == b"RSET" else ok(command)

    server = await send_two(answer, first_fails=(TransientSendError, reason), go_aheads=(group,))
    assert server.connections == 2 and len(server.messages) == 1


async def test_a_refusal_then_silence_until_the_deadline_is_the_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RCPT refused, then no reply to the DATA written with it: once the deadline closes the
    connection, the refusal (a bounce) is the outcome, not a timeout."""
    monkeypatch.setattr(Scripted, "pipelining", True)

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"RCPT") and server.connections == 1:
            server.muted.add(1)
            return [b"550 5.1.1 unknown\r\n"]
        return ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port, timeout=0.5)
        with pytest.raises(PermanentSendError, match=r"^bounced: 550 5\.1\.1 unknown$"):
            await smtp.send(outgoing(1))
        await smtp.aclose()


async def test_a_garbled_reply_after_a_refusal_is_no_bounce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RCPT refused, then something that is no SMTP reply where DATA's belongs: the server is
    out of step, and its refusal is not taken as the message's bounce."""
    monkeypatch.setattr(Scripted, "pipelining", True)
    refusals = iter([[b"550 5.1.1 unknown\r\n"]])

    def answer(command: bytes) -> list[bytes]:
        return next(refusals, ok(command)) if command.startswith(b"RCPT") else ok(command)

    server = await send_two(
        answer, first_fails=(TransientSendError, "Malformed"), go_aheads=(b"OK then\r\n",)
    )
    assert server.connections == 2 and len(server.messages) == 1


async def test_a_421_after_a_refusal_ends_the_session_without_rset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server refuses RCPT, then answers DATA 421 (it is closing): the refusal is the
    outcome, and no RSET is written to a server that said it is closing."""
    monkeypatch.setattr(Scripted, "pipelining", True)
    first = iter([True])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"RCPT") and next(first, False):
            return [b"451 4.3.0 try later\r\n"]
        return ok(command)

    server = await send_two(
        answer,
        first_fails=(TransientSendError, r"^451 4\.3\.0 try later$"),
        go_aheads=(b"421 4.3.2 closing\r\n",),
    )
    assert server.connections == 2 and len(server.messages) == 1
    assert b"RSET" not in server.commands


async def test_a_421_to_a_pipelined_mail_ends_the_exchange_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reused session answered 421 to MAIL and then nothing (the server closing): the message
    goes over a new session at once, without waiting for replies to RCPT and DATA until the
    send's deadline (30 s here; the test allows 10)."""
    monkeypatch.setattr(Scripted, "pipelining", True)

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"MAIL") and server.messages and server.connections == 1:
            server.muted.add(1)
            return [b"421 4.7.0 too many messages on this connection\r\n"]
        return ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port, timeout=30.0)
        await smtp.send(outgoing(1))
        async with asyncio.timeout(10):
            await smtp.send(outgoing(2))
        await smtp.aclose()
    assert server.connections == 2 and len(server.messages) == 2


@pytest.mark.parametrize("stage", [b"MAIL", b"RCPT"])
async def test_a_refusal_is_the_outcome_when_the_server_hangs_up_before_the_rest_of_its_group(
    stage: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelined, a refusal of MAIL or RCPT is followed by the replies to the rest of the group;
    a server that hangs up instead still refused the message: a 451 stays a retry, and is not
    taken for a session that ended (nor sent again on a new one)."""
    monkeypatch.setattr(Scripted, "pipelining", True)
    first = iter([True])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(stage) and next(first, False):
            return [b"451 4.3.0 try later\r\n", HANG_UP]
        return ok(command)

    server = await send_two(answer, first_fails=(TransientSendError, r"^451 4\.3\.0 try later$"))
    assert sum(command.startswith(b"MAIL") for command in server.commands) == 2
    assert server.connections == 2 and len(server.messages) == 1


@pytest.mark.usefixtures("pipelining")
async def test_a_421_to_an_idle_session_makes_the_next_message_open_a_new_one() -> None:
    async with scripted(ok) as (server, port):
        smtp = loopback(port)
        await smtp.send(outgoing(1))
        server.writers[0].write(b"421 shutting down\r\n")  # and the server keeps it open
        await asyncio.sleep(0.1)
        await smtp.send(outgoing(2))
        await smtp.aclose()
    assert server.connections == 2 and len(server.messages) == 2


@pytest.mark.parametrize(
    "reply",
    [b"OK then\r\n", b"250" + b"x" * 9000 + b"\r\n"],
    ids=["malformed", "too long"],
)
@pytest.mark.usefixtures("pipelining")
async def test_a_reply_that_is_not_smtp_fails_the_send_as_transient_and_drops_the_session(
    reply: bytes,
) -> None:
    answers = iter([[reply]])

    def answer(command: bytes) -> list[bytes]:
        return next(answers, [b"250 OK\r\n"]) if command.startswith(b"MAIL") else ok(command)

    server = await send_two(answer, first_fails=(TransientSendError, r"^SMTPResponseException: "))
    assert server.connections == 2 and len(server.messages) == 1


@pytest.mark.usefixtures("pipelining")
async def test_a_server_that_hangs_up_mid_message_fails_the_send_as_transient() -> None:
    hang_up = iter([True])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"RCPT") and next(hang_up, False):
            raise ConnectionResetError  # ends the scripted connection
        return ok(command)

    server = await send_two(answer, first_fails=(TransientSendError, r"^SMTPServerDisconnected: "))
    assert server.connections == 2 and len(server.messages) == 1


@pytest.mark.parametrize(
    ("refusal", "rset", "outcome", "reason"),
    [
        (b"450 4.2.1 mailbox busy", b"502 5.5.1 no RSET here", TransientSendError, r"^450 4\.2\.1"),
        (
            b"550 5.1.1 no such mailbox",
            b"502 5.5.1 no RSET here",
            PermanentSendError,
            r"^bounced: 550",
        ),
        (b"450 4.2.1 mailbox busy", None, TransientSendError, r"^450 4\.2\.1"),
        (b"550 5.1.1 no such mailbox", None, PermanentSendError, r"^bounced: 550"),
    ],
    ids=["4xx, RSET refused", "5xx, RSET refused", "4xx, then hang-up", "5xx, then hang-up"],
)
@pytest.mark.usefixtures("pipelining")
async def test_a_refusal_is_the_outcome_whatever_becomes_of_the_rset_after_it(
    refusal: bytes, rset: bytes | None, outcome: type[Exception], reason: str
) -> None:
    """A 4xx stays a retry and a 5xx a bounce when the server refuses the RSET that follows or
    hangs up: that says what becomes of the connection, not of the message. Classified by the
    RSET's reply, a busy mailbox failed for good; by the hang-up, a bounce was retried and the
    address never suppressed."""
    first = iter([True])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"RCPT") and next(first, False):
            return [refusal + b"\r\n"]
        if command == b"RSET":
            if rset is None:
                raise ConnectionResetError  # ends the scripted connection
            return [rset + b"\r\n"]
        return ok(command)

    server = await send_two(answer, first_fails=(outcome, reason))
    assert server.connections == 2 and len(server.messages) == 1  # the connection was dropped


async def _stops_reading(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, eof: bool, until: asyncio.Event
) -> None:
    """An SMTP server that takes the envelope, answers DATA, reads the first 100 kB of the
    message and then reads nothing more until ``until`` is set, having first ended its side
    (``eof``) or not."""
    writer.write(b"220 stuck ESMTP\r\n")
    await reader.readline()  # EHLO
    writer.write(b"250 stuck\r\n")
    for _ in range(2):  # MAIL, RCPT
        await reader.readline()
        writer.write(b"250 OK\r\n")
    await reader.readline()  # DATA
    writer.write(b"354 go ahead\r\n")
    await reader.readexactly(100_000)
    if eof:
        writer.write_eof()
    await until.wait()


@pytest.mark.parametrize("eof", [True, False], ids=["hung up", "silent"])
async def test_a_server_that_stops_reading_mid_message_fails_the_send_within_its_deadline(
    eof: bool,
) -> None:
    """Closing a connection waits for what is still unwritten, forever when the server stopped
    reading: the send stayed pending past its deadline, holding its slot, whether the server
    had hung up (its reply failed only once the connection closed) or just went silent (the
    deadline's close waited too). The connection is dropped at once instead."""

    until, ended = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _stops_reading(reader, writer, eof, until)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client dropped the connection: what this test wants
        finally:
            writer.transport.abort()
            ended.set()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    big = outgoing(1, body=("z" * 1022 + "\r\n") * 32 * 1024)  # 32 MB
    smtp = loopback(port, timeout=1.0)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(TransientSendError):
                await smtp.send(big)
        await smtp.aclose()
    finally:
        until.set()
        await ended.wait()
        listening.close()


@pytest.mark.usefixtures("pipelining")
async def test_a_send_cancelled_mid_message_closes_its_session() -> None:
    """A cancelled send leaves its session somewhere in a transaction: it is closed, neither
    pooled nor left open."""

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"RCPT"):
            server.muted.add(1)  # no reply to RCPT, nor to anything after it
            return []
        return ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port)
        task = asyncio.create_task(smtp.send(outgoing(1)))
        while b"RCPT TO:<P1@EXAMPLE.ORG>" not in server.commands:
            server.arrived.clear()
            await asyncio.wait_for(server.arrived.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if server.ended:
                break
            await asyncio.sleep(0.01)
        assert server.ended == 1
        server.answer = ok
        await smtp.send(outgoing(2))
        await smtp.aclose()
    assert server.connections == 2 and len(server.messages) == 1


async def test_lines_that_start_with_a_dot_arrive_as_written() -> None:
    """DATA ends at a line holding only ".", so a line starting with "." goes out doubled and
    the server takes one away."""
    body = ".\r\n..two\r\n.three\r\nlast line without its end"
    with SinkServer(Sink()) as server:
        smtp = loopback(server.port)
        await smtp.send(outgoing(1, body=body))
        await smtp.aclose()
    (raw,) = server.sink.raw
    assert raw.split(b"\r\n\r\n", 1)[1] == body.encode() + b"\r\n"


async def test_an_address_the_intake_pattern_does_not_admit_goes_through_sendmail() -> None:
    """Such an address (here a domain without a dot) is left to aiosmtplib's ``sendmail``;
    the session carries on after it with the messages it sends itself, on one connection."""
    sink = PeerSink()
    with SinkServer(sink) as server:
        smtp = loopback(server.port)
        await smtp.send(outgoing(1))
        await smtp.send(outgoing(2, recipient="p2@localhost"))
        await smtp.send(outgoing(3))
        await smtp.aclose()
    assert [to for _, to in sink.envelopes] == [
        ["p1@example.org"],
        ["p2@localhost"],
        ["p3@example.org"],
    ]
    assert len(sink.peers) == 3 and len(set(sink.peers)) == 1


class PeerSink(Sink):
    """Records which client connection (its address) carried each recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[Any] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.peers.append(session.peer)
        envelope.rcpt_tos.append(address)
        return "250 OK"


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def _send_over_tls(tls: str, directory: Path) -> list[str]:
    cert, key = _certificate(directory)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    sink = PeerSink()
    port = free_port()
    options: dict[str, Any] = (
        {"tls_context": server_context, "require_starttls": True}
        if tls == "starttls"
        else {"ssl_context": server_context}
    )
    controller = Controller(sink, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        smtp = loopback(port, 30.0, tls=tls, tls_context=client_context)
        for n in range(3):
            await smtp.send(outgoing(n))
        await smtp.aclose()
    finally:
        controller.stop()
    assert len(sink.peers) == 3 and len(set(sink.peers)) == 1  # one session
    return [m["Subject"] for m in sink.received]


@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_sessions_over_tls_carry_several_messages(tls: str, tmp_path: Path) -> None:
    assert await _send_over_tls(tls, tmp_path) == ["0", "1", "2"]


@pytest.mark.skipif(event_loop_factory() is None, reason="uvloop is not installed")
@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_sessions_over_tls_on_the_workers_event_loop(tls: str, tmp_path: Path) -> None:
    """The session takes over the connection's transport; uvloop's TLS transport is its own
    implementation, and the worker runs on it."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        assert runner.run(_send_over_tls(tls, tmp_path)) == ["0", "1", "2"]


async def test_an_idle_session_keeps_nothing_of_the_message_it_carried() -> None:
    """A pool of idle sessions must not hold their last messages (a body may run to megabytes,
    twenty sessions to twenty of them) until their next send."""
    with SinkServer(Sink()) as server:
        smtp = loopback(server.port)
        await smtp.send(outgoing(1, body=("x" * 78 + "\r\n") * 12_000))  # ~1 MB
        idle = list(smtp._idle)
        assert len(idle) == 1 and idle[0]._writes == ()
        await smtp.aclose()
    assert len(server.sink.raw) == 1


OnQuit = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def quitting(
    on_quit: OnQuit, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """A server that takes messages and hands each QUIT to ``on_quit`` (which answers it, or
    not), then ends that connection; yields its port. Its connections are dropped on exit."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"220 hi\r\n")
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                command = line.strip().upper()
                if command == b"QUIT":
                    await on_quit(reader, writer)
                    break
                if command.startswith(b"EHLO"):
                    writer.write(b"250-x\r\n250 8BITMIME\r\n")
                elif command == b"DATA":
                    writer.write(b"354 go\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    writer.write(b"250 ok\r\n")
                else:
                    writer.write(b"250 ok\r\n")
        writer.transport.abort()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.transport.abort()
        listening.close()
        await listening.wait_closed()


async def test_closing_quits_every_idle_session_at_once() -> None:
    """A server answers the QUITs only once all five have come: closed one after another (each
    waiting up to the timeout for its answer) the transport dropped four connections unanswered,
    and a worker stopping beside a silent server took the timeout times its pool to exit."""
    sessions = 5
    quits = 0
    all_quit = asyncio.Event()
    answered = hung_up_first = 0

    async def on_quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal quits, answered, hung_up_first
        quits += 1
        if quits == sessions:
            all_quit.set()
        hang_up = asyncio.ensure_future(reader.read())
        everyone = asyncio.ensure_future(all_quit.wait())
        await asyncio.wait([hang_up, everyone], return_when=asyncio.FIRST_COMPLETED)
        everyone.cancel()
        if hang_up.done():
            hung_up_first += 1
        else:
            hang_up.cancel()
            writer.write(b"221 bye\r\n")
            answered += 1

    async with quitting(on_quit) as port:
        smtp = loopback(port, timeout=1.0, pool_size=sessions)
        await asyncio.gather(*(smtp.send(outgoing(n)) for n in range(sessions)))
        assert len(smtp._idle) == sessions
        await smtp.aclose()
    assert (answered, hung_up_first) == (sessions, 0)


@pytest.mark.parametrize(
    "ending",
    [[b"421 4.7.0 too many messages on this connection\r\n"], [HANG_UP]],
    ids=["421", "hang-up"],
)
@pytest.mark.usefixtures("pipelining")
async def test_a_reused_session_that_ended_before_the_content_is_replaced_at_once(
    ending: list[bytes],
) -> None:
    """Servers end sessions after so many messages (a 421 to the next MAIL) or when idle: the
    message went back as a transient failure and waited out a retry delay. It now goes over a
    new session at once, its content having never been written."""
    mails = iter([[b"250 OK\r\n"], ending])

    def answer(command: bytes) -> list[bytes]:
        return next(mails, [b"250 OK\r\n"]) if command.startswith(b"MAIL") else ok(command)

    server = await send_two(answer)
    assert server.connections == 2 and len(server.messages) == 2


@pytest.mark.usefixtures("pipelining")
async def test_a_session_that_ends_after_the_content_is_not_tried_again() -> None:
    """Once the content is written the server may have taken it: a hang-up before the reply is
    the message's transient failure (a later resend keeps its Message-ID), never a resend now."""
    replies = iter([[b"250 queued\r\n"], [HANG_UP]])

    def answer(command: bytes) -> list[bytes]:
        return next(replies, [b"250 queued\r\n"]) if command == b"<message>" else ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port)
        await smtp.send(outgoing(1))
        with pytest.raises(TransientSendError):
            await smtp.send(outgoing(2))
        await smtp.aclose()
    assert server.connections == 1 and len(server.messages) == 2


@pytest.mark.usefixtures("pipelining")
async def test_a_new_session_that_ends_before_the_content_is_not_tried_again() -> None:
    """Only a reused session is replaced: a new one refused at once says the server will not
    take mail now (the send is retried later, not in a loop)."""
    mails = iter([[b"421 4.3.2 not now\r\n"]])

    def answer(command: bytes) -> list[bytes]:
        return next(mails, [b"250 OK\r\n"]) if command.startswith(b"MAIL") else ok(command)

    server = await send_two(answer, first_fails=(TransientSendError, r"^421 4\.3\.2 not now$"))
    assert sum(command.startswith(b"MAIL") for command in server.commands) == 2
    assert server.connections == 2 and len(server.messages) == 1


@pytest.mark.usefixtures("pipelining")
async def test_a_session_idle_too_long_is_closed_rather_than_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old session is ended with QUIT (the server would see a lost connection otherwise)
    and closed at once, its answer not waited for: it is gone before the new session opens,
    never two connections where the pool has one slot (providers cap connections per client)."""
    monkeypatch.setattr(smtp_module, "IDLE_SESSION_SECONDS", -1.0)  # any idle time is too long
    async with scripted(ok) as (server, port):
        server.quit_delays[1] = 1.0  # the first session's QUIT is answered late
        smtp = loopback(port)
        await smtp.send(outgoing(1))
        first = smtp._idle[0]
        await smtp.send(outgoing(2))
        assert not first.connected and first._transport.is_closing()
        await smtp.aclose()
        for _ in range(500):  # until the server has read both QUITs and answered them
            if server.ended == 2:
                break
            await asyncio.sleep(0.01)
    assert server.connections == 2 and len(server.messages) == 2
    assert b"RSET" not in server.commands
    assert server.commands.count(b"QUIT") == 2


@pytest.mark.parametrize(
    ("reply", "kind", "reason"),
    [
        ([b"450 4.2.0 mailbox busy\r\n"], TransientSendError, r"^450 4\.2\.0 mailbox busy$"),
        ([b"550 5.7.1 sender refused\r\n"], PermanentSendError, r"^rejected: 550 5\.7\.1 "),
        ([b"OK then\r\n"], TransientSendError, "Malformed"),
    ],
    ids=["450", "550", "garbled"],
)
@pytest.mark.usefixtures("pipelining")
async def test_a_reused_sessions_refusal_or_garbled_reply_is_the_messages(
    reply: list[bytes], kind: type[Exception], reason: str
) -> None:
    """Only a session that ended is replaced: a refusal speaks of the message (it is retried
    later, or fails), and a reply out of step of the server, not of a stale session."""
    mails = iter([[b"250 OK\r\n"], reply])

    def answer(command: bytes) -> list[bytes]:
        return next(mails, [b"250 OK\r\n"]) if command.startswith(b"MAIL") else ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port)
        await smtp.send(outgoing(1))
        with pytest.raises(kind, match=reason):
            await smtp.send(outgoing(2))
        await smtp.aclose()
    assert sum(command.startswith(b"MAIL") for command in server.commands) == 2
    assert len(server.messages) == 1


@pytest.mark.usefixtures("pipelining")
async def test_a_reused_session_gone_silent_is_replaced_after_the_deadline() -> None:
    """A connection dropped without a word (a NAT's idle timeout) answers nothing: the message
    goes over a new session once the send's deadline has passed."""

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"MAIL") and server.messages and server.connections == 1:
            server.muted.add(1)  # from the second MAIL on, the first connection is silent
            return []
        return ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port, timeout=0.5)
        await smtp.send(outgoing(1))
        await smtp.send(outgoing(2))
        await smtp.aclose()
    assert server.connections == 2 and len(server.messages) == 2


@pytest.mark.usefixtures("pipelining")
async def test_a_message_through_sendmail_is_never_tried_again_on_a_new_session() -> None:
    """aiosmtplib's ``sendmail`` (addresses the intake pattern does not admit) is not followed
    stage by stage: whatever ends its session, its message may have been taken."""
    mails = iter([[b"250 OK\r\n"], [HANG_UP]])

    def answer(command: bytes) -> list[bytes]:
        if command.startswith(b"RCPT"):  # the first message refused before its content
            return [b"550 5.1.1 unknown\r\n"]
        return next(mails, [b"250 OK\r\n"]) if command.startswith(b"MAIL") else ok(command)

    async with scripted(answer) as (server, port):
        smtp = loopback(port)
        with pytest.raises(PermanentSendError):
            await smtp.send(outgoing(1))
        with pytest.raises(TransientSendError):
            await smtp.send(outgoing(2, recipient="p2@localhost"))
        await smtp.aclose()
    assert server.connections == 1
    assert sum(command.startswith(b"MAIL") for command in server.commands) == 2


async def test_closing_drops_a_tls_session_whose_server_never_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers QUIT and then neither closes nor answers TLS's close: waiting for the
    connection to close took TLS's own 30 s, outside the QUIT bound, and a wait cut short by
    that bound cancelled the session's "closed" future for good (``aclose`` then raised
    CancelledError). The session is now dropped at the bound and ``aclose`` returns."""
    monkeypatch.setattr(smtp_module, "QUIT_SECONDS", 0.2)
    cert, key = _certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    stuck = asyncio.Event()

    async def on_quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"221 bye\r\n")
        writer.transport.pause_reading()  # TLS's close is never read, nor answered
        await stuck.wait()

    async with quitting(on_quit, server_context) as port:
        client_context = ssl.create_default_context(cafile=str(cert))
        smtp = loopback(port, 30.0, tls="tls", tls_context=client_context)
        await smtp.send(outgoing(1))
        (session,) = smtp._idle
        try:
            async with asyncio.timeout(20):  # a guard against hanging the suite, not a measure
                await smtp.aclose()
        finally:
            stuck.set()
        assert not session.connected


async def test_a_cancelled_close_drops_its_sessions() -> None:
    """Cancelled while the QUITs wait for their answers, closing left the connections open."""
    quits = asyncio.Event()
    quitting_now = 0
    never = asyncio.Event()

    async def on_quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal quitting_now
        quitting_now += 1  # never answered
        quits.set()
        await never.wait()

    async with quitting(on_quit) as port:
        smtp = loopback(port, timeout=30.0, pool_size=3)
        await asyncio.gather(*(smtp.send(outgoing(n)) for n in range(3)))
        sessions = list(smtp._idle)
        closing = asyncio.create_task(smtp.aclose())
        while quitting_now < 3:
            quits.clear()
            await quits.wait()
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        never.set()
        assert len(sessions) == 3 and not any(session.connected for session in sessions)
