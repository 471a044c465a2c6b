from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, Integer, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.models.base import Base, TimestampMixin


class SenderLimit(TimestampMixin, Base):
    """A per-sender throttle (SPEC §5): ``sender`` is a lower-cased email address or domain;
    each limit is a sliding window honoured across every worker."""

    __tablename__ = "sender_limits"

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    sender: Mapped[str] = mapped_column(Text, primary_key=True)
    per_second: Mapped[int | None] = mapped_column(Integer, nullable=True)
    per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
