"""The due index also requires ``next_step_at IS NOT NULL``, so that only the claim can use it.

Its rows are unchanged: an active enrollment always has a ``next_step_at``. What changes is
which statements PostgreSQL may plan with it. ``status = 'active'`` alone made it a candidate
for every statement that guards on the status, such as advancing a chunk of enrollments by
``id``. On a table not yet analysed (an import that autovacuum has not reached), the planner
took the index to hold 0.5 % of the rows, and read every active enrollment through it to find
the hundred it wanted, instead of looking them up by primary key. The claim's
``next_step_at <= :now`` implies the new condition; the id-keyed statements do not.

The index is rebuilt inside the migration's transaction: on PostgreSQL, writes to
``enrollments`` wait while it builds, so upgrade with the workers stopped.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _create(where: str) -> None:
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_enrollments_due",
            ["next_step_at"],
            unique=False,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def _drop() -> None:
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.drop_index("ix_enrollments_due")


def upgrade() -> None:
    _drop()
    _create("status = 'active' AND next_step_at IS NOT NULL")


def downgrade() -> None:
    _drop()
    _create("status = 'active'")
