"""difftune 0.7.0: a trial may be ``warm``.

Revision ID: v0.7.0.a
Revises: v0.6.0.a
Create Date: 2026-11-30

``difftune_trials.kind`` gains ``warm``: a point an earlier study's search found, re-measured first to
warm-start a new study (``difftune nightly`` carries last night's front into tonight's study). No
existing row changes.
"""

from __future__ import annotations

from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.7.0.a"
down_revision = "v0.6.0.a"
branch_labels = None
depends_on = None

_KINDS = "'baseline', 'seed', 'searched', 'retry'"


def upgrade() -> None:
    with op.batch_alter_table("difftune_trials") as batch:
        batch.drop_constraint(op.f("ck_difftune_trials_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_difftune_trials_kind"), f"kind IN ({_KINDS}, 'warm')")


def downgrade() -> None:
    # A warm trial is, in the older schema, a point the search started from: a seed.
    op.execute("UPDATE difftune_trials SET kind = 'seed' WHERE kind = 'warm'")
    with op.batch_alter_table("difftune_trials") as batch:
        batch.drop_constraint(op.f("ck_difftune_trials_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_difftune_trials_kind"), f"kind IN ({_KINDS})")
