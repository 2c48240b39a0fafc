"""delivery: index of the deliveries waiting out a backoff, per destination

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index("ix_delivery_waiting", "delivery", ["status", "destination", "next_attempt_at"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_delivery_waiting", table_name="delivery")
