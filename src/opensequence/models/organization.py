from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.models.base import Base, IdMixin, TimestampMixin

MAX_ORG_NAME = 256


class Organization(IdMixin, TimestampMixin, Base):
    """A tenant. Every other row belongs to exactly one organization."""

    __tablename__ = "organizations"

    name: Mapped[str] = mapped_column(String(MAX_ORG_NAME), unique=True, nullable=False)
