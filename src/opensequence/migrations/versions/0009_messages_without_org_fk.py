"""Send records lose their own foreign key to ``organizations``.

``messages.org_id`` is copied from the enrollment the record belongs to, and the record's
foreign key to ``enrollments`` (``ON DELETE CASCADE``, as the enrollment's own key to
``organizations`` is) already removes it with its organization. The second key only cost the
hot path: PostgreSQL checked it for every inserted record with a ``FOR KEY SHARE`` lock on the
one organization row that every concurrent batch was locking too, ~4-10 us of the server's
time per record (pg_stat_statements, 10,000-message engine runs: ~35 us per inserted row with
it, ~25-30 without).

PostgreSQL drops the constraint in place (a brief exclusive lock, no rewrite). SQLite cannot
drop a constraint, so the table is copied without it (Alembic's batch mode), which takes as long
as the send records take to copy: upgrade with the workers stopped.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "fk_messages_org_id_organizations"


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_constraint(_NAME, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_foreign_key(_NAME, "organizations", ["org_id"], ["id"], ondelete="CASCADE")
