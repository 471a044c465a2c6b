from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.models.base import Base, TimestampMixin

SUPPRESSION_REASONS = ("unsubscribed", "bounced", "complained", "manual")


class Suppression(TimestampMixin, Base):
    """An address an organization must not mail. ``unsubscribed`` blocks only marketing
    (non-transactional) mail; ``bounced``, ``complained`` and ``manual`` block all mail."""

    __tablename__ = "suppressions"

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    email_normalized: Mapped[str] = mapped_column(Text, primary_key=True)
    email: Mapped[str] = mapped_column(Text, nullable=False)
    reason: Mapped[str] = mapped_column(String(16), nullable=False)
