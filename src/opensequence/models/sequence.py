from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.db.types import JSONType, UTCDateTime, utcnow
from opensequence.models.base import Base, IdMixin, TimestampMixin

SEQUENCE_STATUSES = ("pending", "active", "complete", "canceled")


class Sequence(IdMixin, TimestampMixin, Base):
    """A contact filter plus ordered steps (``sequence_steps``).

    ``filter`` is stored as given after validation (null = all contacts); ``send_window`` is the
    optional additive field of SPEC §5.
    """

    __tablename__ = "sequences"
    __table_args__ = (
        UniqueConstraint("org_id", "custom_id"),
        Index("ix_sequences_org_id_status", "org_id", "status"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    custom_id: Mapped[str | None] = mapped_column(String(50), nullable=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    is_continuous: Mapped[bool] = mapped_column(Boolean, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    filter: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    send_window: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )


class SequenceStep(Base):
    """One step of a sequence, by position. A row per step (not a JSON array on the sequence)
    so that workers can stamp ``started_at``/``ended_at`` with one guarded UPDATE each instead
    of a racy read-modify-write of the whole list."""

    __tablename__ = "sequence_steps"

    sequence_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("sequences.id", ondelete="CASCADE"), primary_key=True
    )
    step_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    action: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    delay_in_minutes: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
