"""A real `serve` running two instances of one handler kind side by side (SPEC §6)."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, wait_until
from tests.e2e.test_forward import Receiver

pytestmark = pytest.mark.e2e
APP_SECRET = "whsec_" + base64.b64encode(b"e2e-app-instance-secret-0123456").decode()
ANALYTICS_SECRET = "whsec_" + base64.b64encode(b"e2e-analytics-instance-secret-9").decode()


def test_two_http_instances_each_with_its_own_url_secret_and_retry_schedule(
    serve_factory: type[Serve], tmp_path: Path, httpserver: HTTPServer
) -> None:
    """``app=http,analytics=http``: each instance posts to its own URL, signed with its own
    secret (the receivers verify with standardwebhooks, so a swapped secret would fail), and
    keeps deliveries of its own: ``analytics`` refused once is retried on its own schedule
    (LACUNA_ANALYTICS_RETRY_BASE_DELAY) while ``app`` is done at once."""
    app = Receiver(APP_SECRET, [])
    analytics = Receiver(ANALYTICS_SECRET, [Response("busy", status=503)])
    httpserver.expect_request("/app", method="POST").respond_with_handler(app)
    httpserver.expect_request("/analytics", method="POST").respond_with_handler(analytics)
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": "app=http,analytics=http",
            "LACUNA_APP_URL": httpserver.url_for("/app"),
            "LACUNA_APP_SECRET": APP_SECRET,
            "LACUNA_ANALYTICS_URL": httpserver.url_for("/analytics"),
            "LACUNA_ANALYTICS_SECRET": ANALYTICS_SECRET,
            "LACUNA_ANALYTICS_PAYLOAD": "enriched",
            "LACUNA_ANALYTICS_RETRY_BASE_DELAY": "0.5",
            "LACUNA_ANALYTICS_RETRY_MAX_DELAY": "0.5",
            "LACUNA_ANALYTICS_CONCURRENCY": "1",
            "LACUNA_RETRY_BASE_DELAY": "60",
            "LACUNA_POLL_INTERVAL": "0.1",
        }
    ).start()

    body, headers = signed(make_event("evt_e2e_instances"))
    response = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text

    wait_until(lambda: len(app.requests) >= 1 and len(analytics.requests) >= 2, what="both")
    assert all(r["verified"] for r in app.requests + analytics.requests)
    assert app.requests[0]["body"] == body  # `event` payload: the bytes as Lacuna sent them
    assert analytics.requests[0]["body"].startswith(b'{"event":')  # its own `enriched` setting
    assert [r["headers"]["Lacuna-Attempt"] for r in analytics.requests[:2]] == ["1", "2"]
    # The global base delay is 60 s: only the instance's own 0.5 s lets attempt 2 come now.
    assert analytics.requests[1]["at"] - analytics.requests[0]["at"] >= 0.4

    def done(metrics: str, handler: str) -> bool:
        pattern = rf'deliveries_total\{{handler="{handler}",outcome="ok"\}} 1\.0'
        return re.search(pattern, metrics) is not None

    wait_until(
        lambda: all(
            done(httpx.get(f"{serve.base_url}/metrics", timeout=5).text, h)
            for h in ("app", "analytics")
        ),
        what="one delivery done per instance",
    )
    time.sleep(0.3)
    assert (len(app.requests), len(analytics.requests)) == (1, 2)
    log = serve.log()
    assert '"handler":"app"' in log
    assert '"handler":"analytics"' in log
