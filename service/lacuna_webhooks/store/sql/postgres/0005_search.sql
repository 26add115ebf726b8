-- The admin search (GET /events, docs/admin.md): indexes that let a filtered, newest-first
-- page over a million events read only the rows it returns. received_at and type are served
-- by events_received_idx and events_type_received_idx (0001).
CREATE INDEX events_task_received_idx ON events (task_id, received_at, seq)
    WHERE task_id IS NOT NULL;
-- handler (+ status): which events have such a delivery; event_id makes it index-only.
CREATE INDEX deliveries_handler_status_idx ON deliveries (handler, status, event_id);

-- A stored body as jsonb, or NULL when jsonb refuses it (a \u0000 escape, a lone surrogate,
-- nesting beyond the stack limit...): raw is kept byte for byte as signed (bytea), and a
-- `match` over such a row must simply not match, never fail the whole search.
CREATE FUNCTION lacuna_payload(raw bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN convert_from(raw, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- Handler health (GET /handlers): the attempts of the last hour.
CREATE INDEX attempts_finished_idx ON attempts (finished_at);
