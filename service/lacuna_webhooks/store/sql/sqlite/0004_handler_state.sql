-- Flow control per handler (docs/flow-control.md): whether it is paused (by an operator, by
-- PAUSE_AFTER_FAILURES, or by a 410 from its endpoint), why, and its consecutive failed
-- attempts. One row per handler that was ever paused or failed; no row = running, no failures.
CREATE TABLE handler_state (
    handler              TEXT PRIMARY KEY,
    paused               INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    reason               TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    updated_at           REAL NOT NULL
);
