"""deploy/prometheus: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``, deploy/prometheus/alerts.test.yaml: each alert firing on its series
and quiet on the others). promtool comes with Debian's ``prometheus`` package (.ci/run installs
it); when missing these tests skip, except under ``CI=true``, where they fail.

That every metric the rules and the Grafana dashboard query is really exported is checked
against a running ``serve`` in tests/e2e/test_observability.py; the PromQL reader it uses
(tests/promql.py) is tested here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI
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
