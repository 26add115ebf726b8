-- Flow control per handler (docs/flow-control.md): whether it is paused (by an operator, by
-- PAUSE_AFTER_FAILURES, or by a 410 from its endpoint), why, and its consecutive failed
-- attempts. One row per handler that was ever paused or failed; no row = running, no failures.
CREATE TABLE handler_state (
    handler              text        PRIMARY KEY,
    paused               boolean     NOT NULL DEFAULT false,
    reason               text,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL
);

-- LACUNA_<NAME>_RATE_LIMIT: one token bucket per handler, shared by every replica, refilled
-- continuously by the database's clock from `updated_at` at the handler's rate and never
-- above its capacity (docs/flow-control.md).
CREATE TABLE rate_buckets (
    handler    text             PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at timestamptz      NOT NULL
);
