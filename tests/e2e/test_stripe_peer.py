"""The wire signature against Stripe's own library, a peer we did not write.

``x-lacuna-signature`` is Stripe's scheme (SPEC §1: ``t=…,v1=…``, HMAC-SHA256 keyed with the
secret's UTF-8 bytes, prefix included, over ``t.body``). A team that already verifies Stripe
webhooks may check Lacuna's with the same code, and a sender built on Stripe's helpers must
get through: so what we sign (``send``) verifies with ``stripe.WebhookSignature``, and what it
signs is accepted by a real ``serve``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest
import stripe
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import TEST_SECRET, make_event
from tests.e2e.conftest import CLI, Serve

pytestmark = pytest.mark.e2e

# SPEC §1's test vector.
VECTOR_BODY = (
    b'{"id":"evt_1QmZ8xLacuna0001","object":"event","type":"job.completed","created":1763731200,'
    b'"data":{"id":"cm123abc","object":"music.generation","status":"ready","title":"Late Night '
    b'Study","style":"lofi hip hop, mellow piano, 70 bpm","instrumental":true,"tracks":[{"id":'
    b'"trk_01","audio_url":"https://cdn.lacuna.example/tracks/trk_01.mp3","duration":182.4,'
    b'"lyrics":null}]}}'
)
ROTATED = "whsec_test_rotated_new_secret_value_0002"
VECTOR_HEADER = (
    "t=1763731200,v1=de158926210b7c7a3339e173f931c47984bed311ad010915ccfb4190788ab0eb,"
    "v1=a54d57021f6c1ffde61a69e89997ed78e80cd3f9e9f0d77bd641be8e6338a217"
)


def stripe_header(body: bytes, secret: str, timestamp: int) -> str:
    """The header a sender built on Stripe's library writes (its own HMAC)."""
    payload = f"{timestamp}.{body.decode()}"
    return f"t={timestamp},v1={stripe.WebhookSignature._compute_signature(payload, secret)}"


def test_stripe_verifies_the_spec_test_vector_with_either_secret() -> None:
    assert len(VECTOR_BODY) == 369
    for secret in (TEST_SECRET, ROTATED):
        assert stripe.WebhookSignature.verify_header(VECTOR_BODY, VECTOR_HEADER, secret)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(VECTOR_BODY, VECTOR_HEADER, "whsec_other")


def test_what_send_signs_verifies_with_stripes_library(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    """`lacuna-webhooks send` to a real HTTP server, with the second of two configured
    secrets: Stripe's verifier accepts what it received with that secret, inside its
    tolerance, and with no other."""
    received: list[tuple[bytes, str]] = []

    def record(request: Request) -> Response:
        received.append((request.get_data(), request.headers["x-lacuna-signature"]))
        return Response('{"received":true}', content_type="application/json")

    httpserver.expect_request("/webhooks/lacuna", method="POST").respond_with_handler(record)
    result = subprocess.run(
        [
            *(CLI, "send", "--url", httpserver.url_for("/webhooks/lacuna")),
            *("--count", "3", "--secret-index", "2"),
        ],
        env={"PATH": "/usr/bin:/bin", "LACUNA_WEBHOOK_SECRET": f"{ROTATED},{TEST_SECRET}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(received) == 3
    for body, header in received:
        assert stripe.WebhookSignature.verify_header(body, header, TEST_SECRET, tolerance=300)
        for other in (ROTATED, "whsec_not_ours"):
            with pytest.raises(stripe.SignatureVerificationError):
                stripe.WebhookSignature.verify_header(body, header, other, tolerance=300)


def test_a_request_signed_by_stripes_library_is_accepted_and_its_forgeries_refused(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A real `serve` takes what Stripe's helpers sign (200, stored once), and refuses what
    Stripe's verifier also refuses: another secret, an old timestamp (401 in the envelope)."""
    serve = serve_factory({"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}).start()
    body = orjson.dumps(make_event("evt_signed_by_stripe"))
    now = int(time.time())
    cases = [
        (stripe_header(body, TEST_SECRET, now), 200),
        (stripe_header(body, "whsec_someone_else_entirely_0000", now), 401),
        (stripe_header(body, TEST_SECRET, now - 3600), 401),
    ]
    with httpx.Client(timeout=10) as client:
        for header, status in cases:
            try:
                stripe.WebhookSignature.verify_header(body, header, TEST_SECRET, tolerance=300)
                stripe_says = 200
            except stripe.SignatureVerificationError:
                stripe_says = 401
            assert stripe_says == status, header
            response = client.post(
                serve.webhook_url,
                content=body,
                headers={"content-type": "application/json", "x-lacuna-signature": header},
            )
            assert response.status_code == status, response.text
            if status == 200:
                assert response.json() == {
                    "received": True,
                    "id": "evt_signed_by_stripe",
                    "duplicate": False,
                }
            else:
                assert response.json()["error"]["type"] == "authentication_error"
