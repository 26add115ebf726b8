"""The storage handler against real servers: an audio host, a folder, moto and SeaweedFS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from lacuna_webhooks.dispatch.attempt import classify
from lacuna_webhooks.errors import ConfigError, PermanentError, RateLimited, RetryLater
from lacuna_webhooks.handlers._http import OutboundClient, UnsafeURL
from lacuna_webhooks.handlers.base import MAX_RESULT_BYTES, HandlerContext
from lacuna_webhooks.handlers.storage import StorageHandler
from lacuna_webhooks.models import Event
from tests.conftest import make_event
from tests.integration.servers import (  # noqa: F401 - fixtures, used by name
    S3Server,
    moto_endpoint_fixture,
    moto_s3_fixture,
    raw_http,
    seaweed_endpoint_fixture,
    seaweed_s3_fixture,
)

AUDIO = bytes(range(256)) * 4096  # 1 MiB
AUDIO_2 = b"second track " * 10_000
MAX_BYTES = 2 * 1024 * 1024


def as_event(payload: dict[str, Any]) -> Event:
    return Event.from_body(orjson.dumps(payload))


def as_stored_event(payload: dict[str, Any]) -> Event:
    """An event as the store reads it back: intake now refuses padded ids (400), but one
    stored before that rule (or built by a plugin) still reaches the handler."""
    return Event.from_stored(orjson.dumps(payload))


def completed(urls: list[str], *, task_id: str = "cm123abc", **data: Any) -> Event:
    tracks = [
        {"id": f"trk_{i:02d}", "audio_url": url, "duration": 182.4, "lyrics": None}
        for i, url in enumerate(urls, start=1)
    ]
    return as_event(make_event(task_id=task_id, tracks=tracks, **data))


def requests_to(server: HTTPServer, path: str) -> int:
    return sum(1 for request, _ in server.log if request.path == path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    """Every file below ``root`` (hidden temporary files included), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def make_handler(env: dict[str, str], *, allow_private: bool = True) -> StorageHandler:
    defaults = {"LACUNA_STORAGE_READ_TIMEOUT": "1", "LACUNA_STORAGE_MAX_BYTES": str(MAX_BYTES)}
    ctx = HandlerContext(
        "storage", environ={**defaults, **env}, allow_private_urls=allow_private, timeout_seconds=20
    )
    return StorageHandler(ctx)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
async def folder(root: Path) -> AsyncIterator[StorageHandler]:
    handler = make_handler({"LACUNA_STORAGE_URL": root.as_uri()})
    yield handler
    await handler.aclose()


def serve_audio(server: HTTPServer, path: str, data: bytes, **headers: str) -> str:
    server.expect_request(path).respond_with_data(
        data, content_type=headers.pop("content_type", "audio/mpeg"), headers=headers
    )
    return server.url_for(path)


# --- folder ------------------------------------------------------------------------------


async def test_folder_gets_each_track_and_an_event_json(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """Layout {task}/{track}.{ext} + {task}/event.json with the event, size and sha256."""
    urls = [serve_audio(httpserver, "/a/one.mp3", AUDIO), serve_audio(httpserver, "/b", AUDIO_2)]
    event = completed(urls)
    result = await folder.handle(event)

    # The delivery's result (SPEC §6): where the files are, per track in the event's order.
    assert result == {
        "location": (root / "cm123abc").as_uri() + "/",
        "tracks": [
            {
                "id": "trk_01",
                "url": (root / "cm123abc/trk_01.mp3").as_uri(),
                "size": len(AUDIO),
                "sha256": sha(AUDIO),
                "content_type": "audio/mpeg",
            },
            {
                "id": "trk_02",
                "url": (root / "cm123abc/trk_02.mp3").as_uri(),
                "size": len(AUDIO_2),
                "sha256": sha(AUDIO_2),
                "content_type": "audio/mpeg",
            },
        ],
    }
    assert files_under(root) == [
        "cm123abc/event.json",
        "cm123abc/trk_01.mp3",
        "cm123abc/trk_02.mp3",
    ]
    assert (root / "cm123abc/trk_01.mp3").read_bytes() == AUDIO
    assert (root / "cm123abc/trk_02.mp3").read_bytes() == AUDIO_2
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert manifest["complete"] is True
    assert manifest["event"] == event.payload
    assert [(t["id"], t["file"], t["size"], t["sha256"]) for t in manifest["tracks"]] == [
        ("trk_01", "trk_01.mp3", len(AUDIO), sha(AUDIO)),
        ("trk_02", "trk_02.mp3", len(AUDIO_2), sha(AUDIO_2)),
    ]


@pytest.mark.parametrize(
    ("fmt", "content_type", "ext"),
    [
        ("wav", "audio/mpeg", "wav"),
        (None, "audio/wav", "wav"),
        (None, "application/octet-stream", "bin"),
    ],
)
async def test_extension_comes_from_format_then_url_then_content_type(
    folder: StorageHandler,
    root: Path,
    httpserver: HTTPServer,
    fmt: str | None,
    content_type: str,
    ext: str,
) -> None:
    """The track's ``format`` wins; a URL without a suffix falls back to the Content-Type."""
    url = serve_audio(httpserver, "/audio", AUDIO_2, content_type=content_type)
    payload = make_event(tracks=[{"id": "trk_01", "audio_url": url, "format": fmt}])
    await folder.handle(as_event(payload))
    assert (root / f"cm123abc/trk_01.{ext}").read_bytes() == AUDIO_2


async def test_a_result_too_large_to_record_keeps_the_location_and_the_first_tracks(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """200 tracks with long ids made a result over the 64 KiB a result may have: it was
    dropped whole (handler.result_not_stored), and slack or email after storage lost the
    location too. Now the first tracks that fit, and how many were left out."""
    url = serve_audio(httpserver, "/a.mp3", b"abc")
    ids = [f"{i:03d}" + "x" * 120 for i in range(200)]
    tracks = [{"id": track_id, "audio_url": url, "duration": 1.0} for track_id in ids]
    result = await folder.handle(as_event(make_event(tracks=tracks)))

    assert result is not None
    assert classify(result).result == result  # recorded, not dropped
    assert len(orjson.dumps(result)) <= MAX_RESULT_BYTES
    assert result["location"] == (root / "cm123abc").as_uri() + "/"
    kept = [track["id"] for track in result["tracks"]]
    assert 0 < len(kept) < len(ids)
    assert kept == ids[: len(kept)]  # the event's order
    assert result["tracks_omitted"] == len(ids) - len(kept)
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert [track["id"] for track in manifest["tracks"]] == ids  # every one is in the record


async def test_a_result_that_fits_has_no_tracks_omitted(
    folder: StorageHandler, httpserver: HTTPServer
) -> None:
    result = await folder.handle(completed([serve_audio(httpserver, "/a.mp3", b"abc")]))
    assert result is not None
    assert "tracks_omitted" not in result


async def test_a_retry_does_not_fetch_stored_tracks_again(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """Handling the same event twice downloads each track once and changes nothing."""
    event = completed([serve_audio(httpserver, "/one.mp3", AUDIO)])
    await folder.handle(event)
    await folder.handle(event)
    assert requests_to(httpserver, "/one.mp3") == 1
    assert (root / "cm123abc/trk_01.mp3").read_bytes() == AUDIO


async def test_tracks_of_an_earlier_event_of_the_task_stay_in_its_record(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """Two events of one task with different tracks: event.json kept only the later one's,
    and a replay of the first fetched its track again (from a link that may be stale)."""
    one = serve_audio(httpserver, "/one.mp3", AUDIO)
    first = as_event(
        make_event("evt_first", tracks=[{"id": "trk_a", "audio_url": one, "duration": 1.0}])
    )
    two = serve_audio(httpserver, "/two.mp3", AUDIO_2)
    second = as_event(
        make_event("evt_second", tracks=[{"id": "trk_b", "audio_url": two, "duration": 1.0}])
    )
    await folder.handle(first)
    await folder.handle(second)
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert [t["id"] for t in manifest["tracks"]] == ["trk_b", "trk_a"]
    assert (manifest["event_id"], manifest["complete"]) == ("evt_second", True)
    await folder.handle(first)  # a replay of the first
    assert requests_to(httpserver, "/one.mp3") == 1


async def test_two_events_of_a_task_stored_at_once_keep_both_tracks_in_its_record(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """Both read the record before either wrote it, and the last write dropped the other's
    track: event.json is read again, under the task's lock, just before each write."""

    def slow(_: Any) -> Response:
        time.sleep(0.5)  # the other event is read, fetched and recorded meanwhile
        return Response(AUDIO, content_type="audio/mpeg")

    httpserver.expect_request("/slow.mp3").respond_with_handler(slow)
    fast = serve_audio(httpserver, "/fast.mp3", AUDIO_2)
    tracks = {"trk_slow": httpserver.url_for("/slow.mp3"), "trk_fast": fast}
    events = [
        as_event(make_event(f"evt_{tid}", tracks=[{"id": tid, "audio_url": url, "duration": 1}]))
        for tid, url in tracks.items()
    ]
    await asyncio.gather(*(folder.handle(event) for event in events))
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert sorted(t["id"] for t in manifest["tracks"]) == ["trk_fast", "trk_slow"]


async def test_a_long_job_writes_its_record_a_bounded_number_of_times(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """event.json holds every track so far and was rewritten after each one: quadratic, a job
    of 1000 tiny tracks wrote 171 MB of records. Now after each of the first 20, then each
    time a tenth more are stored, and at the end."""
    url = serve_audio(httpserver, "/a.mp3", b"abc")
    tracks = [{"id": f"t{i}", "audio_url": url, "duration": 1.0} for i in range(300)]
    writes: list[str] = []
    write_bytes = folder.sink.write_bytes

    async def counted(key: str, data: bytes, *, content_type: str) -> None:
        writes.append(key)
        await write_bytes(key, data, content_type=content_type)

    folder.sink.write_bytes = counted  # type: ignore[method-assign]
    await folder.handle(as_event(make_event(tracks=tracks)))
    assert 0 < len(writes) <= 60
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert manifest["complete"] is True
    assert [t["id"] for t in manifest["tracks"]] == [t["id"] for t in tracks]


async def test_a_failed_track_leaves_every_stored_track_recorded(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """Written every few tracks, the record still holds each stored one when a later track
    fails: the retry fetches only what is missing."""
    url = serve_audio(httpserver, "/a.mp3", b"abc")
    httpserver.expect_request("/busy.mp3").respond_with_data("busy", status=503)
    tracks = [{"id": f"t{i}", "audio_url": url, "duration": 1.0} for i in range(44)]
    tracks.append({"id": "t44", "audio_url": httpserver.url_for("/busy.mp3"), "duration": 1.0})
    with pytest.raises(RetryLater, match="HTTP 503"):
        await folder.handle(as_event(make_event(tracks=tracks)))
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert manifest["complete"] is False
    assert [t["id"] for t in manifest["tracks"]] == [f"t{i}" for i in range(44)]


async def test_a_stored_file_that_no_longer_matches_its_sha256_is_fetched_again(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """Only a file whose sha256 matches event.json counts as already stored."""
    event = completed([serve_audio(httpserver, "/one.mp3", AUDIO)])
    await folder.handle(event)
    damaged = bytearray(AUDIO)
    damaged[0] ^= 0xFF
    (root / "cm123abc/trk_01.mp3").write_bytes(bytes(damaged))
    await folder.handle(event)
    assert requests_to(httpserver, "/one.mp3") == 2
    assert (root / "cm123abc/trk_01.mp3").read_bytes() == AUDIO


async def test_a_failed_track_is_retried_without_refetching_the_others(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """event.json records finished tracks at once, so the retry fetches only what is missing."""
    first = serve_audio(httpserver, "/one.mp3", AUDIO)
    answers = [Response("busy", status=503), Response(AUDIO_2, content_type="audio/mpeg")]
    httpserver.expect_request("/two.mp3").respond_with_handler(lambda _: answers.pop(0))
    event = completed([first, httpserver.url_for("/two.mp3")])

    with pytest.raises(RetryLater, match="HTTP 503"):
        await folder.handle(event)
    manifest = orjson.loads((root / "cm123abc/event.json").read_bytes())
    assert manifest["complete"] is False
    assert [t["id"] for t in manifest["tracks"]] == ["trk_01"]
    assert files_under(root) == ["cm123abc/event.json", "cm123abc/trk_01.mp3"]

    await folder.handle(event)
    assert requests_to(httpserver, "/one.mp3") == 1
    assert (root / "cm123abc/trk_02.mp3").read_bytes() == AUDIO_2
    assert orjson.loads((root / "cm123abc/event.json").read_bytes())["complete"] is True


@pytest.mark.parametrize("status", [404, 410])
async def test_a_dead_audio_link_is_permanent(
    folder: StorageHandler, root: Path, httpserver: HTTPServer, status: int
) -> None:
    """404 and 410 cannot get better: the delivery is dead, with the reason."""
    httpserver.expect_request("/gone.mp3").respond_with_data("no", status=status)
    with pytest.raises(PermanentError, match=f"gone: HTTP {status}"):
        await folder.handle(completed([httpserver.url_for("/gone.mp3")]))
    assert files_under(root) == []


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_server_error_is_retried(
    folder: StorageHandler, httpserver: HTTPServer, status: int
) -> None:
    """5xx from the audio host is transient."""
    httpserver.expect_request("/x.mp3").respond_with_data("oops", status=status)
    with pytest.raises(RetryLater, match=f"HTTP {status}") as caught:
        await folder.handle(completed([httpserver.url_for("/x.mp3")]))
    assert caught.value.delay_seconds is None


@pytest.mark.parametrize(
    "content_type",
    [
        "text/html; charset=utf-8",
        "application/json",
        "text/plain",
        "application/problem+json",
        "image/png",
        "application/pdf",
    ],
)
async def test_a_page_answered_with_200_is_not_archived_as_the_audio(
    folder: StorageHandler, root: Path, httpserver: HTTPServer, content_type: str
) -> None:
    """An error page a CDN or proxy serves with a 200 was stored as trk_01.wav (or .bin) and
    the delivery done: the real audio lost once the link went stale. A retry, with why."""
    html = b"<html><body>502 Bad gateway</body></html>"
    url = serve_audio(httpserver, "/a.wav", html, content_type=content_type)
    with pytest.raises(RetryLater, match="a document, not audio"):
        await folder.handle(completed([url]))
    assert files_under(root) == []


@pytest.mark.parametrize("sink", ["folder", "s3"])
async def test_an_empty_200_is_not_archived_as_the_audio(
    root: Path, moto_s3: S3Server, httpserver: HTTPServer, sink: str
) -> None:
    """A 200 with no body (a CDN's glitch) was stored as a 0-byte trk_01.mp3 and the delivery
    done: the real audio lost once its link went stale. A retry, with why; nothing stored."""
    url = serve_audio(httpserver, "/a.mp3", b"")
    env = {"LACUNA_STORAGE_URL": root.as_uri()} if sink == "folder" else moto_s3.env()
    handler = make_handler(env)
    try:
        with pytest.raises(RetryLater, match="empty body"):
            await handler.handle(completed([url]))
    finally:
        await handler.aclose()
    if sink == "folder":
        assert files_under(root) == []
    else:
        assert moto_s3.keys() == []


async def test_429_is_retried_after_retry_after(
    folder: StorageHandler, httpserver: HTTPServer
) -> None:
    """A rate-limited download asks to be retried after the host's Retry-After."""
    httpserver.expect_request("/x.mp3").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "7"}
    )
    with pytest.raises(RateLimited) as caught:  # does not spend the budget
        await folder.handle(completed([httpserver.url_for("/x.mp3")]))
    assert caught.value.delay_seconds == 7


async def test_a_file_over_the_limit_is_refused_while_streaming(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """No Content-Length: the limit is enforced on the bytes, and no partial file is left."""

    def endless(_: Request) -> Response:
        def body() -> Iterator[bytes]:
            for _ in range(4):
                yield AUDIO

        return Response(body(), content_type="audio/mpeg")  # chunked, no length

    httpserver.expect_request("/huge.mp3").respond_with_handler(endless)
    with pytest.raises(PermanentError, match="LACUNA_STORAGE_MAX_BYTES"):
        await folder.handle(completed([httpserver.url_for("/huge.mp3")]))
    assert files_under(root) == []


async def test_a_declared_length_over_the_limit_is_refused_before_downloading(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """A Content-Length above the limit is refused from the headers alone."""
    serve_audio(httpserver, "/big.mp3", AUDIO * 3)
    with pytest.raises(PermanentError, match=f"{len(AUDIO) * 3} bytes"):
        await folder.handle(completed([httpserver.url_for("/big.mp3")]))
    assert files_under(root) == []


async def test_a_stalled_download_times_out_and_leaves_no_partial_file(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """The read timeout ends a host that stops sending; the retry starts clean."""

    served = threading.Event()

    def stall(_: Request) -> Response:
        def body() -> Iterator[bytes]:
            try:
                yield AUDIO[:1024]
                time.sleep(2.5)  # longer than LACUNA_STORAGE_READ_TIMEOUT=1
                yield AUDIO[1024:]
            finally:
                served.set()

        return Response(body(), content_type="audio/mpeg")

    httpserver.expect_request("/slow.mp3").respond_with_handler(stall)
    with pytest.raises(RetryLater, match="ReadTimeout"):
        await folder.handle(completed([httpserver.url_for("/slow.mp3")]))
    assert files_under(root) == []
    # The test server answers one request at a time: let it finish before the next test.
    assert await asyncio.to_thread(served.wait, 10)


async def test_redirects_are_followed(
    folder: StorageHandler, root: Path, httpserver: HTTPServer
) -> None:
    """A CDN redirect is followed to the file."""
    serve_audio(httpserver, "/real.mp3", AUDIO_2)
    httpserver.expect_request("/short").respond_with_data(
        "", status=302, headers={"Location": "/real.mp3"}
    )
    await folder.handle(completed([httpserver.url_for("/short")]))
    assert (root / "cm123abc/trk_01.mp3").read_bytes() == AUDIO_2


async def test_a_redirect_loop_is_permanent(folder: StorageHandler, httpserver: HTTPServer) -> None:
    """Redirects are bounded."""
    httpserver.expect_request("/loop").respond_with_data(
        "", status=301, headers={"Location": "/loop"}
    )
    with pytest.raises(PermanentError, match="redirected more than 5 times"):
        await folder.handle(completed([httpserver.url_for("/loop")]))
    assert requests_to(httpserver, "/loop") == 6


@pytest.mark.parametrize("location", ["//[::1", "https://[::1/a.mp3"])
async def test_a_redirect_to_an_unparsable_location_is_permanent(
    folder: StorageHandler, root: Path, location: str
) -> None:
    """A Location httpx cannot parse came out as a RemoteProtocolError, retried as network
    trouble at every attempt; like any refused redirect it is permanent."""
    answer = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
    async with raw_http(answer.encode()) as base:
        with pytest.raises(UnsafeURL, match="redirect to an invalid URL"):
            await folder.handle(completed([f"{base}/a.mp3"]))
    assert files_under(root) == []


@pytest.mark.parametrize(
    "target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x", "http://[::1]/x"]
)
async def test_a_redirect_to_a_private_address_is_refused(
    httpserver: HTTPServer, target: str
) -> None:
    """Every hop is checked: a public-looking host cannot bounce us to metadata or the LAN.

    The client trusts 127.0.0.1 only (to reach this test server), like any public
    address; the hop it is redirected to is refused before any connection.
    """
    httpserver.expect_request("/bounce").respond_with_data(
        "", status=302, headers={"Location": target}
    )
    client = OutboundClient(
        allow_private=False,
        allow_http=True,
        trusted_networks=["127.0.0.1/32"],
        connect_timeout_seconds=2,
        read_timeout_seconds=2,
    )
    try:
        with pytest.raises(UnsafeURL, match="non-public address"):
            async with client.stream_get(
                f"http://127.0.0.1:{httpserver.port}/bounce", what="audio"
            ):
                pass
    finally:
        await client.aclose()
    assert requests_to(httpserver, "/bounce") == 1


async def test_without_the_switch_only_https_to_public_addresses_is_used(
    root: Path, httpserver: HTTPServer
) -> None:
    """LACUNA_ALLOW_PRIVATE_URLS=false: http is refused, and so is a name resolving to loopback."""
    handler = make_handler({"LACUNA_STORAGE_URL": root.as_uri()}, allow_private=False)
    try:
        with pytest.raises(UnsafeURL, match="must be an https URL"):
            await handler.handle(completed([serve_audio(httpserver, "/a.mp3", AUDIO)]))
        with pytest.raises(UnsafeURL, match="localhost resolves to"):
            await handler.handle(completed([f"https://localhost:{httpserver.port}/a.mp3"]))
    finally:
        await handler.aclose()
    assert httpserver.log == []
    assert files_under(root) == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"tracks": None}, "data.tracks is missing"),
        ({"tracks": "trk_01"}, "not a list"),
        ({"tracks": []}, "is empty"),
        ({"tracks": [{"id": "trk_01", "audio_url": 42}]}, "audio_url is not a non-empty string"),
        ({"tracks": [{"id": "../../etc", "audio_url": "https://x.example/a"}]}, "file name"),
        ({"id": "a/b"}, "task id"),
    ],
)
async def test_a_malformed_event_is_permanent(
    folder: StorageHandler, root: Path, data: dict[str, Any], reason: str
) -> None:
    """Data the handler cannot use is a dead delivery with a clear reason, never a crash."""
    payload = make_event()
    payload["data"].update(data)
    if payload["data"].get("tracks") is None:
        payload["data"].pop("tracks")
    with pytest.raises(PermanentError, match=reason):
        await folder.handle(as_event(payload))
    assert files_under(root) == []


# --- S3 ------------------------------------------------------------------------------


async def test_s3_gets_the_same_layout(moto_s3: S3Server, httpserver: HTTPServer) -> None:
    """s3://bucket/prefix: objects under the prefix, with event.json and Content-Type."""
    handler = make_handler(moto_s3.env("lacuna/audio"))
    event = completed([serve_audio(httpserver, "/one.mp3", AUDIO)])
    try:
        first = await handler.handle(event)
        second = await handler.handle(event)  # from the manifest: nothing fetched again
    finally:
        await handler.aclose()
    assert first == second
    assert first == {
        "location": f"s3://{moto_s3.bucket}/lacuna/audio/cm123abc/",
        "tracks": [
            {
                "id": "trk_01",
                "url": f"s3://{moto_s3.bucket}/lacuna/audio/cm123abc/trk_01.mp3",
                "size": len(AUDIO),
                "sha256": sha(AUDIO),
                "content_type": "audio/mpeg",
            }
        ],
    }
    assert moto_s3.keys() == [
        "lacuna/audio/cm123abc/event.json",
        "lacuna/audio/cm123abc/trk_01.mp3",
    ]
    assert moto_s3.read("lacuna/audio/cm123abc/trk_01.mp3") == AUDIO
    head = moto_s3.client().head_object(
        Bucket=moto_s3.bucket, Key="lacuna/audio/cm123abc/trk_01.mp3"
    )
    assert head["ContentType"] == "audio/mpeg"
    manifest = orjson.loads(moto_s3.read("lacuna/audio/cm123abc/event.json"))
    assert manifest["tracks"][0]["sha256"] == sha(AUDIO)
    assert requests_to(httpserver, "/one.mp3") == 1


async def test_s3_streams_a_file_larger_than_one_part(
    moto_s3: S3Server, httpserver: HTTPServer
) -> None:
    """A file above the 8 MiB part size goes up as a multipart upload, intact."""
    big = AUDIO * 9
    handler = make_handler(moto_s3.env(LACUNA_STORAGE_MAX_BYTES=str(len(big))))
    try:
        await handler.handle(completed([serve_audio(httpserver, "/big.wav", big)]))
    finally:
        await handler.aclose()
    assert sha(moto_s3.read("cm123abc/trk_01.wav")) == sha(big)


async def test_s3_never_shows_a_partial_object(moto_s3: S3Server, httpserver: HTTPServer) -> None:
    """An upload stopped by the size limit leaves no object under the final name."""

    def endless(_: Request) -> Response:
        return Response((AUDIO for _ in range(4)), content_type="audio/mpeg")

    httpserver.expect_request("/huge.mp3").respond_with_handler(endless)
    handler = make_handler(moto_s3.env())
    try:
        with pytest.raises(PermanentError, match="LACUNA_STORAGE_MAX_BYTES"):
            await handler.handle(completed([httpserver.url_for("/huge.mp3")]))
    finally:
        await handler.aclose()
    assert moto_s3.keys() == []


async def test_a_missing_bucket_is_permanent(moto_s3: S3Server, httpserver: HTTPServer) -> None:
    """A bucket that does not exist is a settings problem, reported as such."""
    env = moto_s3.env(LACUNA_STORAGE_URL="s3://no-such-bucket-here/x")
    handler = make_handler(env)
    try:
        with pytest.raises(PermanentError, match="bucket does not exist"):
            await handler.handle(completed([serve_audio(httpserver, "/a.mp3", AUDIO_2)]))
    finally:
        await handler.aclose()


async def test_seaweedfs_accepts_the_right_keys(
    seaweed_s3: S3Server, httpserver: HTTPServer
) -> None:
    """Signed requests (SigV4) against a server that checks them."""
    prefix = f"t{time.monotonic_ns()}"
    handler = make_handler(seaweed_s3.env(prefix))
    try:
        await handler.handle(completed([serve_audio(httpserver, "/a.mp3", AUDIO)]))
    finally:
        await handler.aclose()
    assert seaweed_s3.keys(prefix) == [
        f"{prefix}/cm123abc/event.json",
        f"{prefix}/cm123abc/trk_01.mp3",
    ]
    assert seaweed_s3.read(f"{prefix}/cm123abc/trk_01.mp3") == AUDIO


async def test_seaweedfs_refusing_the_keys_is_permanent(
    seaweed_s3: S3Server, httpserver: HTTPServer
) -> None:
    """Wrong credentials: dead at once, the reason names the variables, nothing is stored."""
    prefix = f"t{time.monotonic_ns()}"
    handler = make_handler(seaweed_s3.env(prefix, AWS_SECRET_ACCESS_KEY="not-the-secret"))
    try:
        with pytest.raises(PermanentError, match="refused the credentials") as caught:
            await handler.handle(completed([serve_audio(httpserver, "/a.mp3", AUDIO)]))
    finally:
        await handler.aclose()
    assert "not-the-secret" not in str(caught.value)
    assert seaweed_s3.keys(prefix) == []


# --- ids are matched whole; input-shaped errors are permanent --------------------------------


@pytest.mark.parametrize(
    ("data", "what"),
    [
        ({"id": "ok\n"}, "task id"),
        ({"tracks": [{"id": "trk_01\n", "audio_url": "https://x.example/a.mp3"}]}, "track id"),
    ],
)
async def test_an_id_with_a_trailing_newline_is_refused_in_a_folder(
    folder: StorageHandler, root: Path, data: dict[str, Any], what: str
) -> None:
    """`$` would match before the newline: the whole id is checked, nothing is created."""
    payload = make_event()
    payload["data"].update(data)
    with pytest.raises(PermanentError, match=f"{what}.* cannot be used as a file name"):
        await folder.handle(as_stored_event(payload))
    assert await asyncio.to_thread(os.listdir, root) == []  # no `ok\n/` folder either


async def test_an_id_with_a_trailing_newline_is_permanent_on_s3(moto_s3: S3Server) -> None:
    """On S3 the same id is refused before any request (it used to be retried forever)."""
    handler = make_handler(moto_s3.env())
    try:
        with pytest.raises(PermanentError, match="cannot be used as a file name"):
            await handler.handle(as_stored_event(make_event(task_id="ok\n")))
    finally:
        await handler.aclose()
    assert moto_s3.keys() == []


async def test_a_key_over_s3s_1024_bytes_is_permanent_before_any_request(
    moto_s3: S3Server, httpserver: HTTPServer
) -> None:
    """A long prefix and long ids make a key over S3's 1024 bytes. S3 answers the first
    request, a HEAD of event.json, with a bare 400 that obstore reports as a generic error:
    retried at every attempt. (moto takes such keys, which is how nothing reaches it.)"""
    url = serve_audio(httpserver, "/a.mp3", AUDIO_2)
    handler = make_handler(moto_s3.env("p" * 900))
    try:
        with pytest.raises(PermanentError, match="more than S3's 1024"):
            await handler.handle(completed([url], task_id="t" * 128))
    finally:
        await handler.aclose()
    assert moto_s3.keys() == []
    assert requests_to(httpserver, "/a.mp3") == 0


@pytest.mark.parametrize("key", ["ok\n/event.json", "a//b", "a/../b"])
async def test_s3_refusing_a_key_is_permanent(moto_s3: S3Server, key: str) -> None:
    """An object key obstore cannot use (a ValueError before any request) is permanent."""
    handler = make_handler(moto_s3.env())
    try:
        with pytest.raises(PermanentError, match="S3 refused the request"):
            await handler.sink.write_bytes(key, b"{}", content_type="application/json")
        with pytest.raises(PermanentError, match="S3 refused the request"):
            await handler.sink.read(key, limit=10)
    finally:
        await handler.aclose()


# --- stored files are owner-only, whatever the umask ------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in sorted(root.rglob("*"))}


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize(
    ("setting", "file_mode", "dir_mode"),
    [(None, 0o600, 0o700), ("0640", 0o640, 0o750), ("644", 0o644, 0o755)],
)
async def test_stored_files_get_the_configured_mode_whatever_the_umask(
    tmp_path: Path, httpserver: HTTPServer, setting: str | None, file_mode: int, dir_mode: int
) -> None:
    """Default: files 0600, folders 0700 (the audio of unreleased tracks is private);
    LACUNA_STORAGE_FILE_MODE widens it for a reading group, folders following."""
    root = tmp_path / "nested" / "audio"
    env = {"LACUNA_STORAGE_URL": root.as_uri()}
    if setting is not None:
        env["LACUNA_STORAGE_FILE_MODE"] = setting
    handler = make_handler(env)
    try:
        await handler.handle(completed([serve_audio(httpserver, "/one.mp3", AUDIO)]))
    finally:
        await handler.aclose()
    assert root.stat().st_mode & 0o777 == dir_mode
    assert modes_under(root) == {
        "cm123abc": dir_mode,
        "cm123abc/event.json": file_mode,
        "cm123abc/trk_01.mp3": file_mode,
    }


@pytest.mark.parametrize(
    "value",
    [
        *("0700", "0666", "0400", "0602", "rw", "01600", "-600"),
        # int(…, 8) takes them, and they passed: other scripts' digits, `_`, a sign, `0o`.
        *("\u0660\u0666\u0660\u0660", "\uff10\uff16\uff10\uff10", "0_600", "+600", "0o600"),
    ],
)
def test_a_file_mode_that_is_not_owner_read_write_without_world_write_is_refused(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(ConfigError, match="LACUNA_STORAGE_FILE_MODE"):
        make_handler(
            {"LACUNA_STORAGE_URL": (tmp_path / "a").as_uri(), "LACUNA_STORAGE_FILE_MODE": value}
        )


async def test_a_full_disk_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while a file is written: its temporary file goes, and the disk-full
    error is the one raised. close() flushed the buffer, failed again with ENOSPC, and the
    `.part` file stayed behind at every attempt. The writes go to /dev/full, whose every
    flush the kernel refuses with ENOSPC, behind a real temporary file."""
    import errno

    from lacuna_webhooks.handlers import storage

    real_create = storage.create_file

    def full_disk(path: Path, mode: int) -> IO[bytes]:
        real_create(path, mode).close()  # the temporary file exists, as on a real disk
        return Path("/dev/full").open("wb")

    monkeypatch.setattr(storage, "create_file", full_disk)
    sink = storage.FolderSink(tmp_path)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 100

    with pytest.raises(OSError, match="No space left") as info:
        await sink.write_stream("task/trk_01.mp3", chunks(), content_type="audio/mpeg")
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "task").iterdir()] == []


@pytest.mark.parametrize("escape", ["%00", "%0A", "%7F"])
def test_a_folder_url_with_a_control_character_is_one_line_naming_it(
    tmp_path: Path, escape: str
) -> None:
    """`file:///tmp/x%00y` gave "the 'storage' handler failed to start: ValueError:
    embedded null byte", without the variable's name."""
    with pytest.raises(ConfigError, match="LACUNA_STORAGE_URL names a folder with a control"):
        make_handler({"LACUNA_STORAGE_URL": f"{tmp_path.as_uri()}/x{escape}y"})


@pytest.mark.parametrize("mode", [0o755, 0o644], ids=["executable", "plain"])
def test_a_folder_url_naming_a_file_is_one_line_saying_so(tmp_path: Path, mode: int) -> None:
    """`file:///tmp/exefile` (an executable file) passed the start check and every storage
    delivery then went dead ("Not a directory"); a plain file was refused as "not writable"."""
    target = tmp_path / "afile"
    target.write_text("x")
    target.chmod(mode)
    with pytest.raises(ConfigError) as raised:
        make_handler({"LACUNA_STORAGE_URL": target.as_uri()})
    assert str(raised.value) == f"LACUNA_STORAGE_URL: {target} is not a folder"
