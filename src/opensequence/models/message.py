from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.db.types import UTCDateTime, utcnow
from opensequence.models.base import Base, IdMixin, TimestampMixin

MESSAGE_STATUSES = ("sending", "sent", "failed", "skipped")


class Message(IdMixin, TimestampMixin, Base):
    """The send record: exactly one per (enrollment, step), committed as ``sending`` before the
    provider is called (DESIGN rule 3). ``message_id`` (the Message-ID header, angle brackets
    included) derives from this row's id, so a retry after a crash carries the same Message-ID.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("enrollment_id", "step_index"),
        Index("ix_messages_contact_id_created_at", "contact_id", "created_at"),
        # The per-sender throttle counts through this one (migration 0006); nothing looks send
        # records up by ``sent_at`` (migration 0010).
        Index("ix_messages_org_id_updated_at", "org_id", "updated_at"),
    )

    # No foreign key of its own (migration 0009): the enrollment's key removes the record with
    # its organization, and a second key cost every insert a lock on the organization's row.
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    enrollment_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("enrollments.id", ondelete="CASCADE"), nullable=False
    )
    sequence_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    contact_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    step_index: Mapped[int] = mapped_column(Integer, nullable=False)
    from_email: Mapped[str | None] = mapped_column(Text, nullable=True)
    to_email: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    message_id: Mapped[str] = mapped_column(Text, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )
