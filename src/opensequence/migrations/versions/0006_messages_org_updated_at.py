"""Index for per-sender throttles: an organization's messages by ``updated_at``.

The throttle counts a sender's sends inside its widest window (up to a day) on every claimed
batch. A send's time is ``sent_at`` once sent and ``updated_at`` while ``sending``, and
``updated_at >= sent_at`` always holds, so ``org_id = ? AND updated_at > now - window`` bounds
the rows read to the organization's recent messages instead of the whole table.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_org_id_updated_at", ["org_id", "updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_org_id_updated_at")
