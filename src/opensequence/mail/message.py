"""MIME for one send (SPEC §3.2): the wire bytes of a multipart/alternative message.

The Message-ID comes from the send record (``messages.message_id``), never from here: a resend
after a crash must carry the same one so that receivers and people can recognise it.

The bytes are assembled directly from the stdlib ``email`` package's pieces (header folding,
RFC 2047 encoded words, date format; quoted-printable is written here as its ``body_encode``
writes it, see :func:`quoted_printable`) rather than by building a ``Message`` tree and running
the generator over it: the tree and the generator cost about half a
millisecond per message, the largest CPU cost of a send. The output is byte for byte what
``MIMEMultipart``/``MIMEText`` and ``BytesGenerator`` produce for the same message (a property
test holds the two against each other), so the stdlib stays the reference for the format.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.policy import Compat32
from email.utils import format_datetime
from functools import lru_cache
from html.entities import html5
from typing import Any


class _WirePolicy(Compat32):
    """compat32 with CRLF line ends and a fast path for the common header: a short, ASCII,
    single-line value is written as is instead of going through ``Header`` re-folding (which
    was the largest CPU cost of a send). Anything else takes the standard path."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if isinstance(value, str) and value.isascii() and "\n" not in value and "\r" not in value:
            line = f"{name}: {value}"
            if len(line) <= 998:
                return (line + "\r\n").encode("ascii")
        return super().fold_binary(name, value)


SMTP_POLICY = _WirePolicy(linesep="\r\n", max_line_length=998)


@dataclass(frozen=True)
class Outgoing:
    """What a transport needs: the envelope and the message, already serialised once."""

    sender: str
    recipient: str
    data: bytes


def domain_of(email: str) -> str:
    return email.rpartition("@")[2].strip().lower() or "localhost"


def make_message_id(row_id: object, domain: str) -> str:
    """``<row uuid@domain>`` (the sender's domain): unique per send record, stable across
    resends because the row is written once and reused."""
    return f"<{row_id}@{domain}>"


_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")
_BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}


# The text part is what an HTML parser's calls would collect: data (entities decoded, runs of
# white space as one space) outside script, style, head and title; a line break at each start
# and end of a block element; "- " before a list item; a link's target after its text. The
# stdlib's HTMLParser gives those calls, but on some malformed markup it scans to the end of
# the body again at every "<": "<a b='" 40,000 times (240 kB, a template within the size
# limit) took 95 s on Python 3.11.7, every message. The scan below produces the same calls in
# linear time; a property test holds it against HTMLParser (tests/unit/test_mail_pieces.py).
#
# Any markup, one token at a time. Every token ends at its terminator or at the end of the
# body, and no quantifier backtracks (possessive), so a body is read once whatever it holds. On
# well-formed markup the tokens are HTMLParser's. On malformed markup they follow what a
# browser (an HTML5 tokenizer) shows of the HTML part: a comment, declaration or tag left open
# hides the rest of the body, and a "<" that starts nothing is text.
_NAME = r"[a-zA-Z][^\t\n\r\f />\x00]*+"
_TOKEN = re.compile(
    r"([^<]++)"  # 1: text
    r"|<!--.*?(?:--\s*>|\Z)"  # a comment
    r"|<!\[CDATA\[.*?(?:\]\]>|\Z)"  # a CDATA section
    r"|<[!?][^>]*+(?:>|\Z)"  # a declaration or a processing instruction
    rf"|</({_NAME})[^>]*+(?:>|\Z)"  # 2: an end tag
    r"|</[^>]*+(?:>|\Z)"  # "</" and no name: skipped
    rf"|<({_NAME})((?:[^>'\"]++|'[^']*+'|\"[^\"]*+\"|['\"])*+)(>|\Z)"  # 3: a start tag, 4, 5
    r"|<",  # a "<" that starts nothing
    re.DOTALL,
)
_ATTRIBUTE = re.compile(r"""([^\s/>=][^\s/=>]*)(?:\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?""")
# Script and style hold raw text up to their end tag.
_RAW_END = {tag: re.compile(rf"</\s*{tag}\s*>", re.IGNORECASE) for tag in ("script", "style")}
_SKIPPED = ("script", "style", "head", "title")
# A table's cells on one line, apart: "Name Bob", not "NameBob" (email layouts are tables).
_CELLS = ("td", "th")
# What may stand in a <head>. Anything else, or text that is not white space, ends the head
# where its end tag was left out, as it does in a browser (HTML5: the "in head" insertion mode).
_IN_HEAD = {
    "base", "basefont", "bgsound", "link", "meta", "title", "noscript", "noframes", "style",
    "script", "template", "head",
}  # fmt: skip


def _href(attributes: str) -> str | None:
    """The last ``href`` of a start tag's attributes: None without a value, else its value
    unquoted and with character references decoded as a browser decodes them in an attribute."""
    found: str | None = None
    for name, value in _ATTRIBUTE.findall(attributes):
        if name.lower() == "href":
            if value[:1] in ("'", '"'):
                value = value[1:-1]
            found = _attribute_value(value) if value else None
    return found


_REFERENCE = re.compile(r"&(?:#[xX]?[0-9a-fA-F]*;?|([A-Za-z][A-Za-z0-9]*;?))")


def _attribute_value(value: str) -> str:
    """Character references in an attribute value, decoded as HTML5 says. Unlike in text, a
    named reference without its ``;`` that runs on into letters, digits or ``=`` stays as
    written: ``?a=1&section=2`` is a link's query, not ``§ion=2`` (which ``html.unescape``,
    reading text rules, makes of it). Links in templates often carry bare ``&``."""

    def decode(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # numeric: decoded with or without the ";"
            return html.unescape(match.group())
        if name in html5 and (name.endswith(";") or value[match.end() : match.end() + 1] != "="):
            return html5[name]
        return match.group()

    return _REFERENCE.sub(decode, value)


def _text_parts(body: str) -> list[str]:
    """The text part's pieces, in one pass over ``body``."""
    parts: list[str] = []
    skip = 0
    heads = 0  # open <head> elements, each counted in ``skip`` too
    href: str | None = None

    def leave_head() -> None:
        """Close a head left open before what cannot be in it (its title or a script still
        open is another matter: their content is theirs)."""
        nonlocal skip, heads
        if heads and skip == heads:
            skip -= heads
            heads = 0

    def data(text: str) -> None:
        if heads and not text.isspace():
            leave_head()
        if not skip:
            parts.append(_SPACES.sub(" ", text))

    def end_tag(tag: str) -> None:
        nonlocal skip, heads, href
        if tag == "head":
            heads = max(0, heads - 1)
        if tag in _SKIPPED:
            skip = max(0, skip - 1)
        elif tag in _BLOCK:
            parts.append("\n")
        if tag == "a" and href:
            parts.append(f" ({href})")
            href = None

    position, end = 0, len(body)
    while position < end:
        match = _TOKEN.match(body, position)
        assert match is not None  # the last alternative matches any "<"
        position = match.end()
        text, stop, start, attributes, closer = match.groups()
        if text is not None:
            data(html.unescape(text))
        elif stop is not None:
            end_tag(stop.lower())
        elif start is not None:
            if not closer:  # no ">" before the end of the body
                break
            tag = start.lower()
            if heads and tag not in _IN_HEAD:
                leave_head()
            if tag == "head":
                heads += 1
            if tag in _SKIPPED:
                skip += 1
            elif tag in _BLOCK:
                parts.append("\n")
            if tag == "li":
                parts.append("- ")
            elif tag in _CELLS:
                parts.append(" ")
            if tag == "a":
                href = _href(attributes)
            # A "/" before the ">" closes nothing: HTML5 ignores it (``<br/>`` is ``<br>``, one
            # line break, not a start and an end; ``<div/>`` opens a div).
            if tag in _RAW_END:
                found = _RAW_END[tag].search(body, position)
                position = end if found is None else found.end()
                if found is not None:
                    end_tag(tag)
        elif match.group() == "<":
            data("<")
    return parts


def html_to_text(body: str) -> str:
    parts = _text_parts(body)
    lines = [line.strip() for line in "".join(parts).splitlines()]
    text = "\n".join(lines)
    return _BLANK_LINES.sub("\n\n", text).strip() + "\n"


def _reads_as_written(value: str) -> bool:
    """Whether a header's text can go out as it is: ASCII, and no ``=?`` that a reader would
    take for the start of an RFC 2047 encoded word and decode (a subject rendered with a
    contact's ``=?utf-8?q?...?=`` would otherwise show whatever that decodes to)."""
    return value.isascii() and "=?" not in value


# RFC 2047 §2: an encoded word is at most 75 characters, and a line holding one at most 76.
# ``Header`` folds at 78 unless told (words of up to 77 characters, first lines of 87 after the
# header's name); told the line length and the name, its words and lines keep within both.
ENCODED_LINE = 76


def _words(value: str, name: str) -> str:
    """``value`` as RFC 2047 encoded words for the header ``name``, folded; they decode to
    exactly ``value``."""
    return Header(value, "utf-8", maxlinelen=ENCODED_LINE, header_name=name).encode()


# A batch's messages mostly share their step's sender: a name outside ASCII costs ~22 us to encode.
@lru_cache(maxsize=64)
def format_from(sender_name: str | None, from_email: str) -> str:
    """``"Sender Name" <from@example.com>`` (SPEC §3.2: the name always quoted); a name outside
    ASCII is an RFC 2047 encoded word instead (quotes cannot carry it), as is one holding
    ``=?`` (readers decode encoded words inside quotes too). The address goes on a line of its
    own where the encoded words' last line would grow past :data:`ENCODED_LINE`."""
    name = " ".join((sender_name or "").split())
    if not name:
        return from_email
    if not _reads_as_written(name):
        words = _words(name, "From")
        last = words.rpartition("\n")[2] if "\n" in words else f"From: {words}"
        fold = " " if len(last) + len(from_email) + 3 <= ENCODED_LINE else "\n "
        return f"{words}{fold}<{from_email}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{from_email}>'


@lru_cache(maxsize=16)
def _date_header(date: datetime) -> str:
    """A batch's messages share one date; formatting it once per batch saves ~10 us each."""
    return format_datetime(date)


def _header(name: str, value: str) -> bytes:
    return SMTP_POLICY.fold_binary(name, value)


# RFC 5322 §2.1.1: a line is at most 998 characters before its CRLF. Servers refuse longer ones
# (aiosmtpd: "500 Line too long"), and a 5xx to DATA fails the send as a bounce.
MAX_LINE = 998


def _subject(subject: str) -> bytes:
    """The Subject header. ASCII without ``=?`` is written as is, folded at its spaces.
    Anything else is written as RFC 2047 encoded words, which split anywhere and decode to the
    same text; so is an ASCII subject that does not fold into lines of at most
    :data:`MAX_LINE` (a long link rendered into it, say), or whose first word only fits on a
    line of its own (the fold before it would add a space to the subject)."""
    value = " ".join(subject.splitlines())
    if _reads_as_written(value):
        folded = _header("Subject", value)
        if len(folded) <= MAX_LINE + 2:
            return folded
        lines = folded.split(b"\r\n")
        if lines[0] != b"Subject: " and all(len(line) <= MAX_LINE for line in lines):
            return folded
    return _header("Subject", _words(value, "Subject"))


def _text_part(text: str, subtype: str) -> bytes:
    """One ``text/<subtype>`` body part: UTF-8, quoted-printable (lines stay under SMTP's limit
    and a stored ``.eml`` stays readable), CRLF line ends."""
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "MIME-Version: 1.0\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n" + quoted_printable(text.encode("utf-8").decode("latin-1"))
    ).encode("ascii")


# Quoted-printable as the stdlib's ``email.quoprimime.body_encode`` writes it (76-character
# lines, CRLF), without its two costs on long text: ``str.translate``, which looks every
# character up in Python, and a Python loop over every line 75 characters at a time. The 67 kB
# newsletter of bench/html_text.py: its HTML part (one line) 1.47 -> 0.28 ms, its text part
# 0.93 -> 0.48 ms; the engine bench's short body 4.2 -> 2.2 us. A property test holds the two
# byte for byte.
_QP_TABLE = [
    chr(c) if c in (9, 10, 13) or (32 <= c <= 126 and c != 61) else f"={c:02X}" for c in range(256)
]
# The bytes the table leaves as they are; the others are found by deleting these, and each
# distinct one is replaced in one pass ("=" first: the others bring their own).
_QP_SAFE = bytes(c for c in range(256) if _QP_TABLE[c] == chr(c))
# The stdlib's steps through a line of 77 characters or more: cut before an "=XX" the cut
# would split (its "=" then ends the line as the soft break and starts the next), else after 75
# characters and an "=".
_QP_STEP = re.compile(r".{73}(?==)|.{74}(?==)|.{75}")


def quoted_printable(text: str) -> str:
    """``body_encode(text, eol="\\r\\n")`` for ``text`` of code points below 256 (bytes
    decoded as Latin-1)."""
    if not text:
        return text
    specials = set(text.encode("latin-1").translate(None, _QP_SAFE))
    if 61 in specials:  # "="
        text = text.replace("=", "=3D")
        specials.discard(61)
    for special in specials:
        text = text.replace(chr(special), _QP_TABLE[special])
    lines: list[str] = []
    for line in text.splitlines():
        if len(line) < 77 and line[-1:] not in (" ", "\t"):
            lines.append(line)
        else:
            _qp_line(line, lines)
    if text[-1] in "\r\n":
        lines.append("")
    return "\r\n".join(lines)


def _qp_line(line: str, pieces: list[str]) -> None:
    """The stdlib's pieces of one encoded line that is long or ends in white space."""
    start, last_start = 0, len(line) - 77
    if last_start >= 0:
        for step in _QP_STEP.findall(line):
            if start > last_start:
                break
            pieces.append(step + "=")
            start += len(step)
    if line[-1:] not in (" ", "\t"):
        pieces.append(line[start:])
        return
    # White space at the end is encoded when the piece leaves room for three more
    # characters, kept before a soft break when room for two, else moved, encoded, to a
    # line of its own.
    room = start - last_start
    if room >= 3:
        pieces.append(f"{line[start:-1]}={ord(line[-1]):02X}")
    elif room == 2:
        pieces.append(f"{line[start:]}=\r\n")
    else:
        pieces.append(f"{line[start:-1]}=\r\n={ord(line[-1]):02X}")


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
) -> bytes:
    """A multipart/alternative message (text first, HTML preferred), in its wire form with CRLF
    line ends as SMTP and ``.eml`` files want it. ``unsubscribe_url`` set (non-transactional
    mail) adds RFC 8058 one-click headers.

    The boundary is random and cannot occur in the parts: they are quoted-printable, which
    never contains a bare ``=_``.
    """
    boundary = f"=_{os.urandom(16).hex()}"
    head = [
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'.encode("ascii"),
        b"MIME-Version: 1.0\r\n",
        _header("From", format_from(sender_name, from_email)),
        _header("To", to_email),
        _subject(subject),
        _header("Date", _date_header(date)),
        _header("Message-ID", message_id),
    ]
    if unsubscribe_url:
        head.append(_header("List-Unsubscribe", f"<{unsubscribe_url}>"))
        head.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    delimiter = f"--{boundary}\r\n".encode("ascii")
    return b"".join(
        (
            *head,
            b"\r\n",
            delimiter,
            _text_part(html_to_text(html_body), "plain"),
            b"\r\n",
            delimiter,
            _text_part(html_body, "html"),
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        )
    )
