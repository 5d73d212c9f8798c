"""Every SQL statement batchd runs, one module per aggregate, one function per question.

- ``tables``: the schema (SQLAlchemy Core) the migrations build; ``engine``: connections.
- ``tasks``: ingest and reads of tasks; ``windows``: queued windows claimed into batches;
  ``spend``: the daily budget and each client's share; ``batches``: a batch's own row and
  lease; ``routing``: provider outcomes settled into results and retries; ``sync``: the
  synchronous lane; ``callbacks``: result callbacks; ``jobs``: jobs and their counters;
  ``manual_queue``: failed tasks kept for replay or dismissal; ``report``-side reads in
  ``rollups``; ``retention``: pruning; ``gauges``/``checks``/``console``: what the metrics,
  ``batchd check`` and the console read.

Every statement that adds tasks or changes ``tasks.state`` also writes, in the same
statement, the job deltas of what it moved (``jobs.added_deltas``/``jobs.moved_deltas``):
the job counters are kept nowhere else, and tests/invariants.py checks them against the
tasks.

Functions take an open connection; the caller owns the transaction, so a step that must be
atomic (claim tasks + create the batch row) is one ``async with engine.begin()`` in the flow
module. Bulk writes go through ``unnest`` of parallel arrays: one statement per chunk, never
a loop.
"""
