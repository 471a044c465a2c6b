"""An in-memory transport for pure unit tests (DESIGN rule 7: never for integration tests)."""

from __future__ import annotations

from collections.abc import Callable

from opensequence.mail.message import Outgoing


class MemoryTransport:
    """Keeps every delivered message. ``fail`` may raise a SendError for a given message."""

    def __init__(self, fail: Callable[[Outgoing], None] | None = None) -> None:
        self.sent: list[Outgoing] = []
        self._fail = fail

    async def send(self, outgoing: Outgoing) -> None:
        if self._fail is not None:
            self._fail(outgoing)
        self.sent.append(outgoing)

    async def aclose(self) -> None:
        return None
