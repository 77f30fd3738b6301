"""Alembic migrations for the gallery database (run from code by :mod:`studio.gallery`)."""
