"""difftune.store: SQLAlchemy models, Alembic migrations and the repository API of frozen records."""
