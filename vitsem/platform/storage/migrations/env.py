"""Alembic environment: the URL comes from the caller (``vitsem db upgrade``)."""

from __future__ import annotations

from alembic import context

from vitsem.platform.storage.db import Base, make_engine

config = context.config
url = str(config.attributes.get("url") or config.get_main_option("sqlalchemy.url"))
engine = make_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=engine.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
