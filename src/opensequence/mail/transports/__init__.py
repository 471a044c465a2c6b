"""Transports behind one small protocol, chosen by ``OPENSEQUENCE_MAIL_URL``.

A transport either delivers, or raises :class:`~opensequence.mail.errors.TransientSendError` /
:class:`~opensequence.mail.errors.PermanentSendError`; nothing else escapes it.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from opensequence.mail.message import Outgoing


class Transport(Protocol):
    async def send(self, outgoing: Outgoing) -> None: ...

    async def aclose(self) -> None: ...


def transport_from_url(url: str, *, pool_size: int = 10, timeout: float = 30.0) -> Transport:
    """``smtp://user:pass@host:port?tls=starttls|tls|none`` or ``maildir://path``.

    ``maildir://./outbox`` is relative to the working directory, ``maildir:///var/mail/x``
    absolute. Unknown schemes raise ValueError with a one-line message.
    """
    parts = urlsplit(url)
    if parts.scheme == "maildir":
        from opensequence.mail.transports.maildir import MaildirTransport

        return MaildirTransport(unquote(parts.netloc + parts.path))
    if parts.scheme in ("smtp", "smtps"):
        from opensequence.mail.transports.smtp import SmtpTransport

        options = parse_qs(parts.query)
        tls = options.get("tls", ["tls" if parts.scheme == "smtps" else "none"])[0]
        if tls not in ("starttls", "tls", "none"):
            raise ValueError(f"mail url: tls must be starttls, tls or none, not {tls!r}")
        default_port = {"tls": 465, "starttls": 587, "none": 25}[tls]
        return SmtpTransport(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or default_port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            pool_size=pool_size,
            timeout=timeout,
        )
    raise ValueError(f"mail url: unsupported scheme {parts.scheme!r} (use smtp:// or maildir://)")
