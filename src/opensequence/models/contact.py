from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.db.types import JSONType, UTCDateTime, utcnow
from opensequence.models.base import Base, IdMixin, TimestampMixin


class Contact(IdMixin, TimestampMixin, Base):
    """A person an organization may write to.

    Identity inside an organization: ``email_normalized`` (lower-cased email) and
    ``phone_number`` (E.164 when it parses, else the raw text) are each unique per organization.
    ``email_normalized`` is a stored column rather than a functional index so that
    ``INSERT … ON CONFLICT`` can target it on both databases.

    Deleting a contact removes the row; enrollments and messages keep only its id (no foreign
    key on purpose) so delivery history survives without personal data.
    """

    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint("org_id", "email_normalized"),
        UniqueConstraint("org_id", "phone_number"),
        Index("ix_contacts_org_id_created_at", "org_id", "created_at"),
        Index("ix_contacts_org_id_updated_at", "org_id", "updated_at"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    email: Mapped[str | None] = mapped_column(Text, nullable=True)
    email_normalized: Mapped[str | None] = mapped_column(Text, nullable=True)
    phone_number: Mapped[str | None] = mapped_column(Text, nullable=True)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)
    custom_data: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )
