"""OpenTelemetry tracing: the one module that imports it (the ``otel`` extra).

Imported only when the ``OTEL_*`` variables turn tracing on (``tracing_config.load_tracing``);
otherwise nothing here runs and the request path is the plain ``intake.WebhookEndpoint``.

Spans (docs/observability.md):

- ``POST /webhooks/lacuna`` (server): one per webhook request, with ``http.*`` attributes,
  ``http.response.status_code``, and, once the signature verified, ``lacuna.event.id`` /
  ``lacuna.event.type`` / ``lacuna.outcome`` (nothing of an unverified body is recorded).
  A ``traceparent`` sent by the sender is *linked*, never adopted as parent: the endpoint is
  public, and a caller must not choose the trace our spans land in.
- ``store.accept`` (internal, child of the request span): the durable commit.
- ``handler <name>`` (consumer): one per handler attempt, in the handler's worker process,
  a child of the request span through the outbox: the request's ``traceparent`` is stored with
  the event (``Store.accept(trace_context=)``, column ``events.trace_context``) and comes back
  with each claimed delivery (``Delivery.trace_context``). With tracing off nothing is stored
  and the intake path is the untraced endpoint's, call for call. While an attempt runs,
  ``handlers.base.current_traceparent`` holds its own ``traceparent`` (the ``http`` handler
  sends it on).

Configuration is the standard ``OTEL_*`` variables, checked first by
``tracing_config.sdk_settings``: ``OTLPSpanExporter()`` reads ``OTEL_EXPORTER_OTLP_*``,
``TracerProvider`` ``OTEL_SDK_DISABLED`` and the span limits, ``Resource.create``
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (``service.name`` defaults to
``lacuna-webhooks``). The sampler (``OTEL_TRACES_SAMPLER`` / ``…_ARG``) and the batch span
processor's numbers (``OTEL_BSP_*``) are given to the SDK as arguments, as checked there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .config import Settings
from .dispatch.attempt import Ending, Outcome, run_attempt
from .handlers.base import Handler, current_traceparent
from .intake import WEBHOOK_PATH, Receive, Scope, Send, WebhookEndpoint
from .metrics import Metrics
from .models import Event
from .plugins import HandlerSet
from .store import Store
from .tracing_config import SdkSettings

SERVICE = "lacuna-webhooks"
SCOPE = "lacuna_webhooks"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")
#: The traceparent of the request span whose commit is running (each request is a task).
_REQUEST_TRACEPARENT: ContextVar[str | None] = ContextVar(
    "lacuna_request_traceparent", default=None
)


def traceparent_of(span: trace.Span) -> str | None:
    """The W3C ``traceparent`` of ``span``; ``None`` for an invalid (non-recording) one."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def _context_of(traceparent: str | None) -> Any:
    """The OpenTelemetry context a stored ``traceparent`` names (empty when none or bad)."""
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


class Tracing:
    """A tracer provider and what the service does with it: the traced webhook endpoint and
    the traced attempt runner. ``shutdown()`` flushes the spans still queued."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE, __version__)

    @classmethod
    def from_env(cls, exporters: Sequence[str], settings: SdkSettings | None = None) -> Tracing:
        """The SDK configured by the ``OTEL_*`` environment, exporting through ``exporters``
        (``otlp``: OTLP over HTTP; ``console``: stdout), each behind a batch processor, with
        the sampler and batching of ``settings`` (``tracing_config.sdk_settings``)."""
        settings = settings or SdkSettings()
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
        made: dict[str, type[SpanExporter]] = {
            "otlp": OTLPSpanExporter,
            "console": ConsoleSpanExporter,
        }
        processors = [
            BatchSpanProcessor(
                made[name](),
                max_queue_size=settings.max_queue_size,
                schedule_delay_millis=settings.schedule_delay_millis,
                max_export_batch_size=settings.max_export_batch_size,
                export_timeout_millis=settings.export_timeout_millis,
            )
            for name in exporters
        ]
        return cls.with_processors(processors, resource=resource, sampler=_sampler(settings))

    @classmethod
    def with_processors(
        cls,
        processors: Sequence[SpanProcessor],
        *,
        resource: Resource | None = None,
        sampler: Sampler | None = None,
    ) -> Tracing:
        """A provider with these span processors (tests: the SDK's in-memory exporter);
        ``sampler`` ``None``: always on, unless a parent says otherwise."""
        provider = TracerProvider(
            sampler=sampler or DEFAULT_ON,
            resource=resource or Resource({SERVICE_NAME: SERVICE}),
            shutdown_on_exit=False,
        )
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the SDK's export timeout) and stop."""
        self.provider.shutdown()

    # --- intake ---------------------------------------------------------------------------

    def endpoint(
        self, settings: Settings, store: Store, handlers: HandlerSet, metrics: Metrics
    ) -> WebhookEndpoint:
        """The webhook endpoint, with its request and commit spans."""
        return TracedWebhookEndpoint(settings, store, handlers, metrics, tracer=self.tracer)

    # --- attempts ---------------------------------------------------------------------------

    async def run_attempt(
        self,
        handler: Handler,
        event: Event,
        timeout_seconds: float,
        *,
        attempt: int | None = None,
        results: Mapping[str, Any] | None = None,
        trace_context: str | None = None,
    ) -> Outcome:
        """``attempt.run_attempt`` inside a ``handler <name>`` span, a child of the span of the
        request that received the event (``trace_context``, its stored traceparent; without
        one, the root of a trace of its own)."""
        attributes: dict[str, Any] = {
            "lacuna.handler": handler.name,
            "lacuna.event.id": event.id,
            "lacuna.event.type": event.type,
        }
        if attempt is not None:
            attributes["lacuna.attempt"] = attempt
        with self.tracer.start_as_current_span(
            f"handler {handler.name}",
            context=_context_of(trace_context),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            token = current_traceparent.set(traceparent_of(span))
            try:
                outcome = await run_attempt(
                    handler, event, timeout_seconds, attempt=attempt, results=results
                )
            finally:
                current_traceparent.reset(token)
            span.set_attribute("lacuna.attempt.ending", outcome.ending.value)
            if outcome.ending is not Ending.OK:
                span.set_status(Status(StatusCode.ERROR, (outcome.error or "")[:500]))
            return outcome


def _sampler(settings: SdkSettings) -> Sampler:
    """The SDK's sampler named by ``OTEL_TRACES_SAMPLER`` (checked in ``sdk_settings``)."""
    ratio = settings.sampler_ratio
    named: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "parentbased_always_on": DEFAULT_ON,
        "parentbased_always_off": DEFAULT_OFF,
    }
    if settings.sampler == "traceidratio":
        return TraceIdRatioBased(ratio)
    if settings.sampler == "parentbased_traceidratio":
        return ParentBasedTraceIdRatio(ratio)
    return named[settings.sampler]


class TracedWebhookEndpoint(WebhookEndpoint):
    """``WebhookEndpoint`` inside a server span per request and a span for the commit."""

    serves_direct = False  # the span wraps the ASGI call: always served through it

    def __init__(
        self,
        settings: Settings,
        store: Store,
        handlers: HandlerSet,
        metrics: Metrics,
        *,
        tracer: trace.Tracer,
    ) -> None:
        super().__init__(settings, store, handlers, metrics)
        self.tracer = tracer
        # The endpoint's one store call, ``accept``, given the request's traceparent.
        self.store = cast(Store, _AcceptWithTraceContext(store))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _TRACE_HEADERS
        }
        links = []
        if carrier:
            sender = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
            if sender.is_valid:
                links.append(Link(sender))
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "http.route": WEBHOOK_PATH,
            "url.path": WEBHOOK_PATH,
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        client = scope.get("client")
        if client:
            attributes["client.address"] = str(client[0])
        status = 0

        async def send_traced(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            f"POST {WEBHOOK_PATH}",
            context=Context(),  # a root: see the module docstring
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
        ) as span:
            await super().__call__(scope, receive, send_traced)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))

    async def _accept(self, event: Event, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        request = trace.get_current_span()
        request.set_attributes({"lacuna.event.id": event.id, "lacuna.event.type": event.type})
        _REQUEST_TRACEPARENT.set(traceparent_of(request))  # this request's task only
        with self.tracer.start_as_current_span(
            "store.accept",
            attributes={"lacuna.event.id": event.id, "lacuna.event.type": event.type},
        ) as span:
            new = await super()._accept(event, loop)
            span.set_attribute("lacuna.duplicate", not new)
        request.set_attribute("lacuna.outcome", "accepted" if new else "duplicate")
        return new


class _AcceptWithTraceContext:
    """The store as the traced endpoint sees it: its ``accept`` (the endpoint's only store
    call) also stores the request span's traceparent, which ``TracedWebhookEndpoint._accept``
    leaves in ``_REQUEST_TRACEPARENT`` for this request's task."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def accept(self, event: Event, handlers: Sequence[str], *, now: datetime) -> bool:
        return await self._store.accept(
            event, handlers, now=now, trace_context=_REQUEST_TRACEPARENT.get()
        )


__all__ = ["SERVICE", "TracedWebhookEndpoint", "Tracing", "traceparent_of"]
