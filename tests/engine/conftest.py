from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest

from opensequence.clock import ManualClock
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.engine.worker import Worker
from tests.engine.factories import make_worker
from tests.engine.sink import Sink, SinkServer


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))


@pytest.fixture
def sink(request: pytest.FixtureRequest) -> Iterator[SinkServer]:
    """aiosmtpd on loopback; its EHLO announces PIPELINING when the test's indirect parameter
    says so."""
    with SinkServer(Sink(), pipelining=getattr(request, "param", False)) as server:
        yield server


@pytest.fixture
async def smtp_settings(settings: Settings, sink: SinkServer) -> Settings:
    return settings.model_copy(update={"mail_url": sink.url})


@pytest.fixture
async def worker(
    db: Database, smtp_settings: Settings, clock: ManualClock
) -> AsyncIterator[Worker]:
    made = make_worker(db, smtp_settings, clock)
    yield made
    await made.transport.aclose()
