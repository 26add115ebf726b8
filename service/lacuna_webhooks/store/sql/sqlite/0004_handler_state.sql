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

-- LACUNA_<NAME>_RATE_LIMIT: one token bucket per handler, refilled continuously from
-- `updated_at` at the handler's rate and never above its capacity (docs/flow-control.md).
CREATE TABLE rate_buckets (
    handler    TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL
);
