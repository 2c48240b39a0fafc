from sqlalchemy import inspect

from core.db import make_engine
from core.migrate import current_revision, head_revision, upgrade
from core.tables import Base


def test_migrations_create_the_model_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        assert insp.has_table(table.name), table.name
        have = {c["name"] for c in insp.get_columns(table.name)}
        assert have == {c.name for c in table.columns}, table.name
    upgrade(engine)  # idempotent
    engine.dispose()


def test_downgrade_and_upgrade_again(database_url: str) -> None:
    from alembic import command

    from core.migrate import alembic_config

    engine = make_engine(database_url)
    upgrade(engine)
    cfg = alembic_config(database_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert not inspect(engine).has_table("study")
    upgrade(engine)
    assert inspect(engine).has_table("study")
    engine.dispose()
