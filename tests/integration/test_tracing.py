"""OpenTelemetry tracing through the app (docs/observability.md), with the SDK's in-memory
exporter: the request span, its commit span, and the handler attempt's span joined to the
request's trace through the outbox (a real SQLite file in between).

Also: with the ``OTEL_*`` variables unset, nothing of OpenTelemetry is imported, and the
webhook endpoint is the plain one (no extra work per request); a bad ``OTEL_*`` setting, or
tracing on without the ``otel`` extra, stops ``serve`` with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient

from lacuna_webhooks.app import create_app
from lacuna_webhooks.config import Settings
from lacuna_webhooks.handlers.base import RecordingHandler, current_traceparent
from lacuna_webhooks.intake import WebhookEndpoint
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.tracing import TracedWebhookEndpoint, Tracing

from ..conftest import TEST_SECRET, make_event, signed

REPO = Path(__file__).resolve().parents[2]
URL = "/webhooks/lacuna"


class TraceparentHandler(RecordingHandler):
    """Records the ``current_traceparent`` each attempt sees (what the http handler sends)."""

    def __init__(self, name: str, script: list[BaseException | None] | None = None) -> None:
        super().__init__(name, script=script)
        self.traceparents: list[str | None] = []

    async def handle(self, event: Event) -> None:
        self.traceparents.append(current_traceparent.get())
        await super().handle(event)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def handler() -> TraceparentHandler:
    return TraceparentHandler("forward", script=[RuntimeError("peer down"), None])


@pytest.fixture
def client(
    tmp_path: Path, exporter: InMemorySpanExporter, handler: TraceparentHandler
) -> Iterator[TestClient]:
    settings = Settings.from_env(
        {
            "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_RETRY_BASE_DELAY": "0.05",
            "LACUNA_POLL_INTERVAL": "0.05",
        }
    )
    tracing = Tracing.with_processors([SimpleSpanProcessor(exporter)])
    app = create_app(settings, handlers=HandlerSet.of([handler]), tracing=tracing)
    assert isinstance(app.webhook, TracedWebhookEndpoint)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    tracing.shutdown()


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    trace_id, span_id = hex_ids(span)
    return f"00-{trace_id}-{span_id}-{span.context.trace_flags:02x}"


def test_request_commit_and_attempts_share_one_trace(
    client: TestClient, exporter: InMemorySpanExporter, handler: TraceparentHandler
) -> None:
    """The request span (server) holds the event's id and type and the status code; the
    commit span is its child; each attempt (a failure, then the retry) is a span of its own,
    a child of the request span, and the handler sees that attempt span's traceparent."""
    body, headers = signed(make_event("evt_traced_1"))
    assert client.post(URL, content=body, headers=headers).status_code == 200
    wait_for(lambda: len(spans_named(exporter, "handler forward")) == 2, "two attempt spans")

    (request,) = spans_named(exporter, "POST /webhooks/lacuna")
    (commit,) = spans_named(exporter, "store.accept")
    first, second = spans_named(exporter, "handler forward")
    assert request.kind is SpanKind.SERVER
    assert request.parent is None
    attributes = dict(request.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["lacuna.event.id"] == "evt_traced_1"
    assert attributes["lacuna.event.type"] == "job.completed"
    assert attributes["lacuna.outcome"] == "accepted"
    assert attributes["http.route"] == URL

    trace_id, request_span_id = hex_ids(request)
    assert commit.parent is not None
    assert commit.parent.span_id == request.context.span_id  # type: ignore[union-attr]
    for attempt, ending in ((first, "failed"), (second, "ok")):
        assert attempt.kind is SpanKind.CONSUMER
        assert hex_ids(attempt)[0] == trace_id
        assert attempt.parent is not None
        assert f"{attempt.parent.span_id:016x}" == request_span_id
        assert dict(attempt.attributes or {})["lacuna.attempt.ending"] == ending
        assert dict(attempt.attributes or {})["lacuna.handler"] == "forward"
    assert first.status.status_code is StatusCode.ERROR
    assert "peer down" in (first.status.description or "")
    assert dict(first.attributes or {})["lacuna.attempt"] == 1
    assert dict(second.attributes or {})["lacuna.attempt"] == 2
    assert handler.traceparents == [traceparent(first), traceparent(second)]


def test_a_duplicate_and_a_forgery_are_traced_without_event_details(
    client: TestClient, exporter: InMemorySpanExporter, handler: TraceparentHandler
) -> None:
    """A duplicate's span says so; a refused request's span has its status code and nothing
    read from the unverified body; a sender's traceparent is linked, never the parent."""
    body, headers = signed(make_event("evt_traced_2"))
    assert client.post(URL, content=body, headers=headers).status_code == 200
    sender = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert client.post(URL, content=body, headers={**headers, "traceparent": sender}).json()[
        "duplicate"
    ]
    forged, forged_headers = signed(make_event("evt_forged_x"), secret="whsec_" + "B" * 40)
    assert client.post(URL, content=forged, headers=forged_headers).status_code == 401

    first, duplicate, refused = spans_named(exporter, "POST /webhooks/lacuna")
    assert dict(duplicate.attributes or {})["lacuna.outcome"] == "duplicate"
    assert duplicate.parent is None
    assert [f"{link.context.trace_id:032x}" for link in duplicate.links] == [
        "0af7651916cd43dd8448eb211c80319c"
    ]
    assert hex_ids(duplicate)[0] != "0af7651916cd43dd8448eb211c80319c"
    refused_attributes = dict(refused.attributes or {})
    assert refused_attributes["http.response.status_code"] == 401
    assert not any(key.startswith("lacuna.") for key in refused_attributes)
    assert len(spans_named(exporter, "store.accept")) == 2  # the forgery never reached it
    wait_for(lambda: spans_named(exporter, "handler forward"), "the attempt span")
    attempt = spans_named(exporter, "handler forward")[0]
    assert hex_ids(attempt)[0] == hex_ids(first)[0]  # the original request's trace


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LACUNA_"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


OFF_PROBE = f"""
import os, sys
from starlette.testclient import TestClient
from lacuna_webhooks.app import create_app
from lacuna_webhooks.cli import _tracing
from lacuna_webhooks.config import Settings
from lacuna_webhooks.intake import WebhookEndpoint
from tests.conftest import make_event, signed

assert _tracing({{}}) is None
app = create_app(Settings.from_env({{"LACUNA_WEBHOOK_SECRET": {TEST_SECRET!r},
                                     "LACUNA_DATABASE_URL": os.environ["PROBE_DB"]}}))
assert type(app.webhook) is WebhookEndpoint, type(app.webhook)
with TestClient(app) as client:
    body, headers = signed(make_event("evt_off"))
    assert client.post("/webhooks/lacuna", content=body, headers=headers).status_code == 200
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") or m.endswith(".tracing"))
print("loaded:", loaded)
"""


def test_tracing_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    """Unset ``OTEL_*``: the endpoint is the plain ``WebhookEndpoint`` (the request path does
    not change by one call) and neither OpenTelemetry nor ``tracing.py`` is imported."""
    result = run_python(OFF_PROBE, PROBE_DB=f"sqlite:///{tmp_path / 'events.db'}")
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout, result.stdout
    assert WebhookEndpoint is not TracedWebhookEndpoint


SERVE_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from lacuna_webhooks.cli import main
sys.exit(main(["serve"]))
"""


def test_tracing_on_without_the_extra_is_one_clear_line(tmp_path: Path) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT set, OpenTelemetry missing: exit 2 and one line naming the
    extra to install, before anything starts."""
    result = run_python(
        SERVE_WITHOUT_OTEL,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
        LACUNA_WEBHOOK_SECRET=TEST_SECRET,
        LACUNA_DATABASE_URL=f"sqlite:///{tmp_path / 'events.db'}",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "lacuna-webhooks[otel]" in lines[0]
    assert "OpenTelemetry is not installed" in lines[0]
    assert not (tmp_path / "events.db").exists()  # nothing started


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: zipkin"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: grpc",
        ),
    ],
)
def test_a_setting_tracing_cannot_honour_stops_serve(
    tmp_path: Path, env: dict[str, str], problem: str
) -> None:
    result = run_python(
        "import sys\nfrom lacuna_webhooks.cli import main\nsys.exit(main(['serve']))",
        LACUNA_WEBHOOK_SECRET=TEST_SECRET,
        LACUNA_DATABASE_URL=f"sqlite:///{tmp_path / 'events.db'}",
        **env,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert problem in result.stderr
