-- Tracing (docs/observability.md): the W3C traceparent of the request that received the event,
-- written only while tracing is on (NULL otherwise), so each handler attempt's span joins the
-- request's trace, in whatever process or replica runs it.
ALTER TABLE events ADD COLUMN trace_context TEXT;
