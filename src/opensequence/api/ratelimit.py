"""Per-API-key rate limiting over the ``limits`` library: memory storage in one process, Redis
storage shared by many API processes (``OPENSEQUENCE_REDIS_URL``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

REDIS_SCHEMES = ("redis", "rediss")
REDIS_URL_FORM = "redis://HOST:PORT[/DB] or rediss://HOST:PORT[/DB]"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


class RateLimiter:
    """A moving window: never more than N requests in any window of the configured length, so
    a burst across a minute boundary cannot double the budget."""

    def __init__(self, rate: str, redis_url: str | None = None, namespace: str = "osq") -> None:
        """Raises ValueError when no storage can be built from ``redis_url``. Building one
        connects nothing: a server that does not answer is met by the first request."""
        self.item = parse(rate)
        self._pool: redis.asyncio.ConnectionPool | None = None
        if redis_url:
            if urlsplit(redis_url).scheme not in REDIS_SCHEMES:
                # A socket path is neither: redis-py spells it unix://, limits redis+unix://.
                raise ValueError(f"must be {REDIS_URL_FORM}")
            try:
                # Our own pool so that shutdown can close its sockets (aclose below).
                self._pool = redis.asyncio.ConnectionPool.from_url(redis_url)
                self.storage = storage_from_string(
                    "async+" + redis_url,
                    implementation="redispy",
                    connection_pool=self._pool,  # type: ignore[arg-type]
                    key_prefix=namespace,
                )
            except (ValueError, ConfigurationError) as exc:
                raise ValueError(f"{str(exc).rstrip('.')}; expected {REDIS_URL_FORM}") from exc
        else:
            self.storage = storage_from_string("async+memory://")
        self.strategy = MovingWindowRateLimiter(self.storage)

    async def hit(self, key: str) -> RateDecision:
        allowed = await self.strategy.hit(self.item, key)
        stats = await self.strategy.get_window_stats(self.item, key)
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        return RateDecision(
            allowed=allowed,
            limit=self.item.amount,
            remaining=max(0, stats.remaining),
            reset_seconds=reset,
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()
