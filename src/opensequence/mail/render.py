"""Liquid rendering of subjects and bodies, sandboxed and bounded (SPEC §3.2).

python-liquid never reaches Python attributes, files or the network by itself: the only loader is
an empty in-memory one (``include``/``render`` find nothing), and the render context holds plain
dicts built here. The class-level limits below cut off templates that loop, nest or grow without
bound; every failure surfaces as :class:`TemplateError`, which the engine records as
``template_error``.
"""

from __future__ import annotations

from typing import Any

from liquid import Environment
from liquid.exceptions import LiquidError

MAX_OUTPUT_BYTES = 1024 * 1024


class TemplateError(Exception):
    """A template that does not parse, fails at render time or hits a resource limit."""


class _BoundedEnvironment(Environment):
    loop_iteration_limit = 10_000
    output_stream_limit = MAX_OUTPUT_BYTES
    local_namespace_limit = 256 * 1024
    context_depth_limit = 30


_HTML = _BoundedEnvironment(autoescape=True)
_TEXT = _BoundedEnvironment(autoescape=False)


def render(source: str, context: dict[str, Any], *, html: bool) -> str:
    """Render ``source`` over ``context``. ``html`` escapes interpolated values so that a
    contact named ``<b>`` cannot inject markup into the body; subjects are plain text."""
    environment = _HTML if html else _TEXT
    try:
        return str(environment.from_string(source).render(**context))
    except LiquidError as exc:
        raise TemplateError(str(exc)) from exc
    except (RecursionError, MemoryError, ValueError, TypeError) as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc


def check(source: str) -> None:
    """Parse ``source`` without rendering it; :class:`TemplateError` when it does not compile."""
    try:
        _TEXT.parse(source)
    except LiquidError as exc:
        raise TemplateError(str(exc)) from exc
