"""difftune 0.4.0: a study's reference images.

Revision ID: v0.4.0.a
Revises: v0.3.0.a
Create Date: 2026-11-29

``difftune_reference_images`` holds a few thumbnails of the images the study's reference setting
draws (the plain pipeline at the study's steps), so that a trial's thumbnails (``difftune_images``)
can be shown beside what they are compared with. They belong to the study, not to a trial: no trial
draws them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.4.0.a"
down_revision = "v0.3.0.a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "difftune_reference_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("image_index", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["difftune_studies.id"],
            name=op.f("fk_difftune_reference_images_study_id_difftune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difftune_reference_images")),
        sa.UniqueConstraint("study_id", "image_index", name=op.f("uq_difftune_reference_images_study_id_image_index")),
    )


def downgrade() -> None:
    op.drop_table("difftune_reference_images")
