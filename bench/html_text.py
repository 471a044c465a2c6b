"""The plain-text part on malformed and on ordinary markup: ``html_to_text`` against the
stdlib's ``HTMLParser`` (which built the text part before; here with no handlers, so only its
parsing is timed) and against a raw baseline, one regular expression that strips tags.

Each malformed pattern is repeated 10,000 and 20,000 times: a linear reader takes about twice
as long for twice the input, one that rescans the rest of the body at every "<" about four
times. The ordinary body is a ~60 kB newsletter with a style block and comments.

    .venv/bin/python bench/html_text.py
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from html.parser import HTMLParser

from opensequence.mail.message import html_to_text

MALFORMED = {
    "<a b='": "<a b='",
    "<!--": "<!--",
    "</ x": "</ x",
    "<?": "<?",
    "<a": "<a",
}
NEWSLETTER = (
    "<!DOCTYPE html><html><head><style>td { padding: 4px; } .x { color: red; }</style></head>"
    "<body><!-- [if mso]><table><![endif] -->"
    + "".join(
        f"<tr><td class='item' valign=top><a href='https://shop.example/i/{i}?a=1&amp;b=2'>"
        f"Item {i}</a> &mdash; <b>only &euro;{i}.99</b></td></tr>"
        for i in range(500)
    )
    + "</body></html>"
)
TAGS = re.compile(r"<[^>]*>")


def stdlib(body: str) -> None:
    parser = HTMLParser(convert_charrefs=True)
    parser.feed(body)
    parser.close()


def seconds(work: Callable[[str], object], body: str) -> float:
    started = time.process_time()
    work(body)
    return time.process_time() - started


def main() -> None:
    readers: dict[str, Callable[[str], object]] = {
        "html_to_text": html_to_text,
        "stdlib HTMLParser": stdlib,
        "raw: strip tags": lambda body: TAGS.sub("", body),
    }
    print(f"{'body':<28}" + "".join(f"{name:>22}" for name in readers))
    for label, piece in MALFORMED.items():
        for times in (10_000, 20_000):
            body = piece * times
            row = "".join(f"{seconds(work, body) * 1000:19.1f} ms" for work in readers.values())
            print(f"{label!r} x {times:,} ({len(body) // 1000} kB)".ljust(28) + row)
    row = "".join(f"{seconds(work, NEWSLETTER) * 1000:19.2f} ms" for work in readers.values())
    print(f"newsletter ({len(NEWSLETTER) // 1000} kB)".ljust(28) + row)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
