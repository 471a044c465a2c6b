"""Liquid rendering of subjects and bodies, sandboxed and bounded (SPEC §3.2).

python-liquid never reaches Python attributes, files or the network by itself: there is no
loader (``include``/``render`` find nothing), and the render context holds plain dicts built
here. Rendering uses the same :class:`TemplateEnvironment` (and so the same limits) that checked
the templates when the sequence was saved; every failure surfaces as :class:`TemplateError`,
which the engine records as ``template_error``.

Most subjects and bodies are text with plain substitutions (``Hi {{ contact.name }}``). For
those a render is a handful of dict lookups, but going through Liquid's render machinery (a
render context, a limited output stream, a node walk) cost ~70 µs per template, two templates
per message. Such a template is therefore also kept as a *substitution plan*: its literal text
and the key paths of its outputs. The plan is used only when every lookup lands on a plain
``dict`` key and the value is a ``str``, an ``int`` or ``None`` — then Liquid's result is known
exactly (the value, HTML-escaped with Liquid's own ``escape`` when autoescaping, and Liquid's
newline translation). Anything else (a filter, a tag, a missing key, ``size``/``first``/``last``
on something that lacks the key, any other value type, a very large output) renders through
Liquid itself. A property test holds the two paths against each other.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from liquid import escape
from liquid.builtin.content import ContentNode
from liquid.builtin.expressions import FilteredExpression, Path
from liquid.builtin.output import OutputNode
from liquid.exceptions import LiquidError

from opensequence.mail.templates import TemplateEnvironment


class TemplateError(Exception):
    """A template that does not parse, fails at render time or hits a resource limit."""


_HTML = TemplateEnvironment(autoescape=True)
_TEXT = TemplateEnvironment(autoescape=False)
_CACHE_SIZE = 512
# Outputs up to this many characters are certainly under the output stream limit (counted by
# Liquid in UTF-8 bytes, at most four per character); larger ones let Liquid decide.
_PLAN_MAX_CHARS = (TemplateEnvironment.output_stream_limit or 0) // 4

Plan = tuple[str | tuple[str, ...], ...]


def _plan(template: Any) -> Plan | None:
    """Literal text and output paths, or None when the template is more than substitutions."""
    parts: list[str | tuple[str, ...]] = []
    for node in template.nodes:
        if type(node) is ContentNode:
            parts.append(node.text)
            continue
        if type(node) is not OutputNode:
            return None
        expression = node.expression
        if type(expression) is not FilteredExpression or expression.filters:
            return None
        path = expression.left
        if type(path) is not Path or not all(type(key) is str for key in path.path):
            return None
        parts.append(tuple(str(key) for key in path.path))
    return tuple(parts)


@lru_cache(maxsize=_CACHE_SIZE)
def _parsed(source: str, html: bool) -> tuple[Any, Plan | None]:
    """Parsing costs more than rendering, and a batch renders one template for many contacts:
    parsed templates are kept by source text (immutable, so sharing them is safe)."""
    template = (_HTML if html else _TEXT).from_string(source)
    return template, _plan(template)


def _newlines(text: str) -> str:
    """Liquid's output stream translates newlines as universal-newlines text does, one write
    (one node's output) at a time."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _substitute(plan: Plan, context: dict[str, Any], html: bool) -> str | None:
    """The plan's output, or None when Liquid has to decide (see the module docstring)."""
    pieces: list[str] = []
    for part in plan:
        if type(part) is str:
            pieces.append(_newlines(part))
            continue
        value: Any = context
        for key in part:
            if type(value) is not dict or key not in value:
                return None
            value = value[key]
        if type(value) is str:
            pieces.append(_newlines(escape(value) if html else value))
        elif type(value) is int:
            pieces.append(str(value))
        elif value is not None:
            return None
    out = "".join(pieces)
    return out if len(out) <= _PLAN_MAX_CHARS else None


def render(source: str, context: dict[str, Any], *, html: bool) -> str:
    """Render ``source`` over ``context``. ``html`` escapes interpolated values so that a
    contact named ``<b>`` cannot inject markup into the body; subjects are plain text."""
    try:
        template, plan = _parsed(source, html)
        if plan is not None:
            out = _substitute(plan, context, html)
            if out is not None:
                return out
        return str(template.render(**context))
    except LiquidError as exc:
        raise TemplateError(str(exc)) from exc
    except Exception as exc:
        # What Python raises on the data inside Liquid's filters: RecursionError, MemoryError,
        # ValueError, TypeError, OverflowError (``ceil`` of a float that ``times`` took past
        # the largest finite one), ... Whatever it is, it belongs to this render alone.
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc


# A template this long, or one with a loop, can take milliseconds to seconds to render (a loop
# may run 100,000 iterations and output may reach 4 MiB): see :func:`may_be_slow`.
SLOW_TEMPLATE_CHARS = 16 * 1024
_TAG = re.compile(r"{%(.*?)%}", re.DOTALL)
_OUTPUT = re.compile(r"{{(.*?)}}", re.DOTALL)
_LOOP = re.compile(r"\b(?:for|tablerow)\b")
_RANGE = re.compile(r"\([^()]*\.\.")


def may_be_slow(source: str) -> bool:
    """Whether rendering ``source`` may take long: it has :data:`SLOW_TEMPLATE_CHARS`
    characters or more, or a ``for`` or ``tablerow`` loop or a range ``(a..b)`` inside a
    ``{% %}`` (the lines of a ``liquid`` tag included), or a range inside a ``{{ }}``. (Ranges
    of up to 100,000 items, joined in output after output, keep a render going until its CPU
    budget runs out: :data:`~opensequence.mail.templates.RENDER_CPU_SECONDS`.) A caller that
    shares its event loop renders such a template on another thread. A false alarm (the word
    in a comment) only costs that hop. A few passes over ``source``: callers ask once per
    template and batch, not per message."""
    if len(source) >= SLOW_TEMPLATE_CHARS:
        return True
    if any(_LOOP.search(tag) or _RANGE.search(tag) for tag in _TAG.findall(source)):
        return True
    return any(_RANGE.search(output) for output in _OUTPUT.findall(source))
