"""Alembic environment: runs on a connection handed over by master.db.migrate."""

from __future__ import annotations

from alembic import context

from master.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through `platform db upgrade` or master.db.migrate.upgrade(), "
        "which hand Alembic a connection"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    compare_type=True,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
