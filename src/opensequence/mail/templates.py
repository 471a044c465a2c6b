"""The one Liquid environment for email subjects and bodies (SPEC §3.2).

Templates are parsed when a sequence is created or updated, so a syntax error is a 400 naming
the step, the field and the line, never a failed send days later. The delivery engine renders
with this same environment, whose limits bound what a template may cost: no loader (``include``
and ``render`` find no files), capped loop iterations, local namespace and output size.
"""

from __future__ import annotations

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


@cache
def template_environment() -> TemplateEnvironment:
    return TemplateEnvironment()


def compile_template(source: str) -> BoundTemplate:
    """Parse ``source`` with the shared environment; a syntax error raises
    :class:`TemplateSyntaxError` whose message starts with ``line N:``.

    Liquid reports no position for errors found at the end of the input (an unclosed block, an
    unfinished expression on the last line); those name the last line, "at end of template".
    """
    try:
        return template_environment().from_string(source)
    except LiquidError as exc:
        detail = str(exc.message) if exc.message is not None else "syntax error"
        context = exc.context()
        if context is not None:
            raise TemplateSyntaxError(context[0], detail) from exc
        last_line = max(1, len(source.splitlines()))
        raise TemplateSyntaxError(last_line, f"{detail} (at end of template)") from exc
