"""Database engines for the control-plane store (SQLite embedded, PostgreSQL in production)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from platform_common.config import check_database_url


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine with the settings each backend needs; :class:`ConfigError` naming
    ``--database-url`` when ``url`` is not one the master runs on."""
    if check_database_url(url) == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _tune_sqlite(engine)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def insert_once(engine: AsyncEngine, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` into ``table`` for ``engine``'s backend: a
    row whose key is taken is not inserted (result rowcount 0) instead of raising, so
    claims that lose to another replica cost no exception and leave no error line in
    the PostgreSQL log."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # An AUTOCOMMIT connection runs each statement on its own: no BEGIN, which
        # would hold SQLite's write lock until the connection is returned.
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            conn.exec_driver_sql("BEGIN")
