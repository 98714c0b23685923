"""difftune 0.6.0: every metric carries its rung.

Revision ID: v0.6.0.a
Revises: v0.5.0.a
Create Date: 2026-11-30

``difftune_trial_metrics.rung`` is 0 for a full evaluation (every metric stored before this revision)
and -1 for a multi-fidelity study's screening of a candidate on a prefix of its calibration set. A
trial may hold a metric at both rungs, so the unique key and the front's covering index gain the
rung; fronts, selection and export read rung 0 only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.6.0.a"
down_revision = "v0.5.0.a"
branch_labels = None
depends_on = None

_TABLE = "difftune_trial_metrics"
_FRONT = "ix_difftune_trial_metrics_front"


def upgrade() -> None:
    with op.batch_alter_table(_TABLE) as batch:
        batch.add_column(sa.Column("rung", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint(op.f("uq_difftune_trial_metrics_trial_id_split_name"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_difftune_trial_metrics_trial_id_split_rung_name"), ["trial_id", "split", "rung", "name"]
        )
        batch.create_check_constraint(op.f("ck_difftune_trial_metrics_rung"), "rung <= 0")
        batch.drop_index(_FRONT)
        batch.create_index(_FRONT, ["study_id", "split", "rung", "name", "trial_id", "value"], unique=False)


def downgrade() -> None:
    op.execute(sa.text(f"DELETE FROM {_TABLE} WHERE rung <> 0"))  # screening values have no place there
    with op.batch_alter_table(_TABLE) as batch:
        batch.drop_index(_FRONT)
        batch.create_index(_FRONT, ["study_id", "split", "name", "trial_id", "value"], unique=False)
        batch.drop_constraint(op.f("ck_difftune_trial_metrics_rung"), type_="check")
        batch.drop_constraint(op.f("uq_difftune_trial_metrics_trial_id_split_rung_name"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_difftune_trial_metrics_trial_id_split_name"), ["trial_id", "split", "name"]
        )
        batch.drop_column("rung")
