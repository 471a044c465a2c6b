"""Per-API-key rate limiting over the ``limits`` library: memory storage in one process, Redis
storage shared by many API processes (``OPENSEQUENCE_REDIS_URL``)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_URL_FORM = "redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] or unix:///PATH[?db=DB]"
# How long the shared storage may take to connect or answer before a request goes through
# without counting (see RateLimiter.hit); how often that is logged while it lasts.
REDIS_TIMEOUT_SECONDS = 1.0
UNCOUNTED_LOG_SECONDS = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    # False when the shared storage could not be reached: the request was not counted.
    counted: bool = True

    def headers(self) -> dict[str, str]:
        if not self.counted:
            return {}
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
            parts = urlsplit(redis_url)
            if parts.scheme not in REDIS_SCHEMES:
                raise ValueError(f"must be {REDIS_URL_FORM}")
            if parts.scheme == "unix" and (parts.netloc or not parts.path):
                # unix://redis.sock would name a host; the socket's path must follow "///".
                raise ValueError(f"a socket's path must be absolute; expected {REDIS_URL_FORM}")
            # redis-py spells a socket unix:///PATH, limits redis+unix:///PATH.
            storage_url = "redis+" + redis_url if parts.scheme == "unix" else redis_url
            try:
                # Our own pool so that shutdown can close its sockets (aclose below).
                self._pool = redis.asyncio.ConnectionPool.from_url(
                    redis_url,
                    socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                    socket_timeout=REDIS_TIMEOUT_SECONDS,
                )
                self.storage = storage_from_string(
                    "async+" + storage_url,
                    implementation="redispy",
                    connection_pool=self._pool,  # type: ignore[arg-type]
                    key_prefix=namespace,
                )
            except (ValueError, ConfigurationError) as exc:
                raise ValueError(f"{str(exc).rstrip('.')}; expected {REDIS_URL_FORM}") from exc
        else:
            self.storage = storage_from_string("async+memory://")
        self.strategy = MovingWindowRateLimiter(self.storage)
        self._uncounted_logged_at = -math.inf

    async def hit(self, key: str) -> RateDecision:
        """Count a request of ``key``. When the shared storage (Redis) cannot be reached, the
        request goes through uncounted, without rate-limit headers, and a warning is logged
        (every :data:`UNCOUNTED_LOG_SECONDS` while it lasts): the limit guards the API, and an
        outage of its store should not stop the API (every authenticated request answered
        500 until Redis came back)."""
        try:
            allowed = await self.strategy.hit(self.item, key)
            stats = await self.strategy.get_window_stats(self.item, key)
        except (redis.exceptions.RedisError, OSError) as exc:
            if time.monotonic() - self._uncounted_logged_at >= UNCOUNTED_LOG_SECONDS:
                self._uncounted_logged_at = time.monotonic()
                log.warning("rate-limit storage unreachable, requests go uncounted: %s", exc)
            return RateDecision(True, self.item.amount, self.item.amount, 0, counted=False)
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
