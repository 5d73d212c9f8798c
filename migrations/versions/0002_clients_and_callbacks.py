"""clients on tasks, callback outbox and delivery attempts

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 08:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: adding them rewrites nothing.
    op.add_column('tasks', sa.Column('client', sa.Text(), nullable=True))
    op.add_column('tasks', sa.Column('callback_url', sa.Text(), nullable=True))
    op.create_table('callbacks',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=False),
    sa.Column('client', sa.Text(), nullable=True),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('task_state', sa.Text(), nullable=False),
    sa.Column('task_attempts', sa.Integer(), nullable=False),
    sa.Column('task_error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('state', sa.Text(), server_default='pending', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('replay_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('pending','delivered','failed')", name='callback_state'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('callbacks_due', 'callbacks', ['next_attempt_at'], unique=False, postgresql_where=sa.text("state = 'pending'"))
    op.create_index('callbacks_failed', 'callbacks', ['id'], unique=False, postgresql_where=sa.text("state = 'failed'"))
    op.create_index('callbacks_custom_id', 'callbacks', ['custom_id'], unique=False)
    op.create_table('callback_attempts',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('callback_id', sa.BigInteger(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('duration_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['callback_id'], ['callbacks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('callback_attempts_callback', 'callback_attempts', ['callback_id', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('callback_attempts_callback', table_name='callback_attempts')
    op.drop_table('callback_attempts')
    op.drop_index('callbacks_custom_id', table_name='callbacks')
    op.drop_index('callbacks_failed', table_name='callbacks', postgresql_where=sa.text("state = 'failed'"))
    op.drop_index('callbacks_due', table_name='callbacks', postgresql_where=sa.text("state = 'pending'"))
    op.drop_table('callbacks')
    op.drop_column('tasks', 'callback_url')
    op.drop_column('tasks', 'client')
