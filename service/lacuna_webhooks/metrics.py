"""Prometheus metrics, on a registry of their own (one per app, so tests never collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "lacuna_webhooks"


class Metrics:
    """Every metric the service exports. Names are stable: dashboards depend on them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            f"{PREFIX}_received",
            "Webhook requests answered, by outcome (accepted, duplicate, or the error code).",
            ["outcome"],
            registry=r,
        )
        self.http_refused = Counter(
            f"{PREFIX}_http_refused",
            "Requests refused and connections closed by the HTTP layer, by reason "
            "(request_timeout, headers_too_large, malformed_request, server_busy, "
            "idle_shed, slow_shed).",
            ["reason"],
            registry=r,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer a webhook request.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.deliveries = Counter(
            f"{PREFIX}_deliveries",
            "Handler attempts, by handler and outcome (ok, retry, dead).",
            ["handler", "outcome"],
            registry=r,
        )
        self.handler_latency = Histogram(
            f"{PREFIX}_handler_duration_seconds",
            "Time one handler attempt took.",
            ["handler"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=r,
        )
        self.worker_restarts = Counter(
            f"{PREFIX}_handler_worker_restarts",
            "Handler worker processes started again, by handler and reason (timeout: killed "
            "for an attempt that outlived its timeout; crash; start_failed).",
            ["handler", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Pending deliveries, by state (due, running, waiting for a retry or a prerequisite "
            "handler) and dead ones.",
            ["state"],
            registry=r,
        )
        self.handler_queue_depth = Gauge(
            f"{PREFIX}_handler_queue_depth",
            "Pending deliveries of each handler, by state (due, running, waiting for a retry or "
            "a prerequisite handler) "
            "and its dead ones; read from the store at each scrape.",
            ["handler", "state"],
            registry=r,
        )
        self.handler_oldest_due_age = Gauge(
            f"{PREFIX}_handler_oldest_due_age_seconds",
            "How long each handler's oldest due, unclaimed delivery has been waiting "
            "(0 when none).",
            ["handler"],
            registry=r,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 when the store answered this scrape's readiness check (as /readyz), else 0.",
            registry=r,
        )
        self.oldest_due_age = Gauge(
            f"{PREFIX}_queue_oldest_due_age_seconds",
            "How long the oldest due, unclaimed delivery has been waiting (0 when none).",
            registry=r,
        )

        self.handler_paused = Gauge(
            f"{PREFIX}_handler_paused",
            "1 while the handler is paused (by an operator, PAUSE_AFTER_FAILURES or a 410), "
            "else 0, as this process last read it from the store.",
            ["handler"],
            registry=r,
        )
        self.handler_pauses = Counter(
            f"{PREFIX}_handler_pauses",
            "Handlers this process paused, by handler and cause (failures: "
            "PAUSE_AFTER_FAILURES reached; gone: the endpoint answered 410).",
            ["handler", "cause"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
