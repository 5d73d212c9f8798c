"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 02:33:55.187339
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('provider_batch_id', sa.Text(), nullable=True),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('state', sa.Text(), server_default='building', nullable=False),
    sa.Column('provider_status', sa.Text(), nullable=True),
    sa.Column('flush_reason', sa.Text(), nullable=False),
    sa.Column('item_count', sa.Integer(), nullable=False),
    sa.Column('input_bytes', sa.BigInteger(), nullable=False),
    sa.Column('input_file_id', sa.Text(), nullable=True),
    sa.Column('output_file_id', sa.Text(), nullable=True),
    sa.Column('error_file_id', sa.Text(), nullable=True),
    sa.Column('request_counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('usage', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('errors', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('token_limited', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('spend_day', sa.Date(), nullable=False),
    sa.Column('reserved_usd', sa.Numeric(precision=24, scale=12), server_default='0', nullable=False),
    sa.Column('cost_usd', sa.Numeric(precision=24, scale=12), nullable=True),
    sa.Column('sync_cost_usd', sa.Numeric(precision=24, scale=12), nullable=True),
    sa.Column('submit_attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('lease_owner', sa.Text(), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_poll_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('routed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('building','uploading','submitted','completed','failed','expired','cancelled','routed')", name='batch_state'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('provider_batch_id')
    )
    op.create_index('batches_live', 'batches', ['next_poll_at'], unique=False, postgresql_where=sa.text("state <> 'routed'"))
    op.create_index('batches_spend_day', 'batches', ['spend_day'], unique=False)
    op.create_table('results',
    sa.Column('seq', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=False),
    sa.Column('batch_id', sa.Text(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('usage', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('cost_usd', sa.Numeric(precision=24, scale=12), server_default='0', nullable=False),
    sa.Column('sync_cost_usd', sa.Numeric(precision=24, scale=12), server_default='0', nullable=False),
    sa.Column('replay_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('custom_id')
    )
    op.create_table('task_events',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=False),
    sa.Column('batch_id', sa.Text(), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.Text(), nullable=False),
    sa.Column('error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('task_events_custom_id', 'task_events', ['custom_id'], unique=False)
    op.create_index('task_events_day', 'task_events', ['created_at', 'outcome'], unique=False)
    op.create_table('tasks',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=False),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('body', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('body_digest', sa.Text(), nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('line_bytes', sa.Integer(), nullable=False),
    sa.Column('est_input_tokens', sa.Integer(), server_default='0', nullable=False),
    sa.Column('est_output_tokens', sa.Integer(), server_default='0', nullable=False),
    sa.Column('state', sa.Text(), server_default='queued', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('batch_id', sa.Text(), nullable=True),
    sa.Column('last_error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('replay_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lane', sa.Text(), server_default='batch', nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=True),
    sa.Column('fallback_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('queued','submitted','succeeded','failed')", name='task_state'),
    sa.CheckConstraint("lane IN ('batch','sync')", name='task_lane'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('custom_id')
    )
    op.create_index('tasks_batch', 'tasks', ['batch_id', 'id'], unique=False, postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.create_index('tasks_created', 'tasks', ['created_at'], unique=False)
    op.create_index('tasks_failed', 'tasks', ['finished_at'], unique=False, postgresql_where=sa.text("state = 'failed'"))
    op.create_index('tasks_sync_queue', 'tasks', ['not_before', 'id'], unique=False, postgresql_where=sa.text("state = 'queued' AND lane = 'sync'"))
    op.create_index('tasks_fallback', 'tasks', ['fallback_at'], unique=False, postgresql_where=sa.text("fallback_at IS NOT NULL AND state IN ('queued', 'submitted')"))
    op.create_index('tasks_queued_window', 'tasks', ['endpoint', 'model', 'not_before', 'id'], unique=False, postgresql_where=sa.text("state = 'queued'"))


def downgrade() -> None:
    op.drop_index('tasks_queued_window', table_name='tasks', postgresql_where=sa.text("state = 'queued'"))
    op.drop_index('tasks_fallback', table_name='tasks')
    op.drop_index('tasks_sync_queue', table_name='tasks')
    op.drop_index('tasks_failed', table_name='tasks', postgresql_where=sa.text("state = 'failed'"))
    op.drop_index('tasks_created', table_name='tasks')
    op.drop_index('tasks_batch', table_name='tasks', postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.drop_table('tasks')
    op.drop_index('task_events_day', table_name='task_events')
    op.drop_index('task_events_custom_id', table_name='task_events')
    op.drop_table('task_events')
    op.drop_table('results')
    op.drop_index('batches_spend_day', table_name='batches')
    op.drop_index('batches_live', table_name='batches', postgresql_where=sa.text("state <> 'routed'"))
    op.drop_table('batches')
