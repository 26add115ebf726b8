-- The named queries of the SQLite store (store/queries.py). Times are epoch seconds (REAL).
-- Parameters are named (:name), as in PostgreSQL's file. A block may hold several statements
-- (`;`-separated): the driver runs them in order; a count is the last one's. The SHARED queries return the same columns as PostgreSQL's.

-- name: claim
-- Lease up to :limit due deliveries of :handler, oldest due first, with their event's body.
-- :after (a JSON array of handler names, LACUNA_<NAME>_AFTER) holds back a delivery while a
-- delivery of one of them for the same event is still pending (SPEC §6).
UPDATE deliveries SET lease_until = :until, attempts = attempts + 1,
    lease_token = lease_token + 1, updated_at = :now
WHERE id IN (
    SELECT id FROM deliveries AS d
    WHERE status = 'pending' AND handler = :handler AND next_attempt_at <= :now
      AND (lease_until IS NULL OR lease_until <= :now)
      AND (:after = '[]' OR NOT EXISTS (
          SELECT 1 FROM deliveries AS p
          WHERE p.event_id = d.event_id AND p.status = 'pending'
            AND p.handler IN (SELECT value FROM json_each(:after))))
    ORDER BY next_attempt_at, id LIMIT :limit)
RETURNING id, event_id, handler, attempts, lease_token, next_attempt_at, created_at,
    (SELECT raw FROM events WHERE events.id = deliveries.event_id) AS raw,
    (SELECT trace_context FROM events WHERE events.id = deliveries.event_id) AS trace_context

-- name: finish
-- An outcome and its attempt, only for the live claim: same token, still pending, still
-- leased. Two statements (the driver runs each; the count is the last one's): the attempt row
-- first, numbered as the claim left the delivery, then the delivery. :status is the new status,
-- :next_attempt_at the next attempt's time (a retry) or NULL (unchanged), :result the handler's
-- JSON object (completions only) or NULL, :refund 1 for a retry that does not spend the budget
-- (a 429, docs/delivery.md): the claim's attempt is undone.
INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, outcome, error, duration_ms)
SELECT id, attempts, :started_at, :finished_at, :outcome, :error,
    (:finished_at - :started_at) * 1000.0
FROM deliveries
WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL;
UPDATE deliveries SET status = :status, lease_until = NULL,
    next_attempt_at = coalesce(:next_attempt_at, next_attempt_at),
    last_error = :error, result = :result, updated_at = :finished_at,
    attempts = max(attempts - :refund, 0)
WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL;

-- name: finish_success
-- `finish` of a success, which ends the handler's run of failures in the same transaction:
-- the attempt row, then (for the live claim only, and only when there is a count to reset)
-- the handler's count, then the delivery, whose count is the block's.
INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, outcome, error, duration_ms)
SELECT id, attempts, :started_at, :finished_at, :outcome, :error,
    (:finished_at - :started_at) * 1000.0
FROM deliveries
WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL;
UPDATE handler_state SET consecutive_failures = 0, updated_at = :finished_at
WHERE handler = :handler AND consecutive_failures > 0
  AND EXISTS (SELECT 1 FROM deliveries
              WHERE id = :id AND lease_token = :lease_token AND status = 'pending'
                AND lease_until IS NOT NULL);
UPDATE deliveries SET status = :status, lease_until = NULL,
    next_attempt_at = coalesce(:next_attempt_at, next_attempt_at),
    last_error = :error, result = :result, updated_at = :finished_at,
    attempts = max(attempts - :refund, 0)
WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL;

-- name: end_revoked
-- The attempt of claim :lease_token has ended, and a reset revoked it since (the token moved
-- on by exactly one, a fresh budget, the lease kept): end that lease, so the delivery is due
-- at once rather than when the lease expires. A claim since (attempts >= 1) or a second reset
-- leaves it to expire: never a lease of another attempt cleared.
UPDATE deliveries SET lease_until = NULL
WHERE id = :id AND lease_token = :lease_token + 1 AND attempts = 0 AND status = 'pending'
  AND lease_until IS NOT NULL


-- name: release
-- Give a live claim back: due at once (next_attempt_at unchanged), attempt undone, token on.
UPDATE deliveries SET lease_until = NULL, attempts = max(attempts - 1, 0),
    lease_token = lease_token + 1, updated_at = coalesce(:now, updated_at)
WHERE id = :id AND lease_token = :lease_token AND status = 'pending' AND lease_until IS NOT NULL

-- name: lock_event
-- One writer: nothing to lock, only whether the event is stored.
SELECT 1 FROM events WHERE id = :event_id

-- name: replay_all
-- Reset: pending, due now, a fresh budget, no error, and a new token that revokes a live claim.
-- A live lease is kept: the revoked attempt may still be running, and the delivery must not
-- be claimed (run) again beside it; it ends when that attempt ends (end_revoked) or expires.
UPDATE deliveries SET status = 'pending', attempts = 0, lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > :now THEN lease_until END, last_error = NULL, next_attempt_at = :now, updated_at = :now
WHERE event_id = :event_id

-- name: replay_handlers
-- Each of :handlers (a JSON array) reset as replay_all resets, or created when missing.
INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)
SELECT :event_id, value, 'pending', :now, :now, :now FROM json_each(:handlers) WHERE true
ON CONFLICT (event_id, handler) DO UPDATE SET status = 'pending', attempts = 0,
    lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > :now THEN lease_until END, last_error = NULL,
    next_attempt_at = :now, updated_at = :now

-- name: lock_events
-- replay_many: the batch's events (a JSON array of ids) still stored (one writer: no lock).
SELECT id FROM events WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY id

-- name: replay_many_all
-- replay_many without handlers: every delivery of the batch's events (a JSON array of ids),
-- reset as replay_all resets one event's; each id is a lookup of the (event_id, handler) key.
UPDATE deliveries SET status = 'pending', attempts = 0, lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > :now THEN lease_until END, last_error = NULL, next_attempt_at = :now, updated_at = :now
WHERE event_id IN (SELECT value FROM json_each(:ids))

-- name: replay_many_reset
UPDATE deliveries SET status = 'pending', attempts = 0, lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > :now THEN lease_until END, last_error = NULL, next_attempt_at = :now, updated_at = :now
WHERE event_id IN (SELECT value FROM json_each(:ids))
  AND handler IN (SELECT value FROM json_each(:handlers))

-- name: replay_many_create
-- Backfill: a pending delivery of each handler for each stored event of the batch that has
-- none (the unique key skips the others; ids no longer stored join no event row).
INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)
SELECT e.id, h.value, 'pending', :now, :now, :now
FROM events AS e, json_each(:handlers) AS h
WHERE e.id IN (SELECT value FROM json_each(:ids))
ON CONFLICT (event_id, handler) DO NOTHING

-- name: lock_dead_events
-- One writer: nothing to lock (PostgreSQL locks the events against a concurrent prune).
SELECT 1

-- name: retry_dead
UPDATE deliveries SET status = 'pending', attempts = 0, lease_token = lease_token + 1,
    lease_until = CASE WHEN lease_until > :now THEN lease_until END, last_error = NULL, next_attempt_at = :now, updated_at = :now
WHERE status = 'dead' AND (:handler IS NULL OR handler = :handler)

-- name: prune_lock
-- One writer: pruning never runs beside another prune.
SELECT 1

-- name: prune_candidates
SELECT id FROM events AS e
WHERE received_at < :cutoff
  AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.event_id = e.id AND d.status = 'pending')
LIMIT :limit

-- name: prune_delete
-- The candidates (a JSON array of ids) with their deliveries and attempts, in three statements
-- (the count is the last one's: the events).
DELETE FROM attempts WHERE delivery_id IN
    (SELECT id FROM deliveries WHERE event_id IN (SELECT value FROM json_each(:ids)));
DELETE FROM deliveries WHERE event_id IN (SELECT value FROM json_each(:ids));
DELETE FROM events WHERE id IN (SELECT value FROM json_each(:ids));



-- name: stats
-- Per handler: the pending counts use the partial claim index (handler first, so the groups come
-- in order), the dead counts the partial dead index; done rows (the bulk) are never read.
-- A delivery held back by LACUNA_<NAME>_AFTER is not due (claim will not take it): :held_handler
-- and :held_by are parallel JSON arrays of (handler, prerequisite) pairs.
SELECT handler, count(*) AS pending,
    count(*) FILTER (WHERE next_attempt_at <= :now AND coalesce(lease_until, 0) <= :now
        AND NOT held) AS due,
    count(*) FILTER (WHERE lease_until > :now) AS running,
    0 AS dead,
    min(next_attempt_at) FILTER
        (WHERE next_attempt_at <= :now AND coalesce(lease_until, 0) <= :now
         AND NOT held) AS oldest_due
FROM (
    SELECT handler, next_attempt_at, lease_until,
        :held_by <> '[]' AND next_attempt_at <= :now AND coalesce(lease_until, 0) <= :now
        AND EXISTS (
            SELECT 1 FROM json_each(:held_handler) AS h
            JOIN json_each(:held_by) AS b ON b.key = h.key
            JOIN deliveries AS p ON p.event_id = d.event_id AND p.handler = b.value
            WHERE h.value = d.handler AND p.status = 'pending') AS held
    FROM deliveries AS d WHERE status = 'pending'
)
GROUP BY handler
UNION ALL
SELECT handler, 0, 0, 0, count(*), NULL FROM deliveries WHERE status = 'dead' GROUP BY handler

-- name: list_events
SELECT id, type, created, received_at, task_id, superseded, raw FROM events
WHERE :type IS NULL OR type = :type
ORDER BY received_at DESC, rowid DESC LIMIT :limit

-- name: get_event
SELECT id, type, created, received_at, task_id, superseded, raw FROM events WHERE id = :id

-- name: list_deliveries
SELECT d.id, d.event_id, e.type AS event_type, d.handler, d.status, d.attempts,
    d.next_attempt_at, d.lease_until, d.last_error, d.created_at, d.updated_at, d.result
FROM deliveries AS d JOIN events AS e ON e.id = d.event_id
WHERE (:status IS NULL OR d.status = :status)
  AND (:handler IS NULL OR d.handler = :handler)
  AND (:event_id IS NULL OR d.event_id = :event_id)
  AND (:before IS NULL OR d.id < :before)
ORDER BY d.id DESC LIMIT :limit

-- name: list_attempts
SELECT delivery_id, attempt, started_at, finished_at, outcome, error
FROM attempts WHERE delivery_id = :delivery_id ORDER BY id

-- name: get_task
SELECT task_id, status, event_id, event_type, event_created, updated_at
FROM tasks WHERE task_id = :task_id

-- name: bring_forward
-- The machine's clock stepped back :by seconds: what was scheduled before the step lies that
-- much further off than meant. The next :limit pending deliveries due after :now with an id
-- above :after (and, with :since, the clock having stepped forward to it before, written
-- after it) come :by seconds earlier, never before :now (SQLiteStore.clock_stepped_back);
-- their ids returned. One chunk, so that a backlog does not hold the writer (and intake) in
-- one transaction. Leases are left as they are.
UPDATE deliveries SET next_attempt_at = max(next_attempt_at - :by, :now)
WHERE id IN (
    SELECT id FROM deliveries
    WHERE id > :after AND status = 'pending' AND next_attempt_at > :now
      AND (:since IS NULL OR updated_at > :since)
    ORDER BY id LIMIT :limit
)
RETURNING id

-- name: write_probe
-- Readiness after a failed write: one row rewritten, proving a commit goes through.
INSERT OR REPLACE INTO write_probe (id, written_at) VALUES (1, :now)

-- name: ping
SELECT max(version) FROM schema_version

-- name: accept_outcome_table
-- The group commit (accept): a batch is one multi-row INSERT into the TEMP view below, whose
-- INSTEAD OF trigger does, for each row in order, what accept means, and records whether the
-- event was new. Created per connection, on the writer's only; nothing of it is in the file.
CREATE TEMP TABLE IF NOT EXISTS accept_outcome (slot INTEGER PRIMARY KEY, stored INTEGER NOT NULL)

-- name: accept_batch_view
CREATE TEMP VIEW IF NOT EXISTS accept_batch AS SELECT NULL AS slot, NULL AS id, NULL AS type,
    NULL AS created, NULL AS received_at, NULL AS task_id, NULL AS task_status, NULL AS raw,
    NULL AS handlers, NULL AS event_order, NULL AS trace_context

-- name: accept_batch_trigger
CREATE TEMP TRIGGER IF NOT EXISTS accept_batch_row INSTEAD OF INSERT ON accept_batch
BEGIN
    -- the unique key decides new versus duplicate, also between two copies in one batch
    -- the stream position comes from the counter in this same transaction (0008_stream.sql)
    INSERT INTO events (id, type, created, received_at, task_id, raw, trace_context, stream_seq)
        VALUES (NEW.id, NEW.type, NEW.created, NEW.received_at, NEW.task_id, NEW.raw,
                NEW.trace_context, (SELECT last + 1 FROM stream_counter))
        ON CONFLICT (id) DO NOTHING;
    -- changes() is the count of the trigger's latest statement: 1 stored, 0 duplicate
    INSERT OR REPLACE INTO accept_outcome (slot, stored) VALUES (NEW.slot, changes());
    UPDATE stream_counter SET last = last + 1
        WHERE (SELECT stored FROM accept_outcome WHERE slot = NEW.slot);
    INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)
        SELECT NEW.id, value, 'pending', NEW.received_at, NEW.received_at, NEW.received_at
        FROM json_each(NEW.handlers)
        WHERE (SELECT stored FROM accept_outcome WHERE slot = NEW.slot)
        ON CONFLICT (event_id, handler) DO NOTHING;
    -- the task state only moves forward (rules.task_order); ties go to the later arrival
    INSERT INTO tasks (task_id, status, event_id, event_type, event_created, event_order,
                       updated_at)
        SELECT NEW.task_id, NEW.task_status, NEW.id, NEW.type, NEW.created,
               NEW.event_order, NEW.received_at
        WHERE NEW.task_id IS NOT NULL
          AND (SELECT stored FROM accept_outcome WHERE slot = NEW.slot)
        ON CONFLICT (task_id) DO UPDATE SET status = excluded.status,
            event_id = excluded.event_id, event_type = excluded.event_type,
            event_created = excluded.event_created, event_order = excluded.event_order,
            updated_at = excluded.updated_at
        WHERE tasks.event_order <= excluded.event_order;
    -- superseded: the upsert changed nothing, a newer state of the task was already stored;
    -- task_seq: the task's row numbers the event for the task search (0009_task_seq.sql)
    UPDATE events SET superseded = (changes() = 0),
        task_seq = (SELECT rowid FROM tasks WHERE task_id = NEW.task_id)
        WHERE id = NEW.id AND NEW.task_id IS NOT NULL
          AND (SELECT stored FROM accept_outcome WHERE slot = NEW.slot);
END

-- name: accept_batch_insert
INSERT INTO accept_batch
    (slot, id, type, created, received_at, task_id, task_status, raw, handlers, event_order,
     trace_context)
VALUES

-- name: accept_batch_outcomes
SELECT json_group_object(slot, stored) FROM accept_outcome WHERE slot < ?

-- name: pause
-- Pause :handler unless it already is; a row comes back only when this call paused it.
INSERT INTO handler_state (handler, paused, reason, consecutive_failures, updated_at)
VALUES (:handler, 1, :reason, 0, :now)
ON CONFLICT (handler) DO UPDATE SET paused = 1, reason = excluded.reason,
    updated_at = excluded.updated_at
WHERE handler_state.paused = 0
RETURNING handler

-- name: resume
-- Resume :handler if paused, its failure count cleared (else the next failure re-pauses it).
UPDATE handler_state SET paused = 0, reason = NULL, consecutive_failures = 0, updated_at = :now
WHERE handler = :handler AND paused = 1
RETURNING handler

-- name: handler_states
SELECT handler, paused, reason, consecutive_failures, updated_at FROM handler_state
ORDER BY handler

-- name: stream_after
-- The live stream: events after position :after, in position order (0008_stream.sql).
SELECT id, type, created, received_at, task_id, superseded, raw, stream_seq FROM events
WHERE stream_seq > :after ORDER BY stream_seq LIMIT :limit

-- name: stream_head
SELECT last FROM stream_counter

-- name: event_bodies
-- The bodies of a search page's events, by arrival order (:seqs, a JSON list of rowids).
SELECT e.rowid AS seq, e.raw FROM events AS e WHERE e.rowid IN (SELECT value FROM json_each(:seqs))

-- name: paused_handlers
SELECT handler, paused, reason, consecutive_failures, updated_at FROM handler_state
WHERE paused = 1

-- name: count_failure
-- One more consecutive failed attempt of :handler (outbox.finish_counted, in the transaction
-- that recorded it); the count and whether it is paused.
INSERT INTO handler_state (handler, paused, consecutive_failures, updated_at)
VALUES (:handler, 0, 1, :now)
ON CONFLICT (handler) DO UPDATE SET
    consecutive_failures = handler_state.consecutive_failures + 1, updated_at = excluded.updated_at
RETURNING consecutive_failures, paused

-- name: refill_tokens
-- The bucket of :handler refilled up to now (created full), :capacity at most; its tokens.
-- updated_at follows the clock back too: kept at a time the clock stepped back from, it
-- refilled nothing until the clock caught up (a handler frozen for as long as the step).
INSERT INTO rate_buckets (handler, tokens, updated_at) VALUES (:handler, :capacity, :now)
ON CONFLICT (handler) DO UPDATE SET
    tokens = min(:capacity,
        rate_buckets.tokens + :rate * max(0, :now - rate_buckets.updated_at)),
    updated_at = :now
RETURNING tokens

-- name: spend_tokens
-- Take :count tokens (negative: give unused ones back, never above :capacity).
UPDATE rate_buckets SET tokens = min(:capacity, tokens - :count) WHERE handler = :handler

-- name: search_events
-- The admin search (store/searchsql.py fills in the conditions): newest first, ties by
-- arrival (rowid); the rowid is the cursor's second half. The body's length, not the body
-- (length() of a blob reads no overflow page): a page reads the bodies it keeps afterwards
-- (event_bodies), within its byte budget.
SELECT e.rowid AS seq, e.id, e.type, e.created, e.received_at, e.task_id, e.superseded,
    length(e.raw) AS size
FROM events AS e
WHERE /* where */
ORDER BY e.received_at DESC, e.rowid DESC

-- name: handler_queue
-- Per handler: its pending deliveries split as search.py's delivery_state, and its dead ones.
SELECT handler,
    sum(CASE WHEN lease_until > :now THEN 1 ELSE 0 END) AS running,
    sum(CASE WHEN (lease_until IS NULL OR lease_until <= :now) AND next_attempt_at <= :now
        THEN 1 ELSE 0 END) AS due,
    sum(CASE WHEN (lease_until IS NULL OR lease_until <= :now) AND next_attempt_at > :now
        THEN 1 ELSE 0 END) AS waiting,
    0 AS dead
FROM deliveries WHERE status = 'pending' GROUP BY handler
UNION ALL
SELECT handler, 0, 0, 0, count(*) FROM deliveries WHERE status = 'dead' GROUP BY handler

-- name: handler_attempts
-- Per handler: attempts finished since :since, how many succeeded, and the nearest-rank
-- p50/p95 of their durations (rank ceil(p * n), in integers: SQLite has no ceil everywhere).
SELECT handler, max(n) AS attempts, sum(ok) AS succeeded,
    max(CASE WHEN rn = (n * 50 + 99) / 100 THEN seconds END) AS p50_seconds,
    max(CASE WHEN rn = (n * 95 + 99) / 100 THEN seconds END) AS p95_seconds
FROM (
    SELECT d.handler, a.outcome = 'ok' AS ok, a.duration_ms / 1000.0 AS seconds,
        row_number() OVER (PARTITION BY d.handler ORDER BY a.duration_ms) AS rn,
        count(*) OVER (PARTITION BY d.handler) AS n
    FROM attempts AS a JOIN deliveries AS d ON d.id = a.delivery_id
    WHERE a.finished_at >= :since
)
GROUP BY handler

-- name: handler_last_errors
-- Per handler: the latest failed attempt finished since :since.
SELECT handler, error AS last_error, finished_at AS last_error_at FROM (
    SELECT d.handler, a.error, a.finished_at,
        row_number() OVER (PARTITION BY d.handler ORDER BY a.finished_at DESC, a.id DESC) AS rn
    FROM attempts AS a JOIN deliveries AS d ON d.id = a.delivery_id
    WHERE a.finished_at >= :since AND a.error IS NOT NULL
)
WHERE rn = 1

-- name: search_events_by_delivery
-- The same, when a rare delivery state (dead, or one of the pending ones) selects: the matching
-- deliveries drive (deliveries_handler_status or the partial indexes), then their events are
-- sorted, instead of walking every event newest first and probing its deliveries. CROSS JOIN
-- fixes that order: SQLite's planner has no statistics unless ANALYZE ran.
SELECT e.rowid AS seq, e.id, e.type, e.created, e.received_at, e.task_id, e.superseded,
    length(e.raw) AS size
FROM (SELECT DISTINCT d.event_id FROM deliveries AS d WHERE /* deliveries */) AS sel
CROSS JOIN events AS e ON e.id = sel.event_id
WHERE /* where */
ORDER BY e.received_at DESC, e.rowid DESC
