from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from opensequence.db.types import JSONType, UTCDateTime
from opensequence.models.base import Base, IdMixin, TimestampMixin

RUN_KINDS = ("add_contacts", "start", "import")
OUTCOMES = (
    "added",
    "created_and_added",
    "filtered_out",
    "already_enrolled",
    "duplicate_in_request",
    "not_found",
)


class Run(IdMixin, TimestampMixin, Base):
    """One batch of enrollments: a start, an add-contacts request or a CSV import.

    ``counts`` (every outcome key, 0 when none) is written once, in the same transaction that
    creates the run: outcomes never change afterwards.
    """

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_sequence_id", "sequence_id"),)

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    sequence_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("sequences.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    counts: Mapped[dict[str, int]] = mapped_column(JSONType, nullable=False, default=dict)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RunItemPage(Base):
    """The per-item outcomes of an add-contacts (or import) run, in request order, up to a
    thousand items per row (``opensequence.runs.pages`` packs and reads them).

    Start runs do not write items: their items are derived from the enrollments they created
    (``Enrollment.run_index``), which keeps a million-contact start to one INSERT … SELECT.
    """

    __tablename__ = "run_item_pages"

    run_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    first_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_index: Mapped[int] = mapped_column(Integer, nullable=False)
    # Bit i set when OUTCOMES[i] occurs in the page.
    outcomes: Mapped[int] = mapped_column(Integer, nullable=False)
    # JSON array of [index, input, contact_id, outcome, reason].
    items: Mapped[str] = mapped_column(Text, nullable=False)
