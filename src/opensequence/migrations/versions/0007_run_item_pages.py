"""Run items in pages: one row per thousand items instead of one per item.

Writing one result row per item cost an add-contacts request of 10,000 items more than its
enrollments. ``run_item_pages`` holds the same items as a JSON array per page, with the first
and last index and a bitmask of the outcomes present so a filtered listing skips pages. The
existing rows are packed into pages here (and unpacked again on downgrade).

Revision ID: 0007
Revises: 0006
"""

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from opensequence.db.types import JSONType
from opensequence.runs.pages import StoredItem, pack, unpack

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PAGES = sa.table(
    "run_item_pages",
    sa.column("run_id", sa.Uuid()),
    sa.column("first_index", sa.Integer()),
    sa.column("last_index", sa.Integer()),
    sa.column("outcomes", sa.Integer()),
    sa.column("items", sa.Text()),
)
_ITEMS = sa.table(
    "run_items",
    sa.column("run_id", sa.Uuid()),
    sa.column("item_index", sa.Integer()),
    sa.column("input", JSONType),
    sa.column("contact_id", sa.Uuid()),
    sa.column("outcome", sa.String()),
    sa.column("reason", sa.Text()),
)


def _runs_of_items(rows: Iterator[Any]) -> Iterator[tuple[uuid.UUID, list[StoredItem]]]:
    """Group rows ordered by (run_id, item_index) into runs."""
    current: uuid.UUID | None = None
    items: list[StoredItem] = []
    for row in rows:
        if row.run_id != current:
            if current is not None:
                yield current, items
            current, items = row.run_id, []
        given = json.loads(row.input) if isinstance(row.input, str) else row.input
        items.append(StoredItem(row.item_index, given, row.contact_id, row.outcome, row.reason))
    if current is not None:
        yield current, items


def upgrade() -> None:
    op.create_table(
        "run_item_pages",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("first_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_index", sa.Integer(), nullable=False),
        sa.Column("outcomes", sa.Integer(), nullable=False),
        sa.Column("items", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_item_pages_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "first_index", name=op.f("pk_run_item_pages")),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(_ITEMS).order_by(_ITEMS.c.run_id, _ITEMS.c.item_index))
    for run_id, items in _runs_of_items(iter(rows.fetchall())):
        bind.execute(
            _PAGES.insert(),
            [
                {
                    "run_id": run_id,
                    "first_index": page.first_index,
                    "last_index": page.last_index,
                    "outcomes": page.outcomes,
                    "items": page.items,
                }
                for page in pack(items)
            ],
        )
    with op.batch_alter_table("run_items", schema=None) as batch_op:
        batch_op.drop_index("ix_run_items_run_id_outcome_item_index")
    op.drop_table("run_items")


def downgrade() -> None:
    op.create_table(
        "run_items",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("item_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("input", JSONType, nullable=False),
        sa.Column("contact_id", sa.Uuid(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_items_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "item_index", name=op.f("pk_run_items")),
    )
    with op.batch_alter_table("run_items", schema=None) as batch_op:
        batch_op.create_index(
            "ix_run_items_run_id_outcome_item_index",
            ["run_id", "outcome", "item_index"],
            unique=False,
        )
    bind = op.get_bind()
    pages = bind.execute(sa.select(_PAGES.c.run_id, _PAGES.c["items"])).all()
    for run_id, text in pages:
        bind.execute(
            _ITEMS.insert(),
            [
                {
                    "run_id": run_id,
                    "item_index": item.index,
                    "input": item.input,
                    "contact_id": item.contact_id,
                    "outcome": item.outcome,
                    "reason": item.reason,
                }
                for item in unpack(text)
            ],
        )
    op.drop_table("run_item_pages")
