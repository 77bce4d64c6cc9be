"""Registry tests, run against SQLite and PostgreSQL."""
