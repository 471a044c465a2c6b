"""The two ways a send can fail, as the retry policy sees them.

Transports translate their own exceptions into these at the boundary, so the engine never
imports aiosmtplib or knows what a maildir is.
"""

from __future__ import annotations


class SendError(Exception):
    """A send that did not happen. ``reason`` is what the send record keeps, made storable
    (:func:`storable`)."""

    def __init__(self, reason: str) -> None:
        reason = storable(reason)
        super().__init__(reason)
        self.reason = reason


def storable(text: str) -> str:
    """``text`` as both databases store it: valid UTF-8 without NUL. A server's reply is bytes,
    read as UTF-8 with the invalid ones kept as lone surrogates (aiosmtplib's
    ``surrogateescape``), and neither SQLite nor PostgreSQL takes those, nor PostgreSQL a NUL:
    the worker could not record the batch, whose sends then went out again at every claim.
    Invalid bytes become U+FFFD and NUL is dropped."""
    if text.isascii() and "\x00" not in text:
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace").replace("\x00", "")


class TransientSendError(SendError):
    """Worth trying again later: SMTP 4xx, timeouts, refused or reset connections."""


class PermanentSendError(SendError):
    """Never worth retrying: SMTP 5xx. ``bounce`` is True when the server refused the recipient
    or the message (RCPT/DATA, ``reason`` reads ``bounced: 550 …``): the address is then
    suppressed. A 5xx at any other stage (sender refused, authentication) says nothing about
    the recipient and must not suppress it."""

    def __init__(self, reason: str, *, bounce: bool = True) -> None:
        super().__init__(reason)
        self.bounce = bounce
