"""Alembic revision files, one per schema change, named by date."""
