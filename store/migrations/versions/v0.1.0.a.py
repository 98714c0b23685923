"""difftune 0.1.0: the whole schema.

Revision ID: v0.1.0.a
Revises:
Create Date: 2026-11-22

Revisions are named after the difftune release that introduces them (v0.1.0.a, v0.2.0.a, …); the
file name is the revision id. A revision is frozen once released: it spells out its tables instead
of importing the models, which keep changing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.1.0.a"
down_revision = None
branch_labels = None
depends_on = None

_FLOAT_PRECISION = 53


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "difftune_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_models")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_difftune_models_fingerprint")),
    )
    op.create_index(op.f("ix_difftune_models_name"), "difftune_models", ["name"])

    op.create_table(
        "difftune_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("searcher", sa.String(length=64), nullable=False),
        sa.Column("objectives", sa.JSON(), nullable=False),
        sa.Column("reference", sa.JSON(), nullable=True),
        sa.Column("optuna_study_name", sa.String(length=512), nullable=True),
        _timestamp("created_at"),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.CheckConstraint("status IN ('running', 'finished', 'stopped')", name=op.f("ck_difftune_studies_status")),
        sa.ForeignKeyConstraint(
            ["model_id"], ["difftune_models.id"], name=op.f("fk_difftune_studies_model_id_difftune_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_difftune_studies_name")),
    )
    op.create_index(op.f("ix_difftune_studies_model_id"), "difftune_studies", ["model_id"])

    op.create_table(
        "difftune_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("started_at"),
        _timestamp("finished_at", nullable=True),
        sa.Column("worker_id", sa.String(length=256), nullable=True),
        _timestamp("heartbeat_at", nullable=True),
        sa.CheckConstraint(
            "state IN ('running', 'complete', 'failed', 'pruned')", name=op.f("ck_difftune_trials_state")
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["difftune_studies.id"],
            name=op.f("fk_difftune_trials_study_id_difftune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_trials")),
        sa.UniqueConstraint("study_id", "number", name=op.f("uq_difftune_trials_study_id_number")),
    )
    op.create_index(op.f("ix_difftune_trials_study_id_state"), "difftune_trials", ["study_id", "state"])

    op.create_table(
        "difftune_trial_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(precision=_FLOAT_PRECISION), nullable=False),
        sa.Column("unit", sa.String(length=32), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.CheckConstraint("direction IN ('minimize', 'maximize')", name=op.f("ck_difftune_trial_metrics_direction")),
        sa.CheckConstraint("split IN ('calibration', 'held_out')", name=op.f("ck_difftune_trial_metrics_split")),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["difftune_studies.id"],
            name=op.f("fk_difftune_trial_metrics_study_id_difftune_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["difftune_trials.id"],
            name=op.f("fk_difftune_trial_metrics_trial_id_difftune_trials"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_trial_metrics")),
        sa.UniqueConstraint("trial_id", "split", "name", name=op.f("uq_difftune_trial_metrics_trial_id_split_name")),
    )
    op.create_index(
        op.f("ix_difftune_trial_metrics_front"),
        "difftune_trial_metrics",
        ["study_id", "split", "name", "trial_id", "value"],
    )

    op.create_table(
        "difftune_fronts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        _timestamp("computed_at"),
        sa.Column("trial_ids", sa.JSON(), nullable=False),
        sa.Column("objectives", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["difftune_studies.id"],
            name=op.f("fk_difftune_fronts_study_id_difftune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_fronts")),
    )
    op.create_index(op.f("ix_difftune_fronts_study_id_computed_at"), "difftune_fronts", ["study_id", "computed_at"])

    op.create_table(
        "difftune_profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=True),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["difftune_studies.id"],
            name=op.f("fk_difftune_profiles_study_id_difftune_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["difftune_trials.id"],
            name=op.f("fk_difftune_profiles_trial_id_difftune_trials"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_profiles")),
    )
    op.create_index(op.f("ix_difftune_profiles_study_id"), "difftune_profiles", ["study_id"])
    op.create_index(op.f("ix_difftune_profiles_trial_id"), "difftune_profiles", ["trial_id"])

    op.create_table(
        "difftune_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("image_index", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["difftune_trials.id"],
            name=op.f("fk_difftune_images_trial_id_difftune_trials"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_images")),
        sa.UniqueConstraint("trial_id", "image_index", name=op.f("uq_difftune_images_trial_id_image_index")),
    )


def downgrade() -> None:
    # Dependants first; dropping a table drops its indexes.
    for table in (
        "difftune_images",
        "difftune_profiles",
        "difftune_fronts",
        "difftune_trial_metrics",
        "difftune_trials",
        "difftune_studies",
        "difftune_models",
    ):
        op.drop_table(table)
