from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from opensequence.clock import ManualClock
from tests.engine.sink import Sink, SinkServer


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    with SinkServer(Sink()) as server:
        yield server
