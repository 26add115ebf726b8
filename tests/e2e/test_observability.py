"""The metrics the alert rules and the Grafana dashboard query are the ones a real ``serve``
exports (deploy/prometheus/alerts.yaml, deploy/grafana/lacuna-webhooks.json).

A ``serve`` with the ``http`` handler receives a few events (accepted, duplicate, forged; one
forwarded, one refused for good by the receiver and so dead); then every metric name in every
PromQL expression must be in its ``/metrics``, with every label the expression matches or
groups on, and every exact ``label="value"`` matcher must select a series.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from lacuna_webhooks.metrics import Metrics
from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, wait_until
from tests.promql import reads

pytestmark = pytest.mark.e2e
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RECEIVER_SECRET = "whsec_" + base64.b64encode(b"e2e-observability-secret-0123456").decode()
#: Labels Prometheus adds to every series it scrapes (the target's), not the service.
TARGET_LABELS = {"job", "instance"}
#: Series of Prometheus itself, not of the service.
PROMETHEUS_OWN = {"up"}


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert rule and every dashboard query."""
    found = []
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text("utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            found.append((f"alert {rule['alert']}", rule["expr"]))
    dashboard = json.loads((DEPLOY / "grafana" / "lacuna-webhooks.json").read_text("utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            inner = re.fullmatch(r"label_values\((.*), *\w+\)", query["query"])
            assert inner is not None, query
            found.append((f"variable {variable['name']}", inner.group(1)))
    return found


def exported(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets of its samples; a metric with no sample yet (a labelled
    counter never incremented) is there by its sample names with no label sets."""
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        for suffix in suffixes:
            series.setdefault(family.name + suffix, [])
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


def declared(sample_name: str) -> tuple[str, ...]:
    """The label names ``Metrics`` declares for the metric of a sample name."""
    registry = Metrics().registry
    for collector, names in registry._collector_to_names.items():  # private: no public list
        if sample_name in names:
            return tuple(getattr(collector, "_labelnames", ()))
    raise AssertionError(f"{sample_name} is not a metric of Metrics")


def test_dashboard_and_alerts_query_only_exported_metrics(
    serve_factory: type[Serve], tmp_path: Path, httpserver: HTTPServer
) -> None:
    """Every metric name, label and exact label value the rules and panels use is exported."""

    def receiver(request: Request) -> Response:
        body = request.get_data()
        if b"evt_obs_gone" in body:
            return Response("gone", status=410)  # pauses the handler (docs/flow-control.md)
        if b"evt_obs_refused" in body:
            return Response("no such customer", status=400)
        return Response(status=204)

    httpserver.expect_request("/in", method="POST").respond_with_handler(receiver)
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": "http",
            "LACUNA_HTTP_URL": httpserver.url_for("/in"),
            "LACUNA_HTTP_SECRET": RECEIVER_SECRET,
            "LACUNA_POLL_INTERVAL": "0.1",
        }
    ).start()
    for event_id in ("evt_obs_ok", "evt_obs_ok", "evt_obs_refused"):
        body, headers = signed(make_event(event_id))
        assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    body, headers = signed(make_event("evt_obs_forged"), secret="whsec_" + "A" * 40)
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 401

    def scrape() -> str:
        return httpx.get(f"{serve.base_url}/metrics", timeout=5).text

    wait_until(
        lambda: 'outcome="dead"' in scrape() and 'outcome="ok"' in scrape(),
        what="one delivery done and one dead",
    )
    body, headers = signed(make_event("evt_obs_gone"))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(
        lambda: re.search(r'handler_paused\{handler="http"\} 1\.0', scrape()) is not None,
        what="the handler paused by a 410",
    )
    series = exported(scrape())
    assert series["lacuna_webhooks_ready"] == [{}]
    assert {"handler": "http", "state": "dead"} in series["lacuna_webhooks_handler_queue_depth"]

    problems: list[str] = []
    checked: set[str] = set()
    for where, expr in expressions():
        found = reads(expr)
        names = found.metrics - PROMETHEUS_OWN
        if not names:
            continue
        missing = names - series.keys()
        problems += [f"{where}: {name} is not exported" for name in sorted(missing)]
        present = names & series.keys()
        checked |= present
        label_sets: list[dict[str, Any]] = [s for name in present for s in series[name]]
        known = {label for labels in label_sets for label in labels}
        # A labelled counter with no sample yet (no worker restarted in this test): its
        # labels as the code declares them.
        known |= {label for name in present if not series[name] for label in declared(name)}
        for label in sorted(found.labels - TARGET_LABELS - known):
            problems.append(f"{where}: no series of {sorted(present)} has the label {label!r}")
        for name, pairs in found.equal.items():
            for label, value in sorted(pairs):
                if label in TARGET_LABELS or name in PROMETHEUS_OWN:
                    continue
                if not any(s.get(label) == value for s in series.get(name, [])):
                    problems.append(f"{where}: no series {name}{{{label}={value!r}}}")
    assert not problems, "\n".join(problems)
    # The check saw the metrics it is about (an empty walk would pass).
    assert {
        "lacuna_webhooks_received_total",
        "lacuna_webhooks_deliveries_total",
        "lacuna_webhooks_handler_queue_depth",
        "lacuna_webhooks_handler_paused",
        "lacuna_webhooks_request_duration_seconds_bucket",
        "lacuna_webhooks_http_refused_total",
    } <= checked
