"""MIME for one send, with the stdlib ``email`` package (SPEC §3.2).

The Message-ID comes from the send record (``messages.message_id``), never from here: a resend
after a crash must carry the same one so that receivers and people can recognise it.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from html.parser import HTMLParser


@dataclass(frozen=True)
class Outgoing:
    """What a transport needs: the envelope and the message."""

    sender: str
    recipient: str
    message: EmailMessage


def domain_of(email: str) -> str:
    return email.rpartition("@")[2].strip().lower() or "localhost"


def make_message_id(row_id: object, domain: str) -> str:
    """``<row uuid@domain>`` (the sender's domain): unique per send record, stable across
    resends because the row is written once and reused."""
    return f"<{row_id}@{domain}>"


_BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}


class _TextExtractor(HTMLParser):
    """HTML → readable text: blocks become line breaks, links keep their target."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")
        if tag == "a" and self._href:
            self.parts.append(f" ({self._href})")
            self._href = None

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(body: str) -> str:
    parser = _TextExtractor()
    parser.feed(body)
    parser.close()
    lines = [line.strip() for line in "".join(parser.parts).splitlines()]
    text = "\n".join(lines)
    return html.unescape(re.sub(r"\n{3,}", "\n\n", text)).strip() + "\n"


def format_from(sender_name: str | None, from_email: str) -> str:
    """``"Sender Name" <from@example.com>`` (SPEC §3.2: the name always quoted). Names outside
    ASCII are RFC 2047-encoded by the email policy when the message is serialised."""
    name = " ".join((sender_name or "").split())
    if not name:
        return from_email
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{from_email}>'


def build_message(
    *,
    from_email: str,
    sender_name: str | None,
    to_email: str,
    subject: str,
    html_body: str,
    message_id: str,
    date: datetime,
    unsubscribe_url: str | None,
) -> EmailMessage:
    """A multipart/alternative message (text first, HTML preferred). ``unsubscribe_url`` set
    (non-transactional mail) adds RFC 8058 one-click headers."""
    message = EmailMessage()
    message["From"] = format_from(sender_name, from_email)
    message["To"] = to_email
    message["Subject"] = " ".join(subject.splitlines())
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    message["MIME-Version"] = "1.0"
    if unsubscribe_url:
        message["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(html_to_text(html_body))
    message.add_alternative(html_body, subtype="html")
    return message
