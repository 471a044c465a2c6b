from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.db.types import UTCDateTime, utcnow
from opensequence.models.base import Base, IdMixin, TimestampMixin

ENROLLMENT_STATUSES = ("active", "completed", "canceled", "failed")
WAITING_REASONS = ("retrying", "throttled", "outside_window")


class Enrollment(IdMixin, TimestampMixin, Base):
    """A contact's place in a sequence. This table **is** the timer wheel: a due step is a row
    with ``status='active'`` and ``next_step_at <= now``; workers claim batches of such rows by
    setting ``locked_until``/``locked_by`` (a lease), and an expired lease is fair game again.

    ``contact_id`` has no foreign key: a deleted contact's enrollments stay (canceled) with only
    the id. ``run_index`` is the enrollment's position within a start run (its run items).
    """

    __tablename__ = "enrollments"
    __table_args__ = (
        UniqueConstraint("sequence_id", "contact_id"),
        # Only the claim's ``next_step_at <= now`` implies the second condition, so statements
        # that look enrollments up by id and guard on the status use the primary key even
        # when the planner has no statistics (migration 0008).
        Index(
            "ix_enrollments_due",
            "next_step_at",
            postgresql_where=text("status = 'active' AND next_step_at IS NOT NULL"),
            sqlite_where=text("status = 'active' AND next_step_at IS NOT NULL"),
        ),
        Index("ix_enrollments_run_id_run_index", "run_id", "run_index"),
        Index("ix_enrollments_contact_id", "contact_id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    sequence_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("sequences.id", ondelete="CASCADE"), nullable=False
    )
    contact_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    run_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
    )
    run_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")
    current_step: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_step_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    waiting_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    locked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )
