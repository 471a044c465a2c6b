"""The retry policy is pure: decisions from (error, attempt, first attempt, now)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from opensequence.engine.retry import GiveUp, Retry, RetryPolicy
from opensequence.mail.errors import PermanentSendError, TransientSendError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_permanent_errors_never_retry() -> None:
    policy = RetryPolicy(base_seconds=60, horizon_seconds=3600)
    verdict = policy.decide(
        PermanentSendError("bounced: 550 no such user"), attempt=1, first_attempt_at=T0, now=T0
    )
    assert verdict == GiveUp("bounced: 550 no such user")


def test_transient_backoff_doubles_with_jitter_within_bounds() -> None:
    policy = RetryPolicy(base_seconds=60, horizon_seconds=10**9, rng=random.Random(7))
    error = TransientSendError("451 busy")
    for attempt in range(1, 12):
        nominal = 60 * 2 ** (attempt - 1)
        for _ in range(20):
            verdict = policy.decide(error, attempt=attempt, first_attempt_at=T0, now=T0)
            assert isinstance(verdict, Retry)
            assert verdict.reason == "451 busy"
            wait = (verdict.at - T0).total_seconds()
            assert nominal / 2 <= wait <= nominal


def test_jitter_spreads_retries() -> None:
    policy = RetryPolicy(base_seconds=60, horizon_seconds=10**6, rng=random.Random(1))
    error = TransientSendError("timeout")
    times = {policy.decide(error, attempt=3, first_attempt_at=T0, now=T0) for _ in range(50)}
    assert len(times) > 40


def test_retries_stop_at_the_horizon() -> None:
    policy = RetryPolicy(base_seconds=60, horizon_seconds=600, rng=random.Random(3))
    error = TransientSendError("421 closing")
    now, attempt = T0, 1
    while True:
        verdict = policy.decide(error, attempt=attempt, first_attempt_at=T0, now=now)
        if isinstance(verdict, GiveUp):
            break
        assert verdict.at <= T0 + timedelta(seconds=600)
        assert verdict.at > now
        now, attempt = verdict.at, attempt + 1
    assert now == T0 + timedelta(seconds=600)
    assert verdict.reason == "retries exhausted: 421 closing"


def test_huge_attempt_counts_do_not_overflow() -> None:
    policy = RetryPolicy(base_seconds=60, horizon_seconds=86400)
    verdict = policy.decide(TransientSendError("x"), attempt=10_000, first_attempt_at=T0, now=T0)
    assert isinstance(verdict, Retry) and verdict.at == T0 + timedelta(seconds=86400)
