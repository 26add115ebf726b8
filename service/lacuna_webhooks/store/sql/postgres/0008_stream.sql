-- The live stream (GET /api/v1/stream, docs/admin.md). A sequence value is taken when a row is
-- inserted, not when it commits, so `seq` alone cannot be a cursor: a reader could hand out
-- seq 11 while seq 10 is still uncommitted and then never look back. Each row therefore
-- records the transaction that wrote it, and the stream hands out only rows whose
-- transaction is older than the oldest one still running (pg_snapshot_xmin of the current
-- snapshot): every transaction below that has finished, so no row can appear behind the
-- cursor later, on any replica. The cursor is (xid, seq).
--
-- The constant default first: existing rows take it without a table rewrite (PostgreSQL 11+
-- stores it once); xid8 '1' is below every real transaction id, so they come first, in seq
-- order. New rows then get the inserting transaction's id.
ALTER TABLE events ADD COLUMN xid xid8 NOT NULL DEFAULT '1';
ALTER TABLE events ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX events_stream_idx ON events (xid, seq);
