"""The two ways a send can fail, as the retry policy sees them.

Transports translate their own exceptions into these at the boundary, so the engine never
imports aiosmtplib or knows what a maildir is.
"""

from __future__ import annotations


class SendError(Exception):
    """A send that did not happen. ``reason`` is what the send record keeps."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
