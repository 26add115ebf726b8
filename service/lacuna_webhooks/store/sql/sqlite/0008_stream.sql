-- The live stream (GET /api/v1/stream, docs/admin.md): every event gets a stream position,
-- assigned from stream_counter in the transaction that inserts it. One writer commits at a
-- time, so commit order is position order and a reader never sees a gap that fills later.
-- The counter, not max(stream_seq) + 1, hands out positions: pruning every event must not let
-- a position be used twice (a client resuming after it would skip the new event).
ALTER TABLE events ADD COLUMN stream_seq INTEGER;
-- Events stored before this migration, in their insert order (the rowid follows it).
UPDATE events SET stream_seq = rowid;
CREATE TABLE stream_counter (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT INTO stream_counter (id, last) SELECT 1, coalesce(max(stream_seq), 0) FROM events;
CREATE UNIQUE INDEX events_stream ON events (stream_seq);
