"""Transports behind one small protocol, chosen by ``OPENSEQUENCE_MAIL_URL``.

A transport either delivers, or raises :class:`~opensequence.mail.errors.TransientSendError` /
:class:`~opensequence.mail.errors.PermanentSendError`; nothing else escapes it.
"""

from __future__ import annotations

import re
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from opensequence.mail.message import Outgoing


class Transport(Protocol):
    async def send(self, outgoing: Outgoing) -> None: ...

    async def aclose(self) -> None: ...


# Query parameters of an smtp:// URL, and the longest ``timeout`` it may set.
SMTP_OPTIONS = ("tls", "timeout")
MAX_TIMEOUT_SECONDS = 3600.0


def transport_from_url(url: str, *, pool_size: int = 10, timeout: float = 30.0) -> Transport:
    """``smtp://user:pass@host:port?tls=starttls|tls|none&timeout=SECONDS`` or
    ``maildir://path``.

    ``maildir://./outbox`` is relative to the working directory, ``maildir:///var/mail/x``
    absolute. ``timeout`` (default ``timeout``, 30 s) bounds opening a connection and each
    attempt at a send. An unknown scheme or parameter, a parameter given twice or a value out
    of range raises ValueError with a one-line message: a misspelt ``tls`` used to be ignored,
    and the mail went out in clear.
    """
    parts = urlsplit(url)
    if parts.scheme == "maildir":
        from opensequence.mail.transports.maildir import MaildirTransport

        if parts.query:
            raise ValueError("mail url: maildir:// takes no parameters (a '?' in the path: %3F)")
        return MaildirTransport(unquote(parts.netloc + parts.path))
    if parts.scheme in ("smtp", "smtps"):
        from opensequence.mail.transports.smtp import SmtpTransport

        options = _options(parts.query)
        tls = options.get("tls", "tls" if parts.scheme == "smtps" else "none")
        if tls not in ("starttls", "tls", "none"):
            raise ValueError(f"mail url: tls must be starttls, tls or none, not {tls!r}")
        if parts.scheme == "smtps" and tls != "tls":
            raise ValueError(f"mail url: smtps:// is TLS from the start, not tls={tls}")
        if "timeout" in options:
            timeout = _seconds(options["timeout"])
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


def _options(query: str) -> dict[str, str]:
    query = "&".join(piece for piece in query.split("&") if piece)  # "?tls=none&" as before
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"mail url: cannot read the parameters {query!r}") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in SMTP_OPTIONS:
            known = ", ".join(SMTP_OPTIONS)
            raise ValueError(f"mail url: unknown parameter {name!r} (known: {known})")
        if name in options:
            raise ValueError(f"mail url: {name} is given more than once")
        options[name] = value
    return options


def _seconds(value: str) -> float:
    # Digits and a decimal point only: float() also reads "5_0" (50), "1e-300" and "inf".
    decimal = re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", value)
    seconds = float(value) if decimal else 0.0
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"mail url: timeout must be seconds above 0 and at most {MAX_TIMEOUT_SECONDS:g},"
            f" not {value!r}"
        )
    return seconds
