"""Per-API-key rate limiting over the ``limits`` library: memory storage in one process, Redis
storage shared by many API processes (``OPENSEQUENCE_REDIS_URL``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string


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
        self.item = parse(rate)
        self._pool: redis.asyncio.ConnectionPool | None = None
        if redis_url:
            # Our own pool so that shutdown can close its sockets (aclose below).
            self._pool = redis.asyncio.ConnectionPool.from_url(redis_url)
            self.storage = storage_from_string(
                "async+" + redis_url.removeprefix("async+"),
                implementation="redispy",
                connection_pool=self._pool,  # type: ignore[arg-type]
                key_prefix=namespace,
            )
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
