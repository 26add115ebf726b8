-- The inbox (events, deduplicated by id), the outbox (one delivery per event and handler),
-- the attempt log and the latest state of each generation task.

CREATE TABLE events (
    id          text        PRIMARY KEY,
    -- insertion order, to break ties between events received at the same instant
    seq         bigserial   NOT NULL UNIQUE,
    type        text        NOT NULL,
    created     bigint,
    received_at timestamptz NOT NULL,
    task_id     text,
    superseded  boolean     NOT NULL DEFAULT false,
    raw         bytea       NOT NULL
);

CREATE INDEX events_received_idx ON events (received_at, seq);
CREATE INDEX events_type_received_idx ON events (type, received_at, seq);

CREATE TABLE deliveries (
    id              bigserial   PRIMARY KEY,
    event_id        text        NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    handler         text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('pending', 'done', 'dead')),
    -- claims since the delivery was created or last reset
    attempts        integer     NOT NULL DEFAULT 0,
    -- bumped by every claim; outcome writes must present the token they claimed with
    lease_token     bigint      NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    lease_until     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    UNIQUE (event_id, handler)
);

-- claim: due pending deliveries of one handler, oldest due first
CREATE INDEX deliveries_claim_idx ON deliveries (handler, next_attempt_at, id)
    WHERE status = 'pending';
-- stats, retry_dead and listings by status: done rows (the bulk) stay out of it
CREATE INDEX deliveries_open_idx ON deliveries (status, next_attempt_at)
    WHERE status <> 'done';
CREATE INDEX deliveries_created_idx ON deliveries (created_at, id);

CREATE TABLE attempts (
    id          bigserial   PRIMARY KEY,
    delivery_id bigint      NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('ok', 'retry', 'dead')),
    error       text
);

CREATE INDEX attempts_delivery_idx ON attempts (delivery_id, id);

-- No foreign key to events: the task's state outlives the pruning of the event that set it.
CREATE TABLE tasks (
    task_id       text        PRIMARY KEY,
    status        text,
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    event_created bigint,
    -- what orders the task's events: `created`, or the received time when it is absent
    event_order   double precision NOT NULL,
    updated_at    timestamptz NOT NULL
);
