"""Pure mail pieces: unsubscribe tokens, Liquid limits, MIME, transport URLs, SMTP errors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aiosmtplib
import pytest

from opensequence.mail.errors import PermanentSendError, TransientSendError
from opensequence.mail.message import build_message, html_to_text
from opensequence.mail.render import TemplateError, check, render
from opensequence.mail.transports import transport_from_url
from opensequence.mail.transports.maildir import MaildirTransport
from opensequence.mail.transports.smtp import SmtpTransport, classify
from opensequence.unsubscribe import make_token, read_token, unsubscribe_url


def test_tokens_round_trip_and_reject_tampering() -> None:
    org, contact = uuid.uuid4(), uuid.uuid4()
    token = make_token("s3cret", org, contact)
    assert read_token("s3cret", token) == (org, contact)
    assert all(c.isalnum() or c in "-_" for c in token)
    assert read_token("other", token) is None
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert read_token("s3cret", flipped) is None
    forged = make_token("guess", org, contact)
    assert read_token("s3cret", forged) is None
    for junk in ("", "!!!", "a" * 500, token[:-4]):
        assert read_token("s3cret", junk) is None
    assert unsubscribe_url("http://h:8000/", token) == f"http://h:8000/unsubscribe/{token}"


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in (1..100000000) %}x{% endfor %}",
        '{% assign s = "xxxxxxxxxx" %}{% for i in (1..60) %}{% assign s = s | append: s %}'
        "{% endfor %}{{ s }}",
        '{% include "secrets" %}',
        "{{ unclosed",
    ],
)
def test_templates_that_loop_grow_or_escape_fail(template: str) -> None:
    with pytest.raises(TemplateError):
        render(template, {"contact": {"name": "x"}}, html=False)


def test_rendering_is_plain_data_only() -> None:
    context = {"contact": {"name": "<i>Al</i>", "custom_data": {}}}
    assert render("{{ contact.name }}", context, html=True) == "&lt;i&gt;Al&lt;/i&gt;"
    assert render("{{ contact.name }}", context, html=False) == "<i>Al</i>"
    assert render("{{ contact.custom_data.plan | default: 'free' }}", context, html=False) == "free"
    assert render("{{ contact.__class__ }}{{ contact.items }}", context, html=False) == ""
    check("{{ fine }}")
    with pytest.raises(TemplateError):
        check("{% if %}")


def test_message_has_both_parts_and_one_click_headers() -> None:
    message = build_message(
        from_email="a@example.com",
        sender_name="Team",
        to_email="b@example.org",
        subject="Hi\nthere",
        html_body='<p>Hello&amp;bye</p><ul><li>one</li></ul><a href="https://x.y/z">link</a>',
        message_id="<1@example.com>",
        date=datetime(2026, 1, 1, tzinfo=UTC),
        unsubscribe_url="https://h/unsubscribe/t",
    )
    assert message["Subject"] == "Hi there"
    assert message["List-Unsubscribe"] == "<https://h/unsubscribe/t>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    assert text is not None
    assert text.get_content() == "Hello&bye\n\n- one\nlink (https://x.y/z)\n"
    assert b'From: "Team" <a@example.com>' in message.as_bytes()


def test_html_to_text_drops_style_and_script() -> None:
    assert html_to_text("<style>p{}</style><script>x()</script><b>Hi</b>") == "Hi\n"


def test_transport_urls() -> None:
    smtp = transport_from_url("smtp://u%40x:p%2Fw@mail.example:2525?tls=starttls")
    assert isinstance(smtp, SmtpTransport)
    assert (smtp.host, smtp.port, smtp.username, smtp.password, smtp.tls) == (
        "mail.example",
        2525,
        "u@x",
        "p/w",
        "starttls",
    )
    assert isinstance(transport_from_url("smtps://mail.example"), SmtpTransport)
    maildir = transport_from_url("maildir://./outbox")
    assert isinstance(maildir, MaildirTransport) and str(maildir.path) == "outbox"
    for bad in ("http://x", "smtp://h?tls=maybe"):
        with pytest.raises(ValueError):
            transport_from_url(bad)


def test_smtp_errors_map_to_the_retry_policy() -> None:
    assert isinstance(classify(aiosmtplib.SMTPDataError(451, "later")), TransientSendError)
    bounce = classify(
        aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "x@y")]
        )
    )
    assert isinstance(bounce, PermanentSendError)
    assert bounce.reason == "bounced: 550 5.1.1 unknown"
    assert isinstance(classify(ConnectionRefusedError(111, "refused")), TransientSendError)
    assert isinstance(classify(ConnectionResetError()), TransientSendError)
    assert isinstance(classify(aiosmtplib.SMTPReadTimeoutError("slow")), TransientSendError)
    assert isinstance(classify(aiosmtplib.SMTPServerDisconnected("bye")), TransientSendError)
