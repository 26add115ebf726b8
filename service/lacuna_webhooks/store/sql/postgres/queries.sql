-- The named queries of the PostgreSQL store (store/queries.py). Parameters are named
-- (:name), compiled into asyncpg's positional $n once at load. The SHARED queries return the
-- same columns as SQLite's.
-- Leases are timed by the database's clock (now()); see store/base.py.

-- name: accept_event
INSERT INTO events (id, type, created, received_at, task_id, raw, trace_context)
VALUES (:id, :type, :created, :received_at, :task_id, :raw, :trace_context)
ON CONFLICT (id) DO NOTHING
RETURNING true

-- name: upsert_task
INSERT INTO tasks AS t
    (task_id, status, event_id, event_type, event_created, event_order,
     updated_at)
VALUES (:task_id, :status, :event_id, :event_type, :event_created, :event_order, :updated_at)
ON CONFLICT (task_id) DO UPDATE SET
    status = excluded.status,
    event_id = excluded.event_id,
    event_type = excluded.event_type,
    event_created = excluded.event_created,
    event_order = excluded.event_order,
    updated_at = excluded.updated_at
WHERE excluded.event_order >= t.event_order
RETURNING true

-- name: mark_superseded
UPDATE events SET superseded = true WHERE id = :id

-- name: insert_deliveries
-- Due at the earlier of the receiving replica's clock and the database's, as replays are: an
-- intake whose clock ran an hour ahead made every new event wait that hour for every other
-- replica (a `worker` with a true clock did not see it due).
INSERT INTO deliveries
    (event_id, handler, status, next_attempt_at, created_at, updated_at)
SELECT :event_id, handler, 'pending', LEAST(:now, now()), :now, :now
FROM unnest(:handlers::text[]) AS handler

-- name: notify
-- Inside the caller's transaction: delivered only if it commits.
SELECT pg_notify(:channel, '')

-- name: claim
WITH claimed AS (
    UPDATE deliveries
    SET lease_until = now() + :lease::interval,
        attempts = attempts + 1,
        lease_token = lease_token + 1,
        updated_at = :now
    WHERE id IN (
        SELECT id FROM deliveries d
        WHERE handler = :handler
          AND status = 'pending'
          AND next_attempt_at <= :now
          AND (lease_until IS NULL OR lease_until <= now())
          -- LACUNA_<NAME>_AFTER (:after): held while a prerequisite of the event is pending
          AND (cardinality(:after::text[]) = 0 OR NOT EXISTS (
              SELECT 1 FROM deliveries p
              WHERE p.event_id = d.event_id AND p.status = 'pending'
                AND p.handler = ANY(:after::text[])))
        ORDER BY next_attempt_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, event_id, handler, status, attempts, lease_token,
              next_attempt_at, created_at
)
SELECT c.*, e.raw, e.trace_context
FROM claimed c JOIN events e ON e.id = c.event_id
ORDER BY c.next_attempt_at, c.id

-- name: finish
-- An outcome and its attempt in one statement, only for the live claim: same token, still
-- pending, still leased. :status is the new status, :next_attempt_at the next attempt's time
-- (a retry) or NULL (unchanged), :result the handler's JSON object as text (completions only)
-- or NULL, :refund 1 for a retry that does not spend the budget (a 429, docs/delivery.md: the
-- claim's attempt is undone), else 0. The attempt row keeps the claim's number either way.
WITH finished AS (
    UPDATE deliveries
    SET status = :status, next_attempt_at = coalesce(:next_attempt_at, next_attempt_at), lease_until = NULL,
        last_error = :error, result = :result::text::jsonb, updated_at = :finished_at,
        attempts = greatest(attempts - :refund::int, 0)
    WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL
    RETURNING id, attempts, attempts + :refund::int AS claimed
)
INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, outcome, error)
SELECT id, claimed, :started_at, :finished_at, :outcome, :error::text FROM finished
RETURNING delivery_id

-- name: finish_success
-- `finish` of a success, which ends the handler's run of failures in the same statement (one
-- round trip, no BEGIN/COMMIT): the count is reset only for the live claim, and only when
-- there is one to reset.
WITH finished AS (
    UPDATE deliveries
    SET status = :status, next_attempt_at = coalesce(:next_attempt_at, next_attempt_at), lease_until = NULL,
        last_error = :error, result = :result::text::jsonb, updated_at = :finished_at,
        attempts = greatest(attempts - :refund::int, 0)
    WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL
    RETURNING id, attempts, attempts + :refund::int AS claimed
), reset AS (
    UPDATE handler_state SET consecutive_failures = 0, updated_at = :finished_at
    WHERE handler = :handler AND consecutive_failures > 0 AND EXISTS (SELECT 1 FROM finished)
)
INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, outcome, error)
SELECT id, claimed, :started_at, :finished_at, :outcome, :error::text FROM finished
RETURNING delivery_id

-- name: end_revoked
-- The attempt of claim :lease_token has ended, and a reset revoked it since (the token moved on by
-- exactly one, a fresh budget, the lease kept so that nobody runs it beside that attempt):
-- end that lease, so the delivery is due at once rather than when the lease expires. A claim
-- since (attempts >= 1) or a second reset leaves it to expire.
UPDATE deliveries SET lease_until = NULL
WHERE id = :id AND lease_token = :lease_token + 1 AND attempts = 0 AND status = 'pending'
  AND lease_until IS NOT NULL
RETURNING id

-- name: release
UPDATE deliveries
SET lease_until = NULL, attempts = greatest(attempts - 1, 0),
    lease_token = lease_token + 1, updated_at = coalesce(:now, updated_at)
WHERE id = :id AND lease_token = :lease_token
  AND status = 'pending' AND lease_until IS NOT NULL
RETURNING id

-- name: stats
-- Per handler, over the open index (done rows, the bulk, stay out of it). A delivery held back
-- by LACUNA_<NAME>_AFTER is not due (claim will not take it): :held_handler and :held_by are
-- parallel arrays of (handler, prerequisite) pairs.
SELECT handler,
    count(*) FILTER (WHERE status = 'pending') AS pending,
    count(*) FILTER (WHERE due AND NOT held) AS due,
    count(*) FILTER (WHERE status = 'pending' AND lease_until > now()) AS running,
    count(*) FILTER (WHERE status = 'dead') AS dead,
    min(next_attempt_at) FILTER (WHERE due AND NOT held) AS oldest_due
FROM (
    SELECT d.*, due,
        due AND cardinality(:held_by::text[]) > 0 AND EXISTS (
            SELECT 1 FROM unnest(:held_handler::text[], :held_by::text[]) AS r(handler, prerequisite)
            JOIN deliveries AS p ON p.event_id = d.event_id AND p.handler = r.prerequisite
            WHERE r.handler = d.handler AND p.status = 'pending') AS held
    FROM deliveries AS d
    CROSS JOIN LATERAL (SELECT d.status = 'pending' AND d.next_attempt_at <= :now
        AND (d.lease_until IS NULL OR d.lease_until <= now()) AS due) AS t
    WHERE d.status <> 'done'
) AS open
GROUP BY handler

-- name: prune_lock
-- One replica prunes at a time.
SELECT pg_try_advisory_xact_lock(:key)

-- name: prune_candidates
-- Old by the pruning replica's clock (:cutoff) and, when :keep is given, by the database's:
-- a replica whose clock runs days ahead (a worker, which no sender's signature checks)
-- deleted events, and their dedupe, that a sender could still retry.
SELECT e.id FROM events e
WHERE e.received_at < :cutoff
  AND (:keep::interval IS NULL OR e.received_at < now() - :keep::interval)
  AND NOT EXISTS (SELECT 1 FROM deliveries d
                  WHERE d.event_id = e.id AND d.status = 'pending')
ORDER BY e.id
LIMIT :limit
FOR UPDATE OF e SKIP LOCKED

-- name: prune_delete
DELETE FROM events e
WHERE e.id = ANY(:ids::text[])
  AND NOT EXISTS (SELECT 1 FROM deliveries d
                  WHERE d.event_id = e.id AND d.status = 'pending')
RETURNING e.id

-- name: list_events
SELECT id, type, created, received_at, task_id, superseded, raw FROM events
WHERE :type::text IS NULL OR type = :type
ORDER BY received_at DESC, seq DESC
LIMIT :limit

-- name: stream_after
-- The live stream (0008_stream.sql): rows after the cursor (:xid xid as text, :seq seq) whose
-- transaction is older than every transaction still running, so none can commit behind them.
-- (The text of xid gets a name of its own: ORDER BY xid would sort by an output column of
-- that name, as text, where '10000' < '9999', and could not walk the index.)
-- Only as many as keep their bodies within :max_bytes (the first always): a running sum of
-- the body sizes, over the rows the LIMIT already cut, so the index walk stays a walk.
SELECT id, type, created, received_at, task_id, superseded, raw, stream_xid, seq
FROM (
    SELECT id, type, created, received_at, task_id, superseded, raw,
           xid::text AS stream_xid, seq, xid AS position_xid,
           sum(octet_length(raw)) OVER (ORDER BY events.xid, events.seq) AS upto,
           row_number() OVER (ORDER BY events.xid, events.seq) AS n
    FROM events
    WHERE (xid, seq) > (:xid::text::xid8, :seq::bigint)
      AND xid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY events.xid, events.seq
    LIMIT :limit
) AS page
WHERE n = 1 OR upto <= :max_bytes::bigint
ORDER BY position_xid, seq

-- name: event_bodies
-- The bodies of a search page's events, by arrival order (:seqs).
SELECT e.seq, e.raw FROM events AS e WHERE e.seq = ANY(:seqs::bigint[])

-- name: stream_head
-- "Now": every row written by a transaction below the snapshot's xmin is already visible.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text

-- name: get_event
SELECT id, type, created, received_at, task_id, superseded, raw
FROM events WHERE id = :id

-- name: list_deliveries
SELECT d.id, d.event_id, e.type AS event_type, d.handler, d.status, d.attempts,
    d.next_attempt_at, d.lease_until, d.last_error, d.created_at, d.updated_at,
    d.result::text AS result
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE (:status::text IS NULL OR d.status = :status)
  AND (:handler::text IS NULL OR d.handler = :handler)
  AND (:event_id::text IS NULL OR d.event_id = :event_id)
  AND (:before::bigint IS NULL OR d.id < :before)
ORDER BY d.id DESC
LIMIT :limit

-- name: list_attempts
SELECT delivery_id, attempt, started_at, finished_at, outcome, error
FROM attempts WHERE delivery_id = :delivery_id ORDER BY id

-- name: get_task
SELECT task_id, status, event_id, event_type, event_created, updated_at
FROM tasks WHERE task_id = :task_id

-- name: lock_event
-- The row lock keeps a concurrent prune from deleting the event under a replay.
SELECT true FROM events WHERE id = :event_id FOR SHARE

-- name: replay_all
-- Replays and retries are due now for every replica: at the earlier of the caller's clock and
-- the database's (a caller whose clock runs ahead made them wait that long everywhere else).
UPDATE deliveries
SET status = 'pending', attempts = 0, next_attempt_at = LEAST(:now, now()),
    lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > now() THEN lease_until END,
    last_error = NULL, updated_at = :now
WHERE event_id = :event_id
RETURNING id

-- name: replay_handlers
INSERT INTO deliveries AS d
    (event_id, handler, status, next_attempt_at, created_at, updated_at)
SELECT :event_id, handler, 'pending', LEAST(:now, now()), :now, :now FROM unnest(:handlers::text[]) AS handler
ON CONFLICT (event_id, handler) DO UPDATE SET
    status = 'pending', attempts = 0, next_attempt_at = LEAST(:now, now()),
    lease_token = d.lease_token + 1,
    lease_until = CASE WHEN d.lease_until > now() THEN d.lease_until END,
    last_error = NULL, updated_at = :now
RETURNING d.id

-- name: lock_events
-- replay_many: the batch's events still stored, locked in a fixed order (as prune and the other
-- replays lock them) so a concurrent prune cannot delete one under the batch.
SELECT id FROM events WHERE id = ANY(:ids::text[]) ORDER BY id FOR SHARE

-- name: replay_many_all
UPDATE deliveries
SET status = 'pending', attempts = 0, next_attempt_at = LEAST(:now, now()),
    lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > now() THEN lease_until END,
    last_error = NULL, updated_at = :now
WHERE event_id = ANY(:ids::text[])
RETURNING id

-- name: replay_many_reset
UPDATE deliveries
SET status = 'pending', attempts = 0, next_attempt_at = LEAST(:now, now()),
    lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > now() THEN lease_until END,
    last_error = NULL, updated_at = :now
WHERE event_id = ANY(:ids::text[]) AND handler = ANY(:handlers::text[])
RETURNING id

-- name: replay_many_create
-- Backfill: a pending delivery of each handler for each (locked, still stored) event that has
-- none; the unique key skips the others.
INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)
SELECT e, h, 'pending', LEAST(:now, now()), :now, :now FROM unnest(:ids::text[]) AS e, unnest(:handlers::text[]) AS h
ON CONFLICT (event_id, handler) DO NOTHING
RETURNING id

-- name: lock_dead_events
SELECT 1 FROM events e
WHERE EXISTS (SELECT 1 FROM deliveries d
              WHERE d.event_id = e.id AND d.status = 'dead'
                AND (:handler::text IS NULL OR d.handler = :handler))
ORDER BY e.id
FOR SHARE OF e

-- name: retry_dead
UPDATE deliveries
SET status = 'pending', attempts = 0, next_attempt_at = LEAST(:now, now()),
    lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > now() THEN lease_until END,
    last_error = NULL, updated_at = :now
WHERE status = 'dead' AND (:handler::text IS NULL OR handler = :handler)
RETURNING id

-- name: write_probe
-- Readiness after a failed write: one row rewritten, proving a commit goes through.
INSERT INTO write_probe (id, written_at) VALUES (1, now())
ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at

-- name: pause
-- Pause :handler unless it already is; a row comes back only when this call paused it.
INSERT INTO handler_state (handler, paused, reason, consecutive_failures, updated_at)
VALUES (:handler, true, :reason, 0, :now)
ON CONFLICT (handler) DO UPDATE SET paused = true, reason = excluded.reason,
    updated_at = excluded.updated_at
WHERE NOT handler_state.paused
RETURNING handler

-- name: resume
-- Resume :handler if paused, its failure count cleared (else the next failure re-pauses it).
UPDATE handler_state SET paused = false, reason = NULL, consecutive_failures = 0, updated_at = :now
WHERE handler = :handler AND paused
RETURNING handler

-- name: handler_states
SELECT handler, paused, reason, consecutive_failures, updated_at FROM handler_state
ORDER BY handler

-- name: paused_handlers
SELECT handler, paused, reason, consecutive_failures, updated_at FROM handler_state
WHERE paused

-- name: count_failure
-- One more consecutive failed attempt of :handler (outbox.finish_counted, in the transaction
-- that recorded it); the count and whether it is paused.
INSERT INTO handler_state (handler, paused, consecutive_failures, updated_at)
VALUES (:handler, false, 1, :now)
ON CONFLICT (handler) DO UPDATE SET
    consecutive_failures = handler_state.consecutive_failures + 1, updated_at = excluded.updated_at
RETURNING consecutive_failures, paused

-- name: refill_tokens
-- The bucket of :handler refilled up to the database's clock (created full), :capacity at most;
-- its tokens. The upsert locks the row until the transaction ends: replicas take tokens one at
-- a time. The time is clock_timestamp(), read once the row is locked (now() is when the
-- transaction began, which may be before the previous taker's). updated_at follows that clock
-- back too: kept at a time the database's clock stepped back from (a VM restored, NTP stepping
-- its host), the bucket refilled nothing until the clock caught up, a rate-limited handler
-- frozen on every replica for as long as the step (SQLite's bucket follows its clock alike).
INSERT INTO rate_buckets AS b (handler, tokens, updated_at)
VALUES (:handler, :capacity::float8, clock_timestamp())
ON CONFLICT (handler) DO UPDATE SET
    tokens = least(:capacity::float8, b.tokens
        + :rate::float8 * greatest(0, extract(epoch FROM clock_timestamp() - b.updated_at)::float8)),
    updated_at = clock_timestamp()
RETURNING tokens

-- name: spend_tokens
-- Take :count tokens (negative: give unused ones back, never above :capacity).
UPDATE rate_buckets SET tokens = least(:capacity::float8, tokens - :count::float8) WHERE handler = :handler

-- name: search_events
-- The admin search (store/searchsql.py fills in the conditions): newest first, ties by seq.
-- The body's length, not the body (octet_length reads no TOAST): a page reads the bodies it
-- keeps afterwards (event_bodies), within its byte budget.
SELECT e.seq, e.id, e.type, e.created, e.received_at, e.task_id, e.superseded,
    octet_length(e.raw) AS size
FROM events AS e
WHERE /* where */
ORDER BY e.received_at DESC, e.seq DESC

-- name: search_events_payload
-- The same with `match` conditions: the body parsed once per row that passes the other
-- conditions (OFFSET 0 keeps the subquery from being inlined and the call repeated).
SELECT e.seq, e.id, e.type, e.created, e.received_at, e.task_id, e.superseded,
    octet_length(e.raw) AS size
FROM events AS e CROSS JOIN LATERAL (SELECT lacuna_payload(e.raw) AS payload OFFSET 0) AS j
WHERE /* where */
ORDER BY e.received_at DESC, e.seq DESC

-- name: handler_queue
-- Per handler: its pending deliveries split as search.py's delivery_state (leases by the
-- database's clock, as claim), and its dead ones. :now: now (what is due).
SELECT handler,
    count(*) FILTER (WHERE status = 'pending' AND lease_until > now()) AS running,
    count(*) FILTER (WHERE status = 'pending' AND (lease_until IS NULL OR lease_until <= now())
        AND next_attempt_at <= :now) AS due,
    count(*) FILTER (WHERE status = 'pending' AND (lease_until IS NULL OR lease_until <= now())
        AND next_attempt_at > :now) AS waiting,
    count(*) FILTER (WHERE status = 'dead') AS dead
FROM deliveries WHERE status <> 'done' GROUP BY handler

-- name: handler_attempts
-- Per handler: attempts finished since :since, how many succeeded, nearest-rank p50/p95 durations.
SELECT d.handler, count(*) AS attempts, count(*) FILTER (WHERE a.outcome = 'ok') AS succeeded,
    percentile_disc(0.5) WITHIN GROUP (
        ORDER BY extract(epoch FROM a.finished_at - a.started_at)::float8) AS p50_seconds,
    percentile_disc(0.95) WITHIN GROUP (
        ORDER BY extract(epoch FROM a.finished_at - a.started_at)::float8) AS p95_seconds
FROM attempts AS a JOIN deliveries AS d ON d.id = a.delivery_id
WHERE a.finished_at >= :since
GROUP BY d.handler

-- name: handler_last_errors
-- Per handler: the latest failed attempt finished since :since.
SELECT DISTINCT ON (d.handler) d.handler, a.error AS last_error, a.finished_at AS last_error_at
FROM attempts AS a JOIN deliveries AS d ON d.id = a.delivery_id
WHERE a.finished_at >= :since AND a.error IS NOT NULL
ORDER BY d.handler, a.finished_at DESC, a.id DESC
