"""``maildir://path``: the embedded default. Each message is one file under ``path/new`` that a
mail client (or a person with a text editor) can open; ``mailbox.Maildir`` writes it to ``tmp``
and renames it into place, so a reader never sees half a message."""

from __future__ import annotations

import asyncio
import mailbox
import threading
from pathlib import Path

from opensequence.mail.errors import TransientSendError
from opensequence.mail.message import Outgoing


class MaildirTransport:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._box: mailbox.Maildir | None = None
        self._lock = threading.Lock()

    def _deliver(self, outgoing: Outgoing) -> str:
        # Sends run in worker threads. Creating the maildir from several at once races (one
        # sees ``tmp/`` before another made it) and ``Maildir`` numbers its unique file names
        # with an unlocked counter, so deliveries are serialised: one small file write each.
        with self._lock:
            if self._box is None:
                self._box = mailbox.Maildir(self.path, create=True)
            return self._box.add(outgoing.message)

    async def send(self, outgoing: Outgoing) -> None:
        try:
            await asyncio.to_thread(self._deliver, outgoing)
        except (OSError, mailbox.Error) as exc:
            raise TransientSendError(f"maildir: {exc}") from exc

    async def aclose(self) -> None:
        return None
