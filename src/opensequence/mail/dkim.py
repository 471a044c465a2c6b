"""Optional DKIM signing (SPEC §5) with dkimpy, as a wrapper around any transport.

With ``OPENSEQUENCE_DKIM_SELECTOR`` and ``OPENSEQUENCE_DKIM_KEY_DIR`` set, a message whose
envelope sender's domain has ``<KEY_DIR>/<domain>.pem`` (a PEM RSA private key) is signed
(``rsa-sha256``, relaxed/relaxed) right before it is handed to the transport; mail from any
other domain goes out unsigned. Keys are read once per domain and cached (a missing key too), so
adding a key takes a worker restart.

The message reaches the transport already serialised (``Outgoing.data``), so the signature is
computed over exactly the bytes the server receives: the ``DKIM-Signature`` header is prepended
to them and nothing is re-serialised afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import re
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import TYPE_CHECKING

import dkim

from opensequence.mail.message import Outgoing, domain_of

if TYPE_CHECKING:
    from opensequence.config import Settings
    from opensequence.mail.transports import Transport

log = logging.getLogger(__name__)

_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)


class DkimSigner:
    def __init__(self, selector: str, key_dir: str | Path) -> None:
        self.selector = selector.encode()
        self.key_dir = Path(key_dir)
        self._keys: dict[str, bytes | None] = {}

    def key_for(self, domain: str) -> bytes | None:
        """The private key for ``domain`` (None when there is none). Only plain domain names
        become file names: nothing in a sender address can point outside ``key_dir``."""
        domain = domain.lower()
        if domain not in self._keys:
            key = None
            if _DOMAIN.match(domain):
                path = self.key_dir / f"{domain}.pem"
                try:
                    key = path.read_bytes()
                except FileNotFoundError:
                    key = None
            self._keys[domain] = key
        return self._keys[domain]

    def sign(self, outgoing: Outgoing) -> Outgoing:
        domain = domain_of(outgoing.sender)
        key = self.key_for(domain)
        if key is None:
            return outgoing
        raw = outgoing.data
        present = BytesHeaderParser().parsebytes(raw)
        signature = dkim.sign(
            raw,
            self.selector,
            domain.encode(),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[h for h in SIGNED_HEADERS if present[h.decode()] is not None],
        )
        return Outgoing(outgoing.sender, outgoing.recipient, signature + raw)


class SigningTransport:
    """Signs, then delegates. Signing is RSA work, so it runs in a thread off the event loop."""

    def __init__(self, inner: Transport, signer: DkimSigner) -> None:
        self.inner = inner
        self.signer = signer

    async def send(self, outgoing: Outgoing) -> None:
        signed = await asyncio.to_thread(self.signer.sign, outgoing)
        await self.inner.send(signed)

    async def aclose(self) -> None:
        await self.inner.aclose()


def signing_transport(transport: Transport, settings: Settings) -> Transport:
    """``transport`` wrapped to sign when DKIM is configured, else ``transport`` itself."""
    if settings.dkim_selector and settings.dkim_key_dir:
        signer = DkimSigner(settings.dkim_selector, settings.dkim_key_dir)
        return SigningTransport(transport, signer)
    return transport
