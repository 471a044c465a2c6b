"""Pure mail pieces: unsubscribe tokens, Liquid limits, MIME, transport URLs, SMTP errors."""

from __future__ import annotations

import email
import email.policy
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from email.charset import QP, Charset
from email.header import Header, decode_header, make_header
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.quoprimime import body_encode
from email.utils import format_datetime
from html.parser import HTMLParser

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from opensequence.config import MAX_PUBLIC_URL
from opensequence.mail.errors import PermanentSendError, TransientSendError
from opensequence.mail.message import (
    _BLOCK,
    _SPACES,
    SMTP_POLICY,
    _text_parts,
    build_message,
    format_from,
    html_to_text,
    quoted_printable,
)
from opensequence.mail.render import TemplateError, render
from opensequence.mail.transports import transport_from_url
from opensequence.mail.transports.maildir import MaildirTransport
from opensequence.mail.transports.smtp import SmtpTransport, classify, data_lines
from opensequence.unsubscribe import make_token, read_token, unsubscribe_url
from opensequence.validation import MAX_NAME


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


def test_what_python_raises_on_the_data_is_a_template_error() -> None:
    context = {"contact": {"custom_data": {"amount": 1e307}}}
    with pytest.raises(TemplateError, match="OverflowError"):
        render("{{ contact.custom_data.amount | times: 100 | ceil }}", context, html=True)


def test_rendering_is_plain_data_only() -> None:
    context = {"contact": {"name": "<i>Al</i>", "custom_data": {}}}
    assert render("{{ contact.name }}", context, html=True) == "&lt;i&gt;Al&lt;/i&gt;"
    assert render("{{ contact.name }}", context, html=False) == "<i>Al</i>"
    assert render("{{ contact.custom_data.plan | default: 'free' }}", context, html=False) == "free"
    assert render("{{ contact.__class__ }}{{ contact.items }}", context, html=False) == ""
    with pytest.raises(TemplateError):
        render("{% if %}", context, html=False)


def test_message_has_both_parts_and_one_click_headers() -> None:
    raw = build_message(
        from_email="a@example.com",
        sender_name="Team",
        to_email="b@example.org",
        subject="Hi\nthere",
        html_body='<p>Hello&amp;bye</p><ul><li>one</li></ul><a href="https://x.y/z">link</a>',
        message_id="<1@example.com>",
        date=datetime(2026, 1, 1, tzinfo=UTC),
        unsubscribe_url="https://h/unsubscribe/t",
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "Hi there"
    assert message["List-Unsubscribe"] == "<https://h/unsubscribe/t>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    assert text is not None
    assert text.get_content().replace("\r\n", "\n") == "Hello&bye\n\n- one\nlink (https://x.y/z)\n"
    assert b'From: "Team" <a@example.com>\r\n' in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_text_that_looks_encoded_reads_back_as_written() -> None:
    """RFC 2047 readers decode ``=?charset?q?...?=`` in a subject, and in a display name even
    inside quotes: such text from a contact's data would show as whatever it decodes to."""
    looks = "=?utf-8?q?ACME_=E2=9C=94_paid?="
    raw = build_message(
        from_email="a@example.com",
        sender_name=f"Billing {looks}",
        to_email="b@example.org",
        subject=f"Your invoice for {looks}",
        html_body="<p>x</p>",
        message_id="<4@example.com>",
        date=datetime(2026, 1, 1, tzinfo=UTC),
        unsubscribe_url=None,
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == f"Your invoice for {looks}"
    assert message["From"].addresses[0].display_name == f"Billing {looks}"
    compat = email.message_from_bytes(raw)
    assert str(make_header(decode_header(compat["Subject"]))) == f"Your invoice for {looks}"


def test_non_ascii_names_and_subjects_are_encoded() -> None:
    raw = build_message(
        from_email="a@example.com",
        sender_name="Zoë",
        to_email="b@example.org",
        subject="Grüße",
        html_body="<p>" + "é" * 3000 + "</p>",
        message_id="<2@example.com>",
        date=datetime(2026, 1, 1, tzinfo=UTC),
        unsubscribe_url=None,
    )
    assert raw.isascii()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == "Grüße"
    assert message["From"].addresses[0].display_name == "Zoë"
    assert message["List-Unsubscribe"] is None
    html = message.get_body(("html",))
    assert html is not None and html.get_content() == "<p>" + "é" * 3000 + "</p>"


def _short_message(subject: str, *, sender_name: str, from_email: str) -> bytes:
    """A message whose headers are the point: a one-paragraph body, no unsubscribe link."""
    return build_message(
        from_email=from_email,
        sender_name=sender_name,
        to_email="b@example.org",
        subject=subject,
        html_body="<p>hi</p>",
        message_id="<3@example.com>",
        date=datetime(2026, 1, 1, tzinfo=UTC),
        unsubscribe_url=None,
    )


@pytest.mark.parametrize(
    "subject",
    [
        "x" * 1200,  # one run longer than a line
        "Your link https://example.org/?" + "y" * 1100 + " inside",  # such a run mid-subject
        "z" * 992,  # fits a line only without "Subject: " before it
        "word " * 399 + "word",  # long, but folds at its spaces: stays readable
        "Grüße " + "é" * 1000,
    ],
)
def test_subjects_of_any_length_fit_in_lines_and_read_back_the_same(subject: str) -> None:
    raw = _short_message(subject, sender_name="A", from_email="a@example.com")
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == subject.strip()
    assert (b"=?utf-8?" in raw) == (not subject.startswith("word"))


_ENCODED_WORD = re.compile(rb"=\?[^?]+\?[qQbB]\?[^?]*\?=")


@settings(max_examples=300, deadline=None)
@given(
    # Not ASCII once the message has joined the subject's lines and the name's words (a line
    # break or space outside ASCII alone would leave ASCII, which goes out as written).
    subject=st.text(min_size=1, max_size=300).filter(
        lambda text: not " ".join(text.splitlines()).isascii()
    ),
    sender_name=st.text(min_size=1, max_size=150).filter(
        lambda text: not " ".join(text.split()).isascii()
    ),
)
def test_encoded_words_keep_to_rfc_2047_lengths(subject: str, sender_name: str) -> None:
    """RFC 2047 §2: an encoded word is at most 75 characters, a line holding one at most 76. The
    stdlib's ``Header`` folds at 78 by default: words of 77 characters, a first line of 87."""
    raw = _short_message(
        subject, sender_name=sender_name, from_email="someone.with.a.long.address@mail.example.com"
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    encoded_lines = [line for line in head.split(b"\r\n") if _ENCODED_WORD.search(line)]
    assert encoded_lines
    for line in encoded_lines:
        assert len(line) <= 76, line
        assert all(len(word) <= 75 for word in _ENCODED_WORD.findall(line)), line
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == " ".join(subject.splitlines())
    # The display name through compat32's decoder: the default policy's parser puts a space
    # between two encoded words of a phrase, which RFC 2047 §6.2 says to ignore.
    words, address = email.message_from_bytes(raw)["From"].rsplit(" <", 1)
    assert str(make_header(decode_header(words))) == " ".join(sender_name.split())
    assert address == "someone.with.a.long.address@mail.example.com>"


def _stdlib_message(
    *,
    from_email: str,
    sender_name: str | None,
    to_email: str,
    subject: str,
    html_body: str,
    message_id: str,
    date: datetime,
    unsubscribe_url: str | None,
    boundary: str,
) -> bytes:
    """The reference: the same message built as a ``Message`` tree and flattened by the stdlib
    generator (how ``build_message`` worked before it assembled the bytes itself)."""
    utf8_qp = Charset("utf-8")
    utf8_qp.body_encoding = QP
    subject = " ".join(subject.splitlines())
    message = MIMEMultipart("alternative", boundary=boundary)
    message["From"] = format_from(sender_name, from_email)
    message["To"] = to_email
    plain = subject.isascii() and "=?" not in subject
    # RFC 2047 §2's lengths: words of at most 75 characters on lines of at most 76.
    words = Header(subject, "utf-8", maxlinelen=76, header_name="Subject").encode()
    message["Subject"] = subject if plain else words
    if plain and not _fits(message.as_bytes(policy=SMTP_POLICY), b"Subject"):
        del message["Subject"]
        message["Subject"] = words
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    if unsubscribe_url:
        message["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.attach(MIMEText(html_to_text(html_body), "plain", utf8_qp))  # type: ignore[arg-type]
    message.attach(MIMEText(html_body, "html", utf8_qp))  # type: ignore[arg-type]
    return message.as_bytes(policy=SMTP_POLICY)


def _fits(raw: bytes, name: bytes) -> bool:
    """Whether the header ``name`` of ``raw`` has no line over 998 bytes and a first line
    with more than the name on it."""
    lines = raw.split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(name + b":"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith((b" ", b"\t")))
    header = lines[start:end]
    return header[0] != name + b": " and all(len(line) <= 998 for line in header)


_TEXT = st.lists(
    st.one_of(
        st.sampled_from(
            ["\r", "\n", "\r\n", " ", "\t", "=", ".", "From ", "<p>", "</p>", "é", "=?", "?="]
        ),
        st.text(st.characters(codec="utf-8"), max_size=20),
        st.text("ab", min_size=70, max_size=200),
    ),
    max_size=30,
).map("".join)


# Subjects with runs about as long as a header line may be, or longer (a long link rendered in).
_LONG_RUNS = st.lists(
    st.one_of(st.sampled_from([" ", "\t", "é", "\n"]), st.text("ab", min_size=980, max_size=1100)),
    min_size=1,
    max_size=4,
).map("".join)


# What the worker signs: the public URL (at most MAX_PUBLIC_URL characters), then the token.
_UNSUBSCRIBE_URLS = st.from_regex(
    rf"https://[a-z.]{{1,{MAX_PUBLIC_URL - 8}}}/unsubscribe/[A-Za-z0-9_-]{{64}}", fullmatch=True
)


@settings(max_examples=300, deadline=None)
@given(
    sender_name=st.one_of(st.none(), _TEXT.map(lambda name: name[:MAX_NAME])),  # as the API admits
    local=st.from_regex(r"[a-z0-9._+-]{1,70}", fullmatch=True),
    subject=st.one_of(_TEXT, _LONG_RUNS),
    html_body=st.one_of(_TEXT, st.text(alphabet="ab =\t\né<>", min_size=60, max_size=2000)),
    unsubscribe=st.one_of(st.none(), _UNSUBSCRIBE_URLS),
    offset=st.integers(min_value=-720, max_value=840),
)
def test_message_bytes_are_what_the_stdlib_generator_writes(
    sender_name: str | None,
    local: str,
    subject: str,
    html_body: str,
    unsubscribe: str | None,
    offset: int,
) -> None:
    fields = {
        "from_email": f"{local}@example.com",
        "sender_name": sender_name,
        "to_email": f"{local}@example.org",
        "subject": subject,
        "html_body": html_body,
        "message_id": f"<{uuid.uuid4()}@example.com>",
        "date": datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(minutes=offset))),
        "unsubscribe_url": unsubscribe,
    }
    raw = build_message(**fields)  # type: ignore[arg-type]
    boundary = re.search(rb'boundary="([^"]+)"', raw)
    assert boundary is not None
    assert raw == _stdlib_message(**fields, boundary=boundary.group(1).decode())  # type: ignore[arg-type]
    # Every line, headers included: a longer one is refused by servers (a 5xx, so a bounce).
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# Runs that put the stdlib's cuts, escapes and trailing white space at every position.
_QP_TEXT = st.lists(
    st.one_of(
        st.text(alphabet="a =\t\r\n\x00\x0b\x85\xe9\xff.", max_size=6),
        st.integers(min_value=60, max_value=160).map(lambda n: "x" * n),
        st.sampled_from(["=" * 3, " " * 3, "\t ", "\r\n", "=3D", "\xe2\x80\x94"]),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=2000, deadline=None)
@given(text=_QP_TEXT)
def test_quoted_printable_is_what_the_stdlib_writes(text: str) -> None:
    assert quoted_printable(text) == re.sub(r"\r\n|\r|\n", "\r\n", body_encode(text))


class _TextExtractor(HTMLParser):
    """The reference for the text part: the calls of the stdlib's HTML parser, collected as
    ``html_to_text`` describes (data outside script/style/head/title, blocks as line breaks,
    "- " before list items, a link's target after it)."""

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
        elif tag in ("td", "th"):
            self.parts.append(" ")
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # HTML5 ignores the "/" of "<br/>": a start tag only (HTMLParser's default adds an end).
        self.handle_starttag(tag, attrs)

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
            self.parts.append(_SPACES.sub(" ", data))


def _parsed_parts(body: str) -> list[str]:
    parser = _TextExtractor()
    parser.feed(body)
    parser.close()
    return parser.parts


_SIMPLE_MARKUP = st.sampled_from(
    [
        "&amp;", "&lt;b&gt;", "&#39;", "&nbsp;", "&amp;lt;", "&bogus;", "&", ">",
        "<p>", "</p>", "<P>", "<div>", "</div>", "<br>", "<br/>", "<br />", "<ul>", "<li>",
        "</li>", "<table>", "<tr>", "</tr>", "<h1>", "</h1>", "<hr/>", "<p/>", "<b>", "</b>",
        '<a href="https://x.y/z?a=1&amp;b=2">', '<a HREF="U">', '<a href="">', "<a href>",
        '<a href="1" href="2">', '<a class="c" href="h">', "<a>", "</a>", "</A>",
        '<span class="x" data-y="1">', "</span>", '<img src="i.png" alt="&quot;">',
    ]
)  # fmt: skip
# Beyond the simple subset, every construct terminated.
_OTHER_MARKUP = st.sampled_from(
    [
        "</P >", "<a href='single'>", "<a href=x>", "<a href = 'sp aced' >", "<A Href=\"Y\">",
        "<a title='>' href=\"t\">", "<p\x0bclass=\"q\">", "<p\x0b>",
        "<script>x<p>y</script>", "<SCRIPT>a</b></Script >", "<style>p{}</style>",
        "<title>t</title>", "<head><title>t</title></head>", "<textarea><p></textarea>",
        "<!-- c -->", "<!-- <p> -- >", "<!DOCTYPE html>", "<?pi?>", "<![CDATA[x]]>", "<!x>",
        "</>", "<br/>", "<br />", "<li/>", "<a href='h'/>", "<img src=i.png/>",
        "<td style='a:b;c:d' valign=top>", "</td>", "< p>", "a < b", "<1>",
    ]
)  # fmt: skip
_TEXT_RUN = st.text(alphabet=st.sampled_from(list("ab \t\n\r&;#\x0b\x1c\xa0é")), max_size=8)
_MARKUP = st.lists(st.one_of(_TEXT_RUN, _SIMPLE_MARKUP, _OTHER_MARKUP), max_size=14).map("".join)


@settings(max_examples=1000, deadline=None)
@given(body=_MARKUP)
def test_html_to_text_agrees_with_the_parser_on_terminated_markup(body: str) -> None:
    assert "".join(_text_parts(body)) == "".join(_parsed_parts(body))


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("a <a b='" * 3, "a\n"),  # a tag left open hides the rest, as in a browser
        ("x<!-- never closed <p>y", "x\n"),
        ("x<![" * 3, "x\n"),  # HTMLParser raised AssertionError here
        ("x<script>y", "x\n"),
        ("x</p", "x\n"),
        ("<p>x<?", "x\n"),
    ],
)
def test_html_to_text_reads_malformed_markup_in_one_pass(body: str, text: str) -> None:
    assert html_to_text(body) == text


def test_html_to_text_scan_covers_plain_email_markup() -> None:
    body = '<p>Hi &amp; bye,</p><ul><li>one</li></ul><a href="https://x.y/z">link</a><br/>'
    assert _text_parts(body) == _parsed_parts(body)


def test_html_to_text_decodes_references_once() -> None:
    """The text part says what the HTML shows: escaped markup stays escaped text."""
    body = "<p>Write &amp;lt;b&amp;gt; for bold, &amp;amp; for &amp;</p>"
    assert html_to_text(body) == "Write &lt;b&gt; for bold, &amp; for &\n"
    link = '<a href="https://x.y/?a=1&amp;copy=2&amp;amp;b">l</a>'
    assert html_to_text(link) == "l (https://x.y/?a=1&copy=2&amp;b)\n"


@pytest.mark.parametrize(
    ("href", "target"),
    [
        # A bare "&" before a name that runs on is a query separator, not a reference.
        ("?a=1&section=2&region=eu&notify=1", "?a=1&section=2&region=eu&notify=1"),
        ("?a=1&copy=2", "?a=1&copy=2"),  # a reference's name followed by "="
        ("?a&copy", "?a©"),  # ... by nothing
        ("&copy/&copy;x&amp;&AMP;&lt", "©/©x&&<"),
        ("&#39;&#x41;&#65&#", "'AA&#"),
        ("&regx;&ampx;&bogus;", "&regx;&ampx;&bogus;"),
    ],
)
def test_link_targets_decode_references_as_attributes_do(href: str, target: str) -> None:
    """HTML5 reads character references in an attribute value differently from text (where
    ``&section`` shows as ``§ion``); ``html.unescape`` and so ``HTMLParser`` use the text rules.
    """
    assert html_to_text(f'<a href="{href}">l</a>') == f"l ({target})\n"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        # HTML lets a page leave out </head>: <body>, or anything that cannot be in a head,
        # ends it. The whole text part used to be dropped as part of the head.
        ("<html><head><meta charset=utf-8><title>Offer</title><body><p>Hi Bob</p>", "Hi Bob\n"),
        ("<head><style>p{}</style>Hello <b>there</b>", "Hello there\n"),
        ("<head><link rel=x><div>Hi</div>", "Hi\n"),
        ("<head><title>T<p>x</p>", "\n"),  # an unclosed title holds the rest, as in a browser
        ("<head><title>T</title></head><body>x", "x\n"),
    ],
)
def test_a_head_left_open_ends_where_a_browser_ends_it(body: str, text: str) -> None:
    assert html_to_text(body) == text


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("Hi<br/>there<br />again<br>end", "Hi\nthere\nagain\nend\n"),
        ("x<hr/>y", "x\ny\n"),
        ("<p/>a<li/>b", "a\n- b\n"),
        ("<a href='https://x.y'/>more</a>", "more (https://x.y)\n"),
    ],
)
def test_a_slash_before_the_end_of_a_start_tag_closes_nothing(body: str, text: str) -> None:
    """``<br/>`` is one line break, as ``<br>`` is: the text part kept a blank line for it."""
    assert html_to_text(body) == text


def test_table_cells_stay_apart() -> None:
    body = "<table><tr><th>Plan</th><th>Price</th></tr><tr><td>Pro</td><td>$9</td></tr></table>"
    assert html_to_text(body) == "Plan Price\n\nPro $9\n"


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


def test_smtp_urls_set_the_timeout_and_refuse_what_they_do_not_know() -> None:
    """A misspelt parameter (``tsl=starttls``) was ignored, and the mail went out in clear."""
    assert transport_from_url("smtp://h?tls=starttls&timeout=2.5").timeout == 2.5  # type: ignore[attr-defined]
    assert transport_from_url("smtp://h", timeout=7).timeout == 7  # type: ignore[attr-defined]
    # Empty pieces were accepted before, and still are.
    for url in ("smtp://h?tls=starttls&", "smtp://h?&tls=starttls&&timeout=.5", "smtps://h"):
        transport_from_url(url)
    refused = {
        "smtp://h?tsl=starttls": "unknown parameter 'tsl' (known: tls, timeout)",
        "smtp://h?tls=none&tls=starttls": "tls is given more than once",
        "smtp://h?tls": "cannot read the parameters 'tls'",
        "maildir://./outbox?x=1": "maildir:// takes no parameters",
        "smtps://h?tls=none": "smtps:// is TLS from the start, not tls=none",
    }
    for value in ("0", "-1", "nan", "inf", "", "soon", "3601", "5_0", "1e-3"):
        refused[f"smtp://h?timeout={value}"] = (
            f"timeout must be seconds above 0 and at most 3600, not '{value}'"
        )
    for url, message in refused.items():
        with pytest.raises(ValueError, match=re.escape(f"mail url: {message}")):
            transport_from_url(url)


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


@settings(max_examples=500, deadline=None)
@given(
    message=st.lists(
        st.one_of(
            st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.", b"\n.", b"\r."]),
            st.binary(max_size=12),
        ),
        max_size=20,
    ).map(b"".join)
)
def test_data_lines_are_what_aiosmtplib_writes_after_data(message: bytes) -> None:
    """Line ends made CRLF, a line starting with "." doubled, a CRLF at the end and the "."
    line: as aiosmtplib's ``execute_data_command`` prepares a message."""
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    assert data_lines(message) == expected


@pytest.mark.parametrize(
    ("reason", "stored"),
    [
        ("550 5.1.1 unknown", "550 5.1.1 unknown"),
        ("550 café", "550 café"),
        ("550 caf\udce9", "550 caf\ufffd"),  # a byte that is not UTF-8, as read
        ("550 a\x00b", "550 ab"),
        ("550 \ud800", "550 \ufffd\ufffd\ufffd"),  # a lone surrogate that stands for no byte
    ],
)
def test_a_send_error_keeps_a_reason_both_databases_store(reason: str, stored: str) -> None:
    error = PermanentSendError(reason)
    assert error.reason == stored == str(error)
    stored.encode("utf-8")  # no lone surrogate left
