"""A real `serve` with storage (S3), Slack and email enabled, against real servers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, wait_until
from tests.integration.servers import (  # noqa: F401 - fixtures
    S3Server,
    SMTPServer,
    TLSAuthority,
    moto_endpoint_fixture,
    moto_s3_fixture,
    smtp_starttls_fixture,
    tls_ca_fixture,
)

pytestmark = pytest.mark.e2e
AUDIO = bytes(range(256)) * 4096  # 1 MiB of "audio"


def test_completed_and_failed_events_reach_storage_slack_and_email(
    serve_factory: type[Serve],
    tmp_path: Path,
    httpserver: HTTPServer,
    moto_s3: S3Server,
    smtp_starttls: SMTPServer,
    tls_ca: TLSAuthority,
) -> None:
    """job.completed: audio stored in S3, a Slack message, a mail; job.failed: Slack and mail."""
    httpserver.expect_request("/tracks/trk_01.mp3").respond_with_data(
        AUDIO, content_type="audio/mpeg"
    )
    httpserver.expect_request("/slack/T000/B000/XXXX", method="POST").respond_with_data("ok")
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": "storage,slack,email",
            "LACUNA_ALLOW_PRIVATE_URLS": "true",  # the test servers live on 127.0.0.1
            **moto_s3.env("lacuna"),
            "LACUNA_SLACK_WEBHOOK_URL": httpserver.url_for("/slack/T000/B000/XXXX"),
            "LACUNA_EMAIL_SMTP_URL": smtp_starttls.url(),
            "LACUNA_EMAIL_CA_FILE": str(tls_ca.ca_file),
            "LACUNA_EMAIL_FROM": "Lacuna <lacuna@example.com>",
            "LACUNA_EMAIL_TO": "team@example.com, ops@example.com",
        }
    ).start()

    completed = make_event("evt_e2e_done", task_id="cm_e2e_1")
    completed["data"]["tracks"][0]["audio_url"] = httpserver.url_for("/tracks/trk_01.mp3")
    failed = make_event("evt_e2e_fail", "job.failed", task_id="cm_e2e_2")
    for payload in (completed, failed):
        body, headers = signed(payload)
        response = httpx.post(serve.webhook_url, content=body, headers=headers)
        assert response.status_code == 200, response.text

    # storage: the audio bytes and event.json under {task_id}/ in the bucket
    wait_until(
        lambda: (
            "lacuna/cm_e2e_1/event.json" in moto_s3.keys("lacuna/")
            and json.loads(moto_s3.read("lacuna/cm_e2e_1/event.json")).get("complete") is True
        ),
        what="stored audio",
    )
    assert moto_s3.read("lacuna/cm_e2e_1/trk_01.mp3") == AUDIO
    manifest = json.loads(moto_s3.read("lacuna/cm_e2e_1/event.json"))
    assert manifest["event"]["id"] == "evt_e2e_done"
    assert manifest["tracks"][0]["sha256"] == hashlib.sha256(AUDIO).hexdigest()
    assert manifest["tracks"][0]["size"] == len(AUDIO)
    assert not any("cm_e2e_2" in key for key in moto_s3.keys(""))  # failed jobs store nothing

    # slack: one Block Kit message per event
    def slack_posts() -> list[dict[str, object]]:
        return [
            json.loads(req.get_data())
            for req, _ in httpserver.log
            if req.path.startswith("/slack/")
        ]

    wait_until(lambda: len(slack_posts()) == 2, what="two Slack messages")
    texts = [json.dumps(post) for post in slack_posts()]
    assert any("Late Night Study" in t and "3:02" in t for t in texts), texts
    assert any("provider_error" in t for t in texts), texts
    assert all("blocks" in post for post in slack_posts())

    # email: one mail per event, to both recipients, with a recognisable Message-ID
    wait_until(lambda: len(smtp_starttls.inbox.messages) == 2, what="two mails")
    subjects = sorted(str(m["Subject"]) for m in smtp_starttls.inbox.messages)
    assert subjects == ["Late Night Study failed: provider_error", "Late Night Study is ready"]
    ids = {str(m["Message-ID"]) for m in smtp_starttls.inbox.messages}
    assert any("evt_e2e_done" in i for i in ids)
    assert all(
        rcpts == ["team@example.com", "ops@example.com"]
        for _, rcpts in smtp_starttls.inbox.envelopes
    )

    # and the store says every delivery is done
    listed = httpx.get(f"{serve.base_url}/metrics").text
    assert 'lacuna_webhooks_deliveries_total{handler="storage",outcome="ok"} 1.0' in listed
    assert 'lacuna_webhooks_deliveries_total{handler="slack",outcome="ok"} 2.0' in listed
    assert 'lacuna_webhooks_deliveries_total{handler="email",outcome="ok"} 2.0' in listed
