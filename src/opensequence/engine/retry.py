"""What to do after a failed send: a pure policy object (no I/O, no clock of its own).

Transient failures retry with exponential backoff (``base · 2^(attempt-1)``, full jitter on the
upper half so that a burst of failures against one server spreads out) until ``horizon`` seconds
after the first attempt; the last retry is clipped to the horizon, so the final attempt happens
at it and a failure then gives up. Permanent failures never retry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from opensequence.mail.errors import PermanentSendError, SendError


@dataclass(frozen=True)
class Retry:
    at: datetime
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 60.0
    horizon_seconds: float = 86_400.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 40)
        nominal = self.base_seconds * (2.0**exponent)
        return nominal * (1.0 - self.jitter * self.rng.random())

    def decide(
        self, error: SendError, *, attempt: int, first_attempt_at: datetime, now: datetime
    ) -> Retry | GiveUp:
        """``attempt`` is the number of attempts made so far, including the one that failed."""
        if isinstance(error, PermanentSendError):
            return GiveUp(error.reason)
        deadline = first_attempt_at + timedelta(seconds=self.horizon_seconds)
        if now >= deadline:
            return GiveUp(f"retries exhausted: {error.reason}")
        remaining = (deadline - now).total_seconds()
        wait = min(self.delay(attempt), remaining)
        return Retry(at=now + timedelta(seconds=wait), reason=error.reason)
