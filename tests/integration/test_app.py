"""The webhook route and the service endpoints (SPEC §3), on a real SQLite file.

One test per status and error code; checks run in the SPEC's order and no
unauthenticated byte is parsed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from lacuna_webhooks.app import create_app
from lacuna_webhooks.config import Settings
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.signature import sign
from lacuna_webhooks.store import Store, open_store

from ..conftest import TEST_SECRET, make_event, signed

URL = "/webhooks/lacuna"


def settings_for(db: Path, **env: str) -> Settings:
    return Settings.from_env(
        {"LACUNA_WEBHOOK_SECRET": TEST_SECRET, "LACUNA_DATABASE_URL": f"sqlite:///{db}", **env}
    )


@pytest.fixture
def recorder() -> RecordingHandler:
    return RecordingHandler("recorder")


@pytest.fixture
def client(tmp_path: Path, recorder: RecordingHandler) -> Iterator[TestClient]:
    app = create_app(
        settings_for(tmp_path / "events.db", LACUNA_MAX_BODY_BYTES="4096"),
        handlers=HandlerSet.of([recorder]),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def wait_for_call(handler: RecordingHandler, timeout: float = 10.0) -> None:
    """Block until the dispatcher (running in the TestClient's loop) has called ``handler``."""
    deadline = time.monotonic() + timeout
    while not handler.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.calls, "the handler was never called"


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message", "param"}
    return body["error"]  # type: ignore[no-any-return]


def post(client: TestClient, payload: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
    body, headers = signed(payload, **kw)
    return client.post(URL, content=body, headers=headers)


def test_accepts_a_signed_event_and_dispatches_it(
    client: TestClient, recorder: RecordingHandler
) -> None:
    """200 with the documented body; the stored event reaches the subscribed handler."""
    event = make_event("evt_ok_1")
    response = post(client, event)
    assert response.status_code == 200
    assert response.json() == {"received": True, "id": "evt_ok_1", "duplicate": False}
    wait_for_call(recorder)
    assert [e.id for e in recorder.calls] == ["evt_ok_1"]
    assert recorder.calls[0].payload == event


def test_duplicate_is_200_and_not_dispatched_again(
    client: TestClient, recorder: RecordingHandler
) -> None:
    event = make_event("evt_dup_1")
    assert post(client, event).json()["duplicate"] is False
    second = post(client, event)
    assert second.status_code == 200
    assert second.json() == {"received": True, "id": "evt_dup_1", "duplicate": True}
    wait_for_call(recorder)
    time.sleep(0.2)
    assert [e.id for e in recorder.calls] == ["evt_dup_1"]


def test_content_length_over_limit_is_413_before_reading(client: TestClient) -> None:
    body = b"x" * 5000
    response = client.post(URL, content=body, headers={"x-lacuna-signature": sign(body, "k")})
    assert response.status_code == 413
    assert error_of(response) == {
        "type": "invalid_request_error",
        "code": "payload_too_large",
        "message": "The request body is larger than 4096 bytes.",
        "param": None,
    }


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    """Without Content-Length the limit is enforced while reading the stream."""

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"y" * 1000

    response = client.post(URL, content=chunks(), headers={"x-lacuna-signature": "t=1,v1=00"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


def test_size_is_checked_before_signature(client: TestClient) -> None:
    response = client.post(URL, content=b"z" * 5000)
    assert response.status_code == 413


def test_missing_signature_is_401(client: TestClient) -> None:
    response = client.post(URL, content=orjson.dumps(make_event()))
    assert response.status_code == 401
    assert error_of(response)["code"] == "missing_signature"
    assert error_of(response)["type"] == "authentication_error"


@pytest.mark.parametrize("header", ["garbage", "t=abc,v1=00", "t=1", "v1=" + "0" * 64])
def test_malformed_signature_header_is_401(client: TestClient, header: str) -> None:
    response = client.post(URL, content=b"{}", headers={"x-lacuna-signature": header})
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_signature_header"


# A margin of 60 s beyond the 300 s tolerance: a loaded machine may take seconds between
# signing and checking (the exact boundary is the verifier's unit tests', on a fixed clock).
def test_old_timestamp_is_401(client: TestClient) -> None:
    response = post(client, make_event(), t=int(time.time()) - 360)
    assert response.status_code == 401
    assert error_of(response)["code"] == "timestamp_out_of_tolerance"


def test_future_timestamp_is_401(client: TestClient) -> None:
    response = post(client, make_event(), t=int(time.time()) + 360)
    assert response.status_code == 401
    assert error_of(response)["code"] == "timestamp_out_of_tolerance"


def test_wrong_secret_is_401(client: TestClient) -> None:
    response = post(client, make_event(), secret="whsec_forged")
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_signature"


def test_forged_body_is_never_parsed(client: TestClient) -> None:
    """Bad JSON with a bad signature is a 401, not a 400: unauthenticated bytes are not parsed."""
    response = client.post(
        URL, content=b"{not json", headers={"x-lacuna-signature": sign(b"other", TEST_SECRET)}
    )
    assert error_of(response)["code"] == "invalid_signature"


def test_several_header_lines_are_one_list(client: TestClient) -> None:
    """A proxy may split the header: t on one line, v1 on another."""
    body = orjson.dumps(make_event("evt_split"))
    t, v1 = sign(body, TEST_SECRET).split(",")
    response = client.post(
        URL, content=body, headers=[("x-lacuna-signature", t), ("x-lacuna-signature", v1)]
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"",
        b"\xff\xfe\x00{}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": "evt_1", "type": "job.completed"',
    ],
    ids=["text", "array", "string", "empty", "non-utf8", "deeply-nested", "truncated"],
)
def test_invalid_json_is_400(client: TestClient, body: bytes) -> None:
    if len(body) > 4096:
        # Over this app's limit; the nested case is checked against a larger one below.
        return
    response = post(client, body)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"
    assert error_of(response)["type"] == "invalid_request_error"


def test_deeply_nested_json_is_400_not_500(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path / "n.db"))
    with TestClient(app, raise_server_exceptions=False) as c:
        depth = 200_000
        response = post(c, b"[" * depth + b"]" * depth)
        assert response.status_code == 400
        assert error_of(response)["code"] == "invalid_json"
        nested_object = b'{"id":"evt_n","type":"x","data":' + b'{"a":' * 5000 + b"1" + b"}" * 5001
        assert post(c, nested_object).status_code == 400


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"type": "job.completed"}, "id"),
        ({"id": 5, "type": "job.completed"}, "id"),
        ({"id": "", "type": "job.completed"}, "id"),
        ({"id": "x" * 300, "type": "job.completed"}, "id"),
        ({"id": "evt_1"}, "type"),
        ({"id": "evt_1", "type": ["job.completed"]}, "type"),
        ({"id": "evt_1", "type": None}, "type"),
        # values no backend can store (issue 9): refused, never a 503 retried forever
        ({"id": "evt_big", "type": "job.completed", "created": 2**63, "data": {}}, "created"),
        ({"id": "evt_\x00", "type": "job.completed"}, "id"),
        ({"id": "evt_1", "type": "job.completed", "data": {"id": "cm\x00"}}, "data.id"),
        # ids are keys: a padded one would be a second event, task or file beside the real one
        ({"id": "evt_1\n", "type": "job.completed"}, "id"),
        ({"id": " evt_1", "type": "job.completed"}, "id"),
        ({"id": "evt_\x851", "type": "job.completed"}, "id"),
        ({"id": "evt_1", "type": "job.completed", "data": {"id": "cm42\n"}}, "data.id"),
        ({"id": "evt_1", "type": "job.completed", "data": {"id": "\tcm42"}}, "data.id"),
        ({"id": "evt_1", "type": "job.completed", "data": {"id": "cm\x1b[2J"}}, "data.id"),
        (
            {
                "id": "evt_1",
                "type": "job.completed",
                "data": {"tracks": [{"id": "t1"}, {"id": "t2 "}]},
            },
            "data.tracks[1].id",
        ),
        (
            {"id": "evt_1", "type": "job.completed", "data": {"tracks": [{"id": "t\u00851"}]}},
            "data.tracks[0].id",
        ),
    ],
)
def test_invalid_payload_is_400_with_param(
    client: TestClient, payload: dict[str, Any], param: str
) -> None:
    response = post(client, payload)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("invalid_payload", param)


@pytest.mark.parametrize(
    "extra",
    [
        b'"n":1e400',
        b'"n":-1e400',
        b'"n":' + b"1" * 5000,
        b'"n":-' + b"9" * 5000 + b',"m":0.5e-999',
        b'"created":1e400',
        b'"data":{"id":"cm_big","amount":18446744073709551616,"x":[1E+999,-0.1e400]}',
    ],
    ids=["1e400", "-1e400", "5000-digits", "negative-5000-digits", "created-float", "in-data"],
)
def test_numbers_beyond_a_double_are_accepted_and_stored_byte_exact(
    tmp_path: Path, recorder: RecordingHandler, extra: bytes
) -> None:
    """Valid JSON that orjson cannot parse (RFC 8259 sets no limit on numbers) is a 200; the
    stored body and the one handed to the handler are the bytes sent."""
    body = b'{"id":"evt_big_number","type":"job.progress",' + extra + b"}"
    app = create_app(settings_for(tmp_path / "events.db"), handlers=HandlerSet.of([recorder]))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = post(client, body)
        assert response.status_code == 200, response.text
        assert response.json() == {"received": True, "id": "evt_big_number", "duplicate": False}
        wait_for_call(recorder)
    assert recorder.calls[0].raw == body

    async def stored() -> bytes | None:
        store = open_store(f"sqlite:///{tmp_path / 'events.db'}")
        await store.open()
        try:
            record = await store.get_event("evt_big_number")
            return None if record is None else record.raw
        finally:
            await store.close()

    assert asyncio.run(stored()) == body


@pytest.mark.parametrize("number", [b"1e99999999999999999999", b"-1E+10000000000000000000"])
def test_a_number_past_what_decimal_holds_is_400_not_500(client: TestClient, number: bytes) -> None:
    """An exponent of more than 18 digits: no exact reader holds it (``decimal`` raised
    ``InvalidOperation``, a 500 the sender would retry forever). RFC 8259 §9 lets a parser
    limit the range of numbers: a 400 ``invalid_json``, never retried."""
    body = b'{"id":"evt_bigexp","type":"job.progress","n":' + number + b"}"
    response = post(client, body)
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_json"


def test_a_created_integer_beyond_64_bits_is_400_naming_it(client: TestClient) -> None:
    """``created`` is a column the service reads: an integer out of its range is refused
    with ``param: created`` however it is written, never a 503 retried forever."""
    for digits in (b"-9223372036854775809", b"18446744073709551616", b"1" * 4000):
        body = b'{"id":"evt_c","type":"job.progress","created":' + digits + b"}"
        response = post(client, body)
        assert response.status_code == 400
        assert (error_of(response)["code"], error_of(response)["param"]) == (
            "invalid_payload",
            "created",
        )


def test_unknown_type_and_fields_are_accepted(
    client: TestClient, recorder: RecordingHandler
) -> None:
    """New event types and fields pass through untouched to handlers that want them."""
    payload = {"id": "evt_new_type", "type": "job.progress", "future_field": {"x": [1]}}
    assert post(client, payload).status_code == 200
    wait_for_call(recorder)
    assert recorder.calls[0].payload["future_field"] == {"x": [1]}


def test_filtered_handler_gets_no_delivery(tmp_path: Path) -> None:
    failed_only = RecordingHandler("failures", events=frozenset({"job.failed"}))
    app = create_app(settings_for(tmp_path / "f.db"), handlers=HandlerSet.of([failed_only]))
    with TestClient(app) as c:
        assert post(c, make_event("evt_c", "job.completed")).status_code == 200
        assert post(c, make_event("evt_f", "job.failed")).status_code == 200
        wait_for_call(failed_only)
        time.sleep(0.2)
    assert [e.id for e in failed_only.calls] == ["evt_f"]


def test_other_methods_are_405_with_envelope(client: TestClient) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        response = client.request(method, URL)
        assert response.status_code == 405
        assert error_of(response)["code"] == "method_not_allowed"
        assert "POST" in response.headers["allow"]


def test_unknown_path_is_404_with_envelope(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(("method", "path"), [("POST", "/webhooks/lacuna/"), ("GET", "/healthz/")])
def test_a_trailing_slash_is_404_not_a_redirect_built_from_host(
    client: TestClient, method: str, path: str
) -> None:
    """Starlette redirected it (307) to a URL built from the Host header, with no envelope."""
    response = client.request(
        method, path, headers={"host": "evil.example"}, follow_redirects=False
    )
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    assert "location" not in response.headers


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    post(client, make_event("evt_m1"))
    post(client, make_event("evt_m1"))
    post(client, b"nope", secret="whsec_forged")
    text = client.get("/metrics").text
    assert 'lacuna_webhooks_received_total{outcome="accepted"} 1.0' in text
    assert 'lacuna_webhooks_received_total{outcome="duplicate"} 1.0' in text
    assert 'lacuna_webhooks_received_total{outcome="invalid_signature"} 1.0' in text
    assert "lacuna_webhooks_queue_depth" in text
    assert "lacuna_webhooks_queue_oldest_due_age_seconds" in text
    assert "lacuna_webhooks_request_duration_seconds_bucket" in text


def test_request_log_line_has_context_but_no_secrets(client: TestClient) -> None:
    body, headers = signed(make_event("evt_log"))
    with capture_logs() as logs:
        client.post(URL, content=body, headers=headers)
        # request lines are logged at the end of the loop turn that answered them
        client.get("/healthz")
    lines = [entry for entry in logs if entry["event"] == "webhook.received"]
    assert len(lines) == 1
    line = lines[0]
    assert line["event_id"] == "evt_log"
    assert line["event_type"] == "job.completed"
    assert line["outcome"] == "accepted"
    assert line["status"] == 200
    assert isinstance(line["latency_ms"], float)
    rendered = repr(logs)
    assert TEST_SECRET not in rendered
    assert headers["x-lacuna-signature"].split("v1=")[1] not in rendered


@pytest.fixture
async def open_sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    await store.open()
    yield store
    await store.close()


async def test_fifty_concurrent_copies_one_acceptance(tmp_path: Path, open_sqlite: Store) -> None:
    """The unique key dedupes: 50 concurrent copies give one duplicate:false and one delivery."""
    recorder = RecordingHandler("recorder")
    app = create_app(
        settings_for(tmp_path / "c.db"),
        store=open_sqlite,
        handlers=HandlerSet.of([recorder]),
        dispatch=False,
    )
    body, headers = signed(make_event("evt_storm"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        responses = await asyncio.gather(
            *(c.post(URL, content=body, headers=headers) for _ in range(50))
        )
    assert {r.status_code for r in responses} == {200}
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    deliveries = await open_sqlite.list_deliveries(event_id="evt_storm")
    assert [d.handler for d in deliveries] == ["recorder"]


async def test_store_unavailable_is_503_with_retry_after(tmp_path: Path) -> None:
    """A store that cannot commit gives 503 and Retry-After, never a 2xx; /readyz turns 503."""
    store = open_store(f"sqlite:///{tmp_path / 'gone.db'}")
    await store.open()
    await store.close()  # every operation now fails
    app = create_app(settings_for(tmp_path / "gone.db"), store=store, dispatch=False)
    body, headers = signed(make_event("evt_503"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(URL, content=body, headers=headers)
        ready = await c.get("/readyz")
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
    assert error_of(response)["code"] == "store_unavailable"
    assert error_of(response)["type"] == "api_error"
    assert ready.status_code == 503


class _BrokenStore:
    """A store with a bug: ``accept`` raises something that is not a ``StoreUnavailable``."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def accept(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a bug in the store")


async def test_a_bug_behind_the_webhook_route_is_the_500_envelope(tmp_path: Path) -> None:
    """The webhook route skips Starlette's error middleware; a bug still gets the envelope
    (and a log line with the traceback), not a bare 500 page or a dropped connection."""
    store = open_store(f"sqlite:///{tmp_path / 'bug.db'}")
    await store.open()
    try:
        app = create_app(
            settings_for(tmp_path / "bug.db"), store=_BrokenStore(store), dispatch=False
        )  # type: ignore[arg-type]
        body, headers = signed(make_event("evt_bug"))
        with capture_logs() as logs:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as c:
                response = await c.post(URL, content=body, headers=headers)
                get = await c.get(URL)
            await asyncio.sleep(0)  # the request line is logged at the end of the loop turn
    finally:
        await store.close()
    assert response.status_code == 500
    assert error_of(response) == {
        "type": "api_error",
        "code": "internal_error",
        "message": "Internal error.",
        "param": None,
    }
    assert get.status_code == 405  # other methods still go through Starlette's routing
    events = [entry["event"] for entry in logs]
    assert "webhook.unhandled_error" in events
    received = [entry for entry in logs if entry["event"] == "webhook.received"]
    assert [(r["status"], r["outcome"]) for r in received] == [(500, "internal_error")]
