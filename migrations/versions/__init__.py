"""Alembic revisions, applied in order by `platform master` or `platform db upgrade`."""
