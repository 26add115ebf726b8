-- The admin search (GET /events, docs/admin.md): indexes that let a filtered, newest-first
-- page over a million events read only the rows it returns. received_at alone is served by
-- events_received_at (0001); the rowid, the tie-breaker, is the last column of every index.
CREATE INDEX events_type_received ON events (type, received_at);
-- Most events of a large store have a task; the partial index still skips the few without.
CREATE INDEX events_task_received ON events (task_id, received_at) WHERE task_id IS NOT NULL;
-- handler (+ status): which events have such a delivery; event_id makes it covering.
CREATE INDEX deliveries_handler_status ON deliveries (handler, status, event_id);
-- Handler health (GET /handlers): the attempts of the last hour.
CREATE INDEX attempts_finished ON attempts (finished_at);
