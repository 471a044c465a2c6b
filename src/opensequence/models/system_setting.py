from __future__ import annotations

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.models.base import Base


class SystemSetting(Base):
    """Installation-wide values generated on first run (e.g. the unsubscribe signing secret when
    ``OPENSEQUENCE_SECRET_KEY`` is not set), so that every process of the install agrees."""

    __tablename__ = "system_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
