"""study: patient ID and accession number indexed, for the administrators' search of stored studies; the
append-only review table lets the rows of a study being deleted go (study_deletion)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Studies stored before this revision have no patient ID in the database: `gateway serve` reads it from one
stored instance of each at start (gateway.cli._index_studies).

Reviews stay append-only, except that deleting a study (an administrator, the retention job: core.archive)
removes its reviews with it: the deleting transaction names the study in ``study_deletion`` first, and the
triggers let the review rows of a named study be deleted, nothing else.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_SQLITE_TRIGGER = "review_no_delete"
_REFUSE = "BEGIN SELECT RAISE(ABORT, 'review is append-only'); END"
_POSTGRES_FUNCTION = (
    "CREATE OR REPLACE FUNCTION review_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "{allow}RAISE EXCEPTION 'review is append-only'; END $$"
)
_ALLOW_DELETION = (
    "IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM study_deletion WHERE study_id = OLD.study_id) "
    "THEN RETURN OLD; END IF; "
)


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "study_deletion",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("study_id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_POSTGRES_FUNCTION.format(allow=_ALLOW_DELETION))
    else:
        op.execute(f"DROP TRIGGER {_SQLITE_TRIGGER}")
        op.execute(
            f"CREATE TRIGGER {_SQLITE_TRIGGER} BEFORE DELETE ON review WHEN NOT EXISTS "
            f"(SELECT 1 FROM study_deletion WHERE study_id = OLD.study_id) {_REFUSE}"
        )
    # plain ALTER TABLE (SQLite >= 3.35 drops columns too): a batch copy of the study table would, with
    # foreign keys on, cascade the DROP of the old table into every table that hangs off a study
    op.add_column("study", sa.Column("patient_id", sa.String(length=64), nullable=True))
    op.create_index("ix_study_patient_id", "study", ["patient_id"])
    op.create_index("ix_study_accession_number", "study", ["accession_number"])


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_POSTGRES_FUNCTION.format(allow=""))
    else:
        op.execute(f"DROP TRIGGER {_SQLITE_TRIGGER}")
        op.execute(f"CREATE TRIGGER {_SQLITE_TRIGGER} BEFORE DELETE ON review {_REFUSE}")
    op.drop_table("study_deletion")
    op.drop_index("ix_study_accession_number", table_name="study")
    op.drop_index("ix_study_patient_id", table_name="study")
    op.drop_column("study", "patient_id")
