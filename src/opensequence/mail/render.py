"""Liquid rendering of subjects and bodies, sandboxed and bounded (SPEC §3.2).

python-liquid never reaches Python attributes, files or the network by itself: there is no
loader (``include``/``render`` find nothing), and the render context holds plain dicts built
here. Rendering uses the same :class:`TemplateEnvironment` (and so the same limits) that checked
the templates when the sequence was saved; every failure surfaces as :class:`TemplateError`,
which the engine records as ``template_error``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from liquid.exceptions import LiquidError

from opensequence.mail.templates import TemplateEnvironment


class TemplateError(Exception):
    """A template that does not parse, fails at render time or hits a resource limit."""


_HTML = TemplateEnvironment(autoescape=True)
_TEXT = TemplateEnvironment(autoescape=False)
_CACHE_SIZE = 512


@lru_cache(maxsize=_CACHE_SIZE)
def _parsed(source: str, html: bool) -> Any:
    """Parsing costs more than rendering, and a batch renders one template for many contacts:
    parsed templates are kept by source text (immutable, so sharing them is safe)."""
    return (_HTML if html else _TEXT).from_string(source)


def render(source: str, context: dict[str, Any], *, html: bool) -> str:
    """Render ``source`` over ``context``. ``html`` escapes interpolated values so that a
    contact named ``<b>`` cannot inject markup into the body; subjects are plain text."""
    try:
        return str(_parsed(source, html).render(**context))
    except LiquidError as exc:
        raise TemplateError(str(exc)) from exc
    except (RecursionError, MemoryError, ValueError, TypeError) as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
