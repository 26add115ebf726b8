-- The inbox (events), the outbox (deliveries), their attempts and the per-task state.
-- Times are Unix epoch seconds (REAL, UTC). Applied once, in one transaction, by SQLiteStore.

CREATE TABLE events (
    id          TEXT PRIMARY KEY,          -- the sender's event id: the dedupe key
    type        TEXT NOT NULL,
    created     INTEGER,                   -- the event's own `created`, when it had one
    received_at REAL NOT NULL,
    task_id     TEXT,                      -- data.id, when given
    superseded  INTEGER NOT NULL DEFAULT 0, -- 1: a newer event of the task was already stored
    raw         BLOB NOT NULL              -- the body exactly as signed
);

-- Newest-first listings and pruning by age.
CREATE INDEX events_received_at ON events (received_at);

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL,
    handler         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    lease_token     INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until     REAL,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    UNIQUE (event_id, handler)
);

-- The claim query (handler, due first). Partial: finished rows never enter it, so it stays as
-- small as the backlog, and it also serves the pending/due/running counts of stats().
CREATE INDEX deliveries_claim ON deliveries (handler, next_attempt_at) WHERE status = 'pending';

-- Dead counts, `retry_dead` and admin listings of dead deliveries. Partial: an accept (which
-- only inserts pending rows) never has to write to it.
CREATE INDEX deliveries_dead ON deliveries (handler) WHERE status = 'dead';

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('ok', 'retry', 'dead')),
    error       TEXT,
    duration_ms REAL NOT NULL
);

CREATE INDEX attempts_delivery ON attempts (delivery_id, id);

CREATE TABLE tasks (
    task_id       TEXT PRIMARY KEY,
    status        TEXT,
    event_id      TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    event_created INTEGER,
    -- What "newer" means for this task: the event's `created`, or its receipt time without one.
    event_order   REAL NOT NULL,
    updated_at    REAL NOT NULL
);
