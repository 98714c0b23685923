"""difftune 0.3.0: a trial's kind is a column, and an interrupted trial is a state of its own.

Revision ID: v0.3.0.a
Revises: v0.2.0.a
Create Date: 2026-11-29

``difftune_trials.kind`` says what a trial is — ``baseline`` (a named hand-made method), ``seed`` (a
hand-made starting point for the searcher), ``searched`` or ``retry`` — instead of a key of its JSON
config; existing rows are filled from that config. A trial whose worker died was ``failed`` with an
error starting ``"interrupted:"``; it is now in the state ``interrupted`` (its error keeps the reason).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "v0.3.0.a"
down_revision = "v0.2.0.a"
branch_labels = None
depends_on = None

_STATES = "'running', 'complete', 'failed', 'pruned'"
_KINDS = "'baseline', 'seed', 'searched', 'retry'"
_OLD_PREFIX = "interrupted:"


def _trials() -> sa.TableClause:
    return sa.table(
        "difftune_trials",
        sa.column("id", sa.Integer),
        sa.column("config", sa.JSON),
        sa.column("state", sa.String),
        sa.column("error", sa.Text),
        sa.column("kind", sa.String),
    )


def _kind(config: object) -> str:
    if not isinstance(config, dict):
        return "searched"
    if config.get("baseline"):
        return "baseline"
    if config.get("seed"):
        return "seed"
    if config.get("retry_of") is not None:
        return "retry"
    return "searched"


def upgrade() -> None:
    with op.batch_alter_table("difftune_trials") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="searched"))
        batch.drop_constraint(op.f("ck_difftune_trials_state"), type_="check")
        batch.create_check_constraint(op.f("ck_difftune_trials_state"), f"state IN ({_STATES}, 'interrupted')")
        batch.create_check_constraint(op.f("ck_difftune_trials_kind"), f"kind IN ({_KINDS})")
    connection = op.get_bind()
    trials = _trials()
    rows = connection.execute(sa.select(trials.c.id, trials.c.config).where(trials.c.config.is_not(None))).all()
    for trial_id, config in rows:
        kind = _kind(config)
        if kind != "searched":
            connection.execute(sa.update(trials).where(trials.c.id == trial_id).values(kind=kind))
    for trial_id, error in connection.execute(
        sa.select(trials.c.id, trials.c.error).where(trials.c.state == "failed", trials.c.error.like(f"{_OLD_PREFIX}%"))
    ).all():
        reason = str(error)[len(_OLD_PREFIX) :].strip() or "interrupted"
        connection.execute(sa.update(trials).where(trials.c.id == trial_id).values(state="interrupted", error=reason))


def downgrade() -> None:
    connection = op.get_bind()
    trials = _trials()
    for trial_id, error in connection.execute(
        sa.select(trials.c.id, trials.c.error).where(trials.c.state == "interrupted")
    ).all():
        connection.execute(
            sa.update(trials)
            .where(trials.c.id == trial_id)
            .values(state="failed", error=f"{_OLD_PREFIX} {error or 'interrupted'}")
        )
    with op.batch_alter_table("difftune_trials") as batch:
        batch.drop_constraint(op.f("ck_difftune_trials_kind"), type_="check")
        batch.drop_constraint(op.f("ck_difftune_trials_state"), type_="check")
        batch.create_check_constraint(op.f("ck_difftune_trials_state"), f"state IN ({_STATES})")
        batch.drop_column("kind")
