"""Alembic revisions of the orchestrator's SQL store."""
