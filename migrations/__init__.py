"""Alembic environment of the control-plane database."""
