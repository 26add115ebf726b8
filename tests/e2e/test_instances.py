"""A real `serve` running two instances of one handler kind side by side (SPEC §6)."""

from __future__ import annotations

import base64
import hashlib
import re
import signal
import time
from pathlib import Path
from urllib.request import url2pathname

import httpx
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

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


AUDIO = bytes(range(256)) * 64
FORWARD_SECRET = "whsec_" + base64.b64encode(b"e2e-after-forward-secret-012345").decode()


class AudioHost:
    """The audio host: 503 while ``available`` is False, then the bytes."""

    def __init__(self) -> None:
        self.available = True
        self.requests = 0

    def __call__(self, request: Request) -> Response:
        self.requests += 1
        if not self.available:
            return Response("down", status=503)
        return Response(AUDIO, content_type="audio/mpeg")


def _after_env(tmp_path: Path, httpserver: HTTPServer) -> dict[str, str]:
    return {
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        "LACUNA_HANDLERS": "storage,app=http",
        "LACUNA_ALLOW_PRIVATE_URLS": "true",  # the audio host lives on 127.0.0.1
        "LACUNA_STORAGE_URL": (tmp_path / "audio").as_uri(),
        "LACUNA_STORAGE_RETRY_BASE_DELAY": "0.3",
        "LACUNA_STORAGE_RETRY_MAX_DELAY": "0.3",
        "LACUNA_STORAGE_RETRY_MAX_ATTEMPTS": "1000",
        "LACUNA_STORAGE_TIMEOUT": "5",
        "LACUNA_APP_URL": httpserver.url_for("/app"),
        "LACUNA_APP_SECRET": FORWARD_SECRET,
        "LACUNA_APP_PAYLOAD": "enriched",
        "LACUNA_APP_AFTER": "storage",
        "LACUNA_POLL_INTERVAL": "0.1",
    }


def _completed(httpserver: HTTPServer, n: int) -> dict[str, object]:
    payload = make_event(f"evt_after_{n}", task_id=f"cm_after_{n}")
    payload["data"]["tracks"][0]["audio_url"] = httpserver.url_for(f"/audio/{n}.mp3")
    return payload


def test_an_enriched_forward_after_storage_names_the_stored_files(
    serve_factory: type[Serve], tmp_path: Path, httpserver: HTTPServer
) -> None:
    """``app`` AFTER ``storage``: the forward arrives only once the audio is stored (the file
    exists when the receiver gets it) and its ``results.storage`` names the stored files,
    verifiably signed (standardwebhooks)."""
    audio = AudioHost()
    httpserver.expect_request(re.compile(r"/audio/.*")).respond_with_handler(audio)
    receiver = Receiver(FORWARD_SECRET, [])
    seen_files: list[bool] = []

    def on_forward(request: Request) -> Response:
        results = orjson.loads(request.get_data())["results"]
        stored = results.get("storage") or {"tracks": [{"url": "file:///nonexistent"}]}
        seen_files.append(Path(url2pathname(stored["tracks"][0]["url"][7:])).exists())
        return receiver(request)

    httpserver.expect_request("/app", method="POST").respond_with_handler(on_forward)
    serve = serve_factory(_after_env(tmp_path, httpserver)).start()
    body, headers = signed(_completed(httpserver, 1))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200

    wait_until(lambda: len(receiver.requests) >= 1, what="the enriched forward")
    (request,) = receiver.requests
    assert request["verified"]
    doc = orjson.loads(request["body"])
    assert doc["event"]["id"] == "evt_after_1"
    folder = tmp_path / "audio" / "cm_after_1"
    track = folder / "trk_01.mp3"
    assert doc["results"] == {
        "storage": {
            "location": folder.as_uri() + "/",
            "tracks": [
                {
                    "id": "trk_01",
                    "url": track.as_uri(),
                    "size": len(AUDIO),
                    "sha256": hashlib.sha256(AUDIO).hexdigest(),
                    "content_type": "audio/mpeg",
                }
            ],
        }
    }
    assert seen_files == [True]
    assert track.read_bytes() == AUDIO


def test_a_sigkill_while_deliveries_are_held_behind_after_loses_nothing(
    serve_factory: type[Serve], tmp_path: Path, httpserver: HTTPServer
) -> None:
    """Five events whose storage keeps failing (the audio host answers 503) hold their
    forwards; serve is SIGKILLed, the host recovers, serve restarts on the same database:
    every event is forwarded exactly once per id, after its audio was stored."""
    audio = AudioHost()
    audio.available = False
    httpserver.expect_request(re.compile(r"/audio/.*")).respond_with_handler(audio)
    receiver = Receiver(FORWARD_SECRET, [])
    httpserver.expect_request("/app", method="POST").respond_with_handler(receiver)
    serve = serve_factory(_after_env(tmp_path, httpserver)).start()
    for n in range(5):
        body, headers = signed(_completed(httpserver, n))
        assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(lambda: audio.requests >= 10, what="storage attempts failing")
    assert receiver.requests == []  # every forward is held behind storage
    serve.signal(signal.SIGKILL)
    assert serve.wait() == -signal.SIGKILL

    audio.available = True
    serve.start()
    # A storage attempt in flight at the kill keeps its claim until its lease ends (the
    # timeout, 5 s here, plus 30 s): the wait allows for it (it timed out under load).
    wait_until(
        lambda: len({r["headers"]["Webhook-Id"] for r in receiver.requests}) == 5,
        timeout=90,
        what="all five forwards after the restart",
    )
    time.sleep(0.5)
    ids = sorted(r["headers"]["Webhook-Id"] for r in receiver.requests)
    assert ids == [f"evt_after_{n}" for n in range(5)]
    for request in receiver.requests:
        assert request["verified"]
        stored = orjson.loads(request["body"])["results"]["storage"]
        assert stored is not None
        assert Path(url2pathname(stored["tracks"][0]["url"][7:])).read_bytes() == AUDIO
