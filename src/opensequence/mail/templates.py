"""The one Liquid environment for email subjects and bodies (SPEC §3.2).

Templates are parsed when a sequence is created or updated, so a syntax error is a 400 naming
the step, the field and the line, never a failed send days later. The delivery engine renders
with this same environment, whose limits bound what a template may cost: no loader (``include``
and ``render`` find no files), capped loop iterations (per loop and per render), range sizes,
local namespace, output size and CPU time per render.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from functools import cache
from typing import Any

from liquid import BoundTemplate, Environment, RenderContext
from liquid.builtin.expressions.primitive import RangeLiteral
from liquid.exceptions import LiquidError, LoopIterationLimitError, ResourceLimitError

# What one render may cost, beyond Liquid's own limits on one loop, the local namespace and the
# output. Liquid bounds each loop (and loops nested in it), not their sum: a 256 KiB template
# holds ~6,900 sibling loops of 100,000 empty iterations, ~17 minutes of CPU per render. And a
# range outside a loop is not bounded at all: ``{{ (1..2000000) | join }}`` built 15 MB in 3 s,
# and a bound of 10**12 would take the worker's memory.
LOOP_ITERATIONS = 100_000  # per loop, and for all loops of a render together
MAX_RANGE = LOOP_ITERATIONS  # items of a range literal, ``(1..n)``
RENDER_CPU_SECONDS = 2.0  # of the rendering thread, checked as nodes render
_CHECK_EVERY = 8  # nodes between reads of the thread's CPU clock (~0.75 us each)


class _Budget:
    """One render's allowance: loop iterations across all its loops, and CPU time."""

    __slots__ = ("countdown", "deadline", "iterations")

    def __init__(self) -> None:
        self.iterations = 0
        self.countdown = _CHECK_EVERY
        self.deadline = time.thread_time() + RENDER_CPU_SECONDS

    def loop(self, iterations: int) -> None:
        self.iterations += iterations
        if self.iterations > LOOP_ITERATIONS:
            raise LoopIterationLimitError(
                f"more than {LOOP_ITERATIONS:,} loop iterations in all", token=None
            )

    def step(self) -> None:
        self.countdown -= 1
        if not self.countdown:
            self.countdown = _CHECK_EVERY
            if time.thread_time() > self.deadline:
                raise ResourceLimitError(
                    f"rendering took more than {RENDER_CPU_SECONDS:g} s of CPU", token=None
                )


class _Context(RenderContext):
    """A render context that spends one budget (its parent's, for a copy) as the render goes:
    the iterations of every loop, and a step for every node rendered."""

    __slots__ = ("_disabled", "budget")
    _disabled: list[str]
    budget: _Budget

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parent = kwargs.get("parent_context")
        self.budget = parent.budget if isinstance(parent, _Context) else _Budget()
        super().__init__(*args, **kwargs)

    # Liquid reads a context's ``disabled_tags`` as it renders each node (an output, a tag, each
    # node of a loop's body at each iteration, the taken branch of an ``if``): the one call made
    # for every piece of work, and so where the CPU budget is checked. An expensive condition
    # in a loop, say, writes nothing and assigns nothing.
    @property
    def disabled_tags(self) -> list[str]:
        self.budget.step()
        return self._disabled

    @disabled_tags.setter
    def disabled_tags(self, value: list[str]) -> None:
        self._disabled = value

    def raise_for_loop_limit(self, length: int = 1) -> None:
        super().raise_for_loop_limit(length)
        self.budget.loop(length)


class _Template(BoundTemplate):
    context_class = _Context


OUTPUT_LIMIT = 4 * 1024 * 1024  # bytes a render may write (Liquid's output stream limit)
# What one filter may make. Liquid's own limits see a render's output, not the values its
# filters compute on the way, in an output or an ``assign``: a 2 kB subject squaring a number
# 22 times (``x | times: x``) computed with a 4-million-bit integer, ~10 s of CPU inside one
# node, where the CPU budget is not looked at; ``s | replace: "x", s`` over a 12 kB string made
# a 144-million-character one. So every filter spends a step of the budget, and refuses to make
# an integer of more than MAX_INTEGER_BITS, a string of more than OUTPUT_LIMIT characters or a
# list of more than MAX_RANGE items (``replace``, ``join`` and ``split`` before they make it).
MAX_INTEGER_BITS = 4096


def _too_big(what: str) -> ResourceLimitError:
    return ResourceLimitError(f"a filter made {what}", token=None)


def _check_made(made: object) -> None:
    if type(made) is int and made.bit_length() > MAX_INTEGER_BITS:
        raise _too_big(f"an integer of more than {MAX_INTEGER_BITS:,} bits")
    if isinstance(made, str) and len(made) > OUTPUT_LIMIT:
        raise _too_big(f"a string of more than {OUTPUT_LIMIT:,} characters")
    if isinstance(made, list) and len(made) > MAX_RANGE:
        raise _too_big(f"a list of more than {MAX_RANGE:,} items")


def _replace_would_make(value: object, old: object = "", new: object = "", *_: object) -> None:
    """``replace`` of every ``old`` in ``value``: refused before it is made when too long."""
    text, old, new = str(value), str(old), str(new)
    count = text.count(old) if old else len(text) + 1
    if len(text) + count * (len(new) - len(old)) > OUTPUT_LIMIT:
        raise _too_big(f"a string of more than {OUTPUT_LIMIT:,} characters")


def _join_would_make(value: object, separator: object = " ", *_: object) -> None:
    """``join`` of a list: its items and separators, counted before they are joined (a list of
    5,000 empty items joined by a 150,000-character separator made 750 MB)."""
    if not isinstance(value, list | tuple) or not value:
        return
    length = len(str(separator)) * (len(value) - 1)
    for item in value:
        length += len(item) if isinstance(item, str) else len(str(item))
        if length > OUTPUT_LIMIT:
            raise _too_big(f"a string of more than {OUTPUT_LIMIT:,} characters")


def _split_would_make(value: object, separator: object = "", *_: object) -> None:
    text, separator = str(value), str(separator)
    if (text.count(separator) if separator else len(text)) >= MAX_RANGE:
        raise _too_big(f"a list of more than {MAX_RANGE:,} items")


_BEFORE: dict[str, Callable[..., None]] = {
    "join": _join_would_make,
    "replace": _replace_would_make,
    "split": _split_would_make,
}


def _bounded_filter(name: str, liquid_filter: Any) -> Any:
    """``liquid_filter`` spending the render's budget and checked for what it makes."""
    wants_context = getattr(liquid_filter, "with_context", False)
    before = _BEFORE.get(name)

    def bounded(*args: Any, context: Any, **kwargs: Any) -> Any:
        if isinstance(context, _Context):
            context.budget.step()
        if before is not None:
            before(*args)
        if wants_context:
            kwargs["context"] = context
        made = liquid_filter(*args, **kwargs)
        _check_made(made)
        return made

    bounded.with_context = True  # type: ignore[attr-defined]
    if getattr(liquid_filter, "with_environment", False):
        bounded.with_environment = True  # type: ignore[attr-defined]
    return bounded


class TemplateEnvironment(Environment):
    """Sandboxed by Liquid's design (no attribute access beyond the data given); bounded here."""

    loop_iteration_limit = LOOP_ITERATIONS
    local_namespace_limit = 1_000_000
    output_stream_limit = OUTPUT_LIMIT
    template_class = _Template

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}


def _bounded_range(self: RangeLiteral, start: Any, stop: Any) -> range:
    made = _liquid_range(self, start, stop)
    if len(made) > MAX_RANGE:
        raise LoopIterationLimitError(
            f"a range of {len(made):,} items (at most {MAX_RANGE:,})", token=None
        )
    return made


# Liquid offers no hook for range literals: the parser builds RangeLiteral itself. Its one
# constructor of ranges is wrapped here, for every Liquid template of the process (they are all
# this module's). Should a release of python-liquid rename it, import fails here, loudly.
_liquid_range = RangeLiteral._make_range
RangeLiteral._make_range = _bounded_range  # type: ignore[method-assign]


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
