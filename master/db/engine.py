"""Database engines for the control-plane store (SQLite embedded, PostgreSQL in production)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_DRIVER = "sqlite+aiosqlite"
POSTGRES_DRIVER = "postgresql+asyncpg"


class DatabaseUrlError(ValueError):
    pass


def check_url(url: str, *, production: bool) -> str:
    """Validate a database URL for this deployment; return its dialect ("sqlite"/"postgresql")."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise DatabaseUrlError(f"--database-url: cannot parse {url!r}: {exc}") from exc
    driver = parsed.drivername
    if driver == SQLITE_DRIVER:
        if production:
            raise DatabaseUrlError(
                "--database-url: production mode refuses SQLite; use a PostgreSQL URL "
                "(postgresql+asyncpg://user:password@host:5432/platform)"
            )
        if parsed.database in (None, "", ":memory:"):
            raise DatabaseUrlError(
                "--database-url: SQLite needs a file path (an in-memory database would be "
                "lost on restart and is not shared between connections)"
            )
        return "sqlite"
    if driver == POSTGRES_DRIVER:
        return "postgresql"
    raise DatabaseUrlError(
        f"--database-url: unsupported driver {driver!r}; use {SQLITE_DRIVER}:///PATH or "
        f"{POSTGRES_DRIVER}://..."
    )


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine with the settings each backend needs."""
    dialect = check_url(url, production=False)
    if dialect == "sqlite":
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
