-- The events of a task are found through the task's row: events.task_seq is the rowid of the
-- task's row in `tasks` (rows there are never deleted, so a rowid is never reused), indexed
-- with received_at. It replaces the index on (task_id, received_at) of 0005_search.sql: a task
-- id is a random key, so that index took a write of one random page per event (4 KiB to the
-- WAL, and again at the checkpoint: about 40 % of the bytes an accept wrote, and a quarter of
-- the writer's CPU). task_seq grows with every new task, so the events of new tasks are
-- appended at the index's end, where the batch's other rows already are.
ALTER TABLE events ADD COLUMN task_seq INTEGER;
UPDATE events SET task_seq = (SELECT t.rowid FROM tasks AS t WHERE t.task_id = events.task_id)
    WHERE task_id IS NOT NULL;
CREATE INDEX events_task_seq ON events (task_seq, received_at) WHERE task_seq IS NOT NULL;
DROP INDEX events_task_received;
