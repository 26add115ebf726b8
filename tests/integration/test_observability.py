"""deploy/prometheus: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``, deploy/prometheus/alerts.test.yaml: each alert firing on its series
and quiet on the others). promtool comes with Debian's ``prometheus`` package (.ci/run installs
it); when missing these tests skip, except under ``CI=true``, where they fail.

That every metric the rules and the Grafana dashboard query is really exported is checked
against a running ``serve`` in tests/e2e/test_observability.py; the PromQL reader it uses
(tests/promql.py) is tested here, and so is the scrape's per-handler queue and readiness.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from lacuna_webhooks.app import create_app
from lacuna_webhooks.config import Settings
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import IN_CI, TEST_SECRET, make_event, signed
from tests.promql import reads

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found on PATH (Debian package `prometheus`)"
        if IN_CI:
            pytest.fail(message + " (CI=true: the alert rule checks fail instead of skipping)")
        pytest.skip(message)
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )


def test_alert_rules_pass_promtool_check() -> None:
    """Every rule parses and its PromQL is valid, as Prometheus would load it."""
    result = run("check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    """Each alert fires on the series of its test and not on the others (alerts.test.yaml)."""
    result = run("test", "rules", "alerts.test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule changed under its tests makes ``promtool test rules`` fail (the check above
    cannot pass vacuously)."""
    rules = (PROMETHEUS / "alerts.yaml").read_text(encoding="utf-8")
    (tmp_path / "alerts.yaml").write_text(
        rules.replace("lacuna_webhooks_ready == 0", "lacuna_webhooks_ready == 2"), "utf-8"
    )
    shutil.copy(PROMETHEUS / "alerts.test.yaml", tmp_path)
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "LacunaWebhooksNotReady" in result.stdout + result.stderr


def test_promql_reader() -> None:
    """Names, labels and exact matchers, whatever the strings and ranges hold."""
    found = reads(
        'sum by (handler) (rate(m_total{outcome="dead", job=~"$job"}[5m]))'
        ' / on (handler) max(n{q="}{,[1m]"}) > 0 unless other == bool 1'
    )
    assert found.metrics == {"m_total", "n", "other"}
    assert found.labels == {"handler", "outcome", "job", "q"}
    assert found.equal == {"m_total": {("outcome", "dead")}, "n": {("q", "}{,[1m]")}}
    assert reads("histogram_quantile(0.95, sum by (le) (rate(h_bucket[$__rate_interval])))")
    with pytest.raises(ValueError, match="cannot read"):
        reads('m{label~"x"}')


async def test_scrape_exports_queue_per_handler_and_readiness() -> None:
    """Every configured handler has its queue series (0 when idle); ``ready`` is 1 while the
    store answers and 0 when its writes fail (as ``/readyz``), the queue gauges then keeping
    their last values."""
    store = MemoryStore()
    await store.open()
    settings = Settings.from_env(
        {"LACUNA_WEBHOOK_SECRET": TEST_SECRET, "LACUNA_DATABASE_URL": "sqlite:///unused.db"}
    )
    idle = RecordingHandler("idle", events=frozenset({"job.failed"}))  # gets none of them
    handlers = HandlerSet.of([RecordingHandler("busy"), idle])
    app = create_app(settings, store=store, handlers=handlers, dispatch=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for i in range(3):
            body, headers = signed(make_event(f"evt_scrape_{i}"))
            assert (await client.post("/webhooks/lacuna", content=body, headers=headers)).is_success
        text = (await client.get("/metrics")).text
        assert "lacuna_webhooks_ready 1.0" in text
        assert 'lacuna_webhooks_handler_queue_depth{handler="busy",state="due"} 3.0' in text
        assert 'lacuna_webhooks_handler_queue_depth{handler="idle",state="due"} 0.0' in text
        assert 'lacuna_webhooks_handler_queue_depth{handler="busy",state="dead"} 0.0' in text
        assert 'lacuna_webhooks_queue_depth{state="due"} 3.0' in text

        store.failing_commits = True
        text = (await client.get("/metrics")).text
        assert "lacuna_webhooks_ready 0.0" in text
        assert 'lacuna_webhooks_handler_queue_depth{handler="busy",state="due"} 3.0' in text
        store.failing_commits = False
        assert "lacuna_webhooks_ready 1.0" in (await client.get("/metrics")).text
    await store.close()
