"""Which SMTP 5xx replies are bounces of the recipient (and suppress it) and which are not."""

from __future__ import annotations

import aiosmtplib

from opensequence.mail.errors import PermanentSendError
from opensequence.mail.transports.smtp import classify


def test_recipient_and_data_refusals_are_bounces() -> None:
    refused = classify(
        aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "x@y")]
        )
    )
    data = classify(aiosmtplib.SMTPDataError(554, "5.7.1 rejected as spam"))
    for error in (refused, data):
        assert isinstance(error, PermanentSendError) and error.bounce
        assert error.reason.startswith("bounced: 5")


def test_sender_and_authentication_refusals_are_not_bounces() -> None:
    sender = classify(aiosmtplib.SMTPSenderRefused(550, "5.7.1 not allowed", "me@x"))
    auth = classify(aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"))
    for error in (sender, auth):
        assert isinstance(error, PermanentSendError) and not error.bounce
        assert error.reason.startswith("rejected: 5")
