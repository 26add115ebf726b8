"""Tracing end to end: a real ``serve`` (its handler in a worker process) exports over OTLP/HTTP
to a real receiver in this test, which decodes the protobuf with ``opentelemetry-proto``.

The request span, the commit span and the ``http`` handler's attempt span (exported by the
worker process) share one trace, the attempt a child of the request; the forwarded request
carries the attempt span's ``traceparent``; the resource names the service as configured.
"""

from __future__ import annotations

import gzip
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import make_event, signed
from tests.e2e.conftest import CLI, Serve, wait_until
from tests.e2e.test_forward import RECEIVER_SECRET

pytestmark = pytest.mark.e2e


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class OTLPReceiver:
    """``POST /v1/traces`` (OTLP/HTTP, protobuf, gzip or not): keeps every span it decodes, as a
    dict, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers["Content-Type"] != (
                    "application/x-protobuf"
                ):
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "resource": resource,
                            }
                        )

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]


@pytest.fixture
def otlp() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def test_serve_exports_one_trace_from_request_to_forwarded_attempt(
    serve_factory: type[Serve], tmp_path: Path, httpserver: HTTPServer, otlp: OTLPReceiver
) -> None:
    """The request's trace reaches the handler's worker process through the outbox."""
    forwarded: list[dict[str, str]] = []

    def receiver(request: Request) -> Response:
        forwarded.append(dict(request.headers))
        return Response(status=204)

    httpserver.expect_request("/in", method="POST").respond_with_handler(receiver)
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": "http",
            "LACUNA_HTTP_URL": httpserver.url_for("/in"),
            "LACUNA_HTTP_SECRET": RECEIVER_SECRET,
            "LACUNA_POLL_INTERVAL": "0.1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_SERVICE_NAME": "lacuna-e2e",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    ).start()

    body, headers = signed(make_event("evt_e2e_traced"))
    response = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    wait_until(lambda: forwarded, what="the forwarded request")
    wait_until(
        lambda: otlp.named("handler http") and otlp.named("store.accept"),
        what="the attempt's and the commit's spans at the OTLP receiver",
    )

    (request,) = [
        s for s in otlp.named("POST /webhooks/lacuna") if s["attributes"].get("lacuna.event.id")
    ]
    (commit,) = otlp.named("store.accept")
    (attempt,) = otlp.named("handler http")
    assert request["attributes"]["lacuna.event.type"] == "job.completed"
    assert request["attributes"]["http.response.status_code"] == 200
    assert request["parent_span_id"] == ""
    assert commit["trace_id"] == request["trace_id"]
    assert commit["parent_span_id"] == request["span_id"]
    assert attempt["trace_id"] == request["trace_id"]
    assert attempt["parent_span_id"] == request["span_id"]
    assert attempt["attributes"]["lacuna.attempt.ending"] == "ok"
    assert attempt["attributes"]["lacuna.event.id"] == "evt_e2e_traced"
    for span in (request, commit, attempt):
        assert span["resource"]["service.name"] == "lacuna-e2e"

    traceparent = forwarded[0]["Traceparent"]
    version, trace_id, parent_id, _flags = traceparent.split("-")
    assert (version, trace_id, parent_id) == ("00", request["trace_id"], attempt["span_id"])


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        # The SDK raised ValueError at start: a traceback, exit code 1.
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-1", "OTEL_BSP_MAX_QUEUE_SIZE must be a whole number"),
        # The SDK logged a traceback, took its default and served on.
        ("OTEL_BSP_SCHEDULE_DELAY", "abc", "OTEL_BSP_SCHEDULE_DELAY must be a whole number"),
    ],
)
def test_a_malformed_otel_setting_stops_serve_with_one_line(
    tmp_path: Path, name: str, value: str, says: str
) -> None:
    serve = Serve(
        tmp_path,
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            name: value,
        },
    )
    proc = subprocess.Popen(
        [CLI, "serve"], cwd=tmp_path, env=serve.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # it started: let it drain and stop its children
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"serve started with {name}={value}:\n{err.decode(errors='replace')[-2000:]}")
    text = (out + err).decode(errors="replace")
    assert proc.returncode == 2, (proc.returncode, text[-2000:])
    assert "Traceback" not in text
    assert text.count("\n") == 1, text[-2000:]
    assert text.startswith("lacuna-webhooks: error: configuration: "), text
    assert says in text
    assert not (tmp_path / "events.db").exists()  # stopped before the store was opened
