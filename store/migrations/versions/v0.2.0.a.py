"""difftune 0.2.0: a study's budget and trial claims, for several workers on one study.

Revision ID: v0.2.0.a
Revises: v0.1.0.a
Create Date: 2026-11-22

``difftune_studies.budget`` is the number of finished trials the study must hold (workers stop
there); ``difftune_trials.claim`` names what a worker claimed a trial as (``"baseline:fora_3"``,
``"retry:17"``), unique within a study so that no baseline or retry runs twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.2.0.a"
down_revision = "v0.1.0.a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("difftune_studies") as batch:
        batch.add_column(sa.Column("budget", sa.Integer(), nullable=True))
    with op.batch_alter_table("difftune_trials") as batch:
        batch.add_column(sa.Column("claim", sa.String(length=256), nullable=True))
    op.create_index("uq_difftune_trials_study_id_claim", "difftune_trials", ["study_id", "claim"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_difftune_trials_study_id_claim", table_name="difftune_trials")
    with op.batch_alter_table("difftune_trials") as batch:
        batch.drop_column("claim")
    with op.batch_alter_table("difftune_studies") as batch:
        batch.drop_column("budget")
