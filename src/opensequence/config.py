"""Settings, read from the environment (prefix ``OPENSEQUENCE_``) and an optional ``.env`` file.

Nothing here is built at import time: callers construct :class:`Settings` when they start.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Unsubscribe links go into a header line of every non-transactional message, ``List-Unsubscribe:
# <PUBLIC_URL/unsubscribe/TOKEN>`` (a 64-character token), which must fit in 998 characters
# (RFC 5322): a longer line is refused with a 5xx, a bounce that would suppress every recipient.
MAX_PUBLIC_URL = 800

_RATE = re.compile(r"^\s*\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPENSEQUENCE_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = "sqlite:///./opensequence.db"
    mail_url: str = "maildir://./outbox"
    public_url: str = "http://127.0.0.1:8000"
    secret_key: str | None = None
    rate_limit: str = "100/minute"
    redis_url: str | None = None
    worker_poll_seconds: Annotated[float, Field(gt=0)] = 1.0
    worker_lease_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_contacts_per_request: Annotated[int, Field(ge=1)] = 10_000
    retry_base_seconds: Annotated[float, Field(gt=0)] = 60.0
    retry_horizon_seconds: Annotated[float, Field(gt=0)] = 86_400.0
    dkim_selector: str | None = None
    dkim_key_dir: str | None = None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "sqlite+", "postgresql:", "postgresql+", "postgres:")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_fits_a_header(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if not value.isascii() or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError("must be ASCII without spaces (write a non-ASCII host in punycode)")
        if len(value) > MAX_PUBLIC_URL:
            raise ValueError(f"must be at most {MAX_PUBLIC_URL} characters")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_syntax(cls, value: str) -> str:
        if not _RATE.match(value):
            raise ValueError("must look like '100/minute'")
        return value


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (used in one-line config errors)."""
    return f"OPENSEQUENCE_{field.upper()}"
