"""review_tag: the worklist's tag tokens numbered, review_case.tags rewritten as their numbers

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_case = sa.table("review_case", sa.column("id", sa.Integer()), sa.column("tags", sa.Text()))


def _tag_table() -> sa.TableClause:
    return sa.table("review_tag", sa.column("id", sa.Integer()), sa.column("token", sa.String()))


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "review_tag",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_tag")),
        sa.UniqueConstraint("token", name=op.f("uq_review_tag_token")),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(_case.c.id, _case.c.tags)).all()
    tokens = sorted({t for _, tags in rows for t in tags.split(",") if t})
    tag = _tag_table()
    if tokens:
        bind.execute(sa.insert(tag), [{"token": t} for t in tokens])
    ids = dict(bind.execute(sa.select(tag.c.token, tag.c.id)).all())
    for case_id, tags in rows:
        numbers = sorted(ids[t] for t in tags.split(",") if t)
        bind.execute(
            sa.update(_case).where(_case.c.id == case_id).values(tags="," + "".join(f"{n}," for n in numbers))
        )


def downgrade() -> None:
    """Downgrade schema."""
    bind = op.get_bind()
    tag = _tag_table()
    tokens = dict(bind.execute(sa.select(tag.c.id, tag.c.token)).all())
    for case_id, tags in bind.execute(sa.select(_case.c.id, _case.c.tags)).all():
        names = sorted(tokens[int(n)] for n in tags.split(",") if n)
        bind.execute(
            sa.update(_case).where(_case.c.id == case_id).values(tags="," + "".join(f"{t}," for t in names))
        )
    op.drop_table("review_tag")
