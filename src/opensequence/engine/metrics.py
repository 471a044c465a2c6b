"""Prometheus metrics of the engine, registered in whichever registry the process exposes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "opensequence_messages",
            "Send records finished by this process, by final status",
            ["status"],
            registry=registry,
        )
        self.retries = Counter(
            "opensequence_message_retries",
            "Transient send failures scheduled for a retry",
            registry=registry,
        )
        self.due_backlog = Gauge(
            "opensequence_due_backlog",
            "Active enrollments whose next step is due now",
            registry=registry,
        )
        self.oldest_due_lag = Gauge(
            "opensequence_oldest_due_lag_seconds",
            "How long the oldest due step has been waiting",
            registry=registry,
        )
