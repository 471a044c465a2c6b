"""The one Liquid environment for email subjects and bodies (SPEC §3.2).

Templates are parsed when a sequence is created or updated, so a syntax error is a 400 naming
the step, the field and the line, never a failed send days later. The delivery engine renders
with this same environment, whose limits bound what a template may cost: no loader (``include``
and ``render`` find no files), capped loop iterations, local namespace and output size.
"""

from __future__ import annotations

import re
from collections import deque
from functools import cache

from liquid import BoundTemplate, Environment
from liquid.exceptions import LiquidError


class TemplateEnvironment(Environment):
    """Sandboxed by Liquid's design (no attribute access beyond the data given); bounded here."""

    loop_iteration_limit = 100_000
    local_namespace_limit = 1_000_000
    output_stream_limit = 4 * 1024 * 1024


class TemplateSyntaxError(ValueError):
    """A template that does not parse; ``line`` is 1-based."""

    def __init__(self, line: int, detail: str) -> None:
        super().__init__(f"line {line}: {detail}")
        self.line = line
        self.detail = detail


# Liquid's lexer tries each "{{" as an output statement, scanning ahead for its "}}", and each
# "{% raw %}" for its "{% endraw %}", inside comment and raw blocks too. Openers past the last
# closer each scan to the end of the template: 20,000 "{{" (40 kB, where 256 KiB are accepted)
# took 47 s to parse. A template with more such openers than this is refused without the scans
# (usually it has a syntax error anyway; fewer cost little and get Liquid's own answer).
MAX_UNCLOSED_OPENERS = 100
_OPENERS = (
    (re.compile(r"\{\{"), re.compile(r"\}\}"), "'{{'", "'}}'"),
    (
        re.compile(r"\{%-?\s*raw\s*-?%\}"),
        re.compile(r"\{%-?\s*endraw\s*-?%\}"),
        "'{% raw %}'",
        "'{% endraw %}'",
    ),
    (
        re.compile(r"\{%-?\s*doc\s*-?%\}"),
        re.compile(r"\{%-?\s*enddoc\s*-?%\}"),
        "'{% doc %}'",
        "'{% enddoc %}'",
    ),
)


def _refuse_many_unclosed(source: str) -> None:
    """Raise :class:`TemplateSyntaxError` when more than :data:`MAX_UNCLOSED_OPENERS` openers
    of one kind come after the last closer of that kind (one pass per kind), naming the line
    of the first."""
    for opener, closer, opens, closes in _OPENERS:
        last = deque(closer.finditer(source), maxlen=1)
        tail = last[0].end() if last else 0
        unclosed = opener.finditer(source, tail)
        first = next(unclosed, None)
        if first is None:
            continue
        count = 1 + sum(1 for _ in unclosed)
        if count > MAX_UNCLOSED_OPENERS:
            line = source.count("\n", 0, first.start()) + 1
            raise TemplateSyntaxError(
                line,
                f"{count} {opens} with no {closes} after them; at most {MAX_UNCLOSED_OPENERS}"
                " are accepted, in comment and raw blocks too",
            )


@cache
def template_environment() -> TemplateEnvironment:
    return TemplateEnvironment()


def compile_template(source: str) -> BoundTemplate:
    """Parse ``source`` with the shared environment; a syntax error raises
    :class:`TemplateSyntaxError` whose message starts with ``line N:``.

    Liquid reports no position for errors found at the end of the input (an unclosed block, an
    unfinished expression on the last line); those name the last line, "at end of template".
    """
    _refuse_many_unclosed(source)
    try:
        return template_environment().from_string(source)
    except LiquidError as exc:
        detail = str(exc.message) if exc.message is not None else "syntax error"
        context = exc.context()
        if context is not None:
            raise TemplateSyntaxError(context[0], detail) from exc
        last_line = max(1, len(source.splitlines()))
        raise TemplateSyntaxError(last_line, f"{detail} (at end of template)") from exc
