"""difftune 0.5.0: a trial's memo key.

Revision ID: v0.5.0.a
Revises: v0.4.0.a
Create Date: 2026-11-30

``difftune_trials.memo_key`` is the hash of what a complete trial measured: the applied profile
(without its name and provenance) and the measurement's context (model fingerprint, device, dtype,
call, calibration samples, metrics, timing, library versions). A later trial with the same key — in
the same study, another study or after a restart — takes the stored figures instead of running
again. Trials stored before this revision have none and are never reused.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.5.0.a"
down_revision = "v0.4.0.a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("difftune_trials") as batch:
        batch.add_column(sa.Column("memo_key", sa.String(length=64), nullable=True))
        batch.create_index("ix_difftune_trials_memo_key", ["memo_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("difftune_trials") as batch:
        batch.drop_index("ix_difftune_trials_memo_key")
        batch.drop_column("memo_key")
