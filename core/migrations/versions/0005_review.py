"""review: the worklist's cases and findings, append-only decisions, verified reports naming their review

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_APPEND_ONLY_SQLITE = [
    "CREATE TRIGGER review_no_update BEFORE UPDATE ON review "
    "BEGIN SELECT RAISE(ABORT, 'review is append-only'); END",
    "CREATE TRIGGER review_no_delete BEFORE DELETE ON review "
    "BEGIN SELECT RAISE(ABORT, 'review is append-only'); END",
]
_APPEND_ONLY_POSTGRES = [
    "CREATE FUNCTION review_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'review is append-only'; END $$",
    "CREATE TRIGGER review_append_only BEFORE UPDATE OR DELETE ON review "
    "FOR EACH ROW EXECUTE FUNCTION review_append_only()",
    "CREATE TRIGGER review_no_truncate BEFORE TRUNCATE ON review "
    "FOR EACH STATEMENT EXECUTE FUNCTION review_append_only()",
]


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "review_case",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ai_positive", sa.Boolean(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.Column("assessable", sa.Boolean(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claimed_by_id", sa.Integer(), nullable=True),
        sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["claimed_by_id"], ["user_account.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id"),
    )
    with op.batch_alter_table("review_case", schema=None) as batch_op:
        batch_op.create_index("ix_review_case_order", ["status", "received_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_review_case_modality"), ["modality"], unique=False)
        batch_op.create_index(batch_op.f("ix_review_case_study_date"), ["study_date"], unique=False)
    op.create_table(
        "review_finding",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=32), nullable=False),
        sa.Column("finding", sa.String(length=32), nullable=True),
        sa.Column("label", sa.String(length=16), nullable=True),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["review_case.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["prediction_id"], ["prediction.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("review_finding", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_review_finding_case_id"), ["case_id"], unique=False)
        batch_op.create_index(
            "ix_review_finding_model", ["model_name", "finding", "label", "case_id"], unique=False
        )
        batch_op.create_index("ix_review_finding_finding", ["finding", "label", "case_id"], unique=False)
    op.create_table(
        "review",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("full_name", sa.String(length=128), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answers", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("clinical", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["report.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["user_account.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id", "version"),
    )
    with op.batch_alter_table("review", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_review_study_id"), ["study_id"], unique=False)
    with op.batch_alter_table("report", schema=None) as batch_op:
        batch_op.add_column(sa.Column("review_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_report_review_id"), ["review_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_report_review_id", "review", ["review_id"], ["id"], ondelete="SET NULL"
        )
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in _APPEND_ONLY_POSTGRES if postgres else _APPEND_ONLY_SQLITE:
        op.execute(statement)


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER review_no_truncate ON review")
        op.execute("DROP TRIGGER review_append_only ON review")
        op.execute("DROP FUNCTION review_append_only()")
    else:
        op.execute("DROP TRIGGER review_no_update")
        op.execute("DROP TRIGGER review_no_delete")
    with op.batch_alter_table("report", schema=None) as batch_op:
        batch_op.drop_constraint("fk_report_review_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_report_review_id"))
        batch_op.drop_column("review_id")
    with op.batch_alter_table("review", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_review_study_id"))
    op.drop_table("review")
    with op.batch_alter_table("review_finding", schema=None) as batch_op:
        batch_op.drop_index("ix_review_finding_finding")
        batch_op.drop_index("ix_review_finding_model")
        batch_op.drop_index(batch_op.f("ix_review_finding_case_id"))
    op.drop_table("review_finding")
    with op.batch_alter_table("review_case", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_review_case_study_date"))
        batch_op.drop_index(batch_op.f("ix_review_case_modality"))
        batch_op.drop_index("ix_review_case_order")
    op.drop_table("review_case")
