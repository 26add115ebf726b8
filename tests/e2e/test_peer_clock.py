"""A peer whose clock disagrees with ours answers 429 with ``Retry-After`` as an HTTP date.

The peer (a real HTTP server process, its wall clock an hour ahead under libfaketime) says
"retry at <its now + 60 s>" and, as every HTTP server does, sends its ``Date``. Read against
our clock, that date is an hour and a minute away: the retry waited the cap (an hour) instead
of a minute. Read against the answer's own ``Date``, it is the 60 s the peer meant.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, free_port, wait_until
from tests.e2e.test_clock_skew import libfaketime, skewed_env

pytestmark = pytest.mark.e2e
SECRET = "whsec_" + base64.b64encode(b"e2e-peer-clock-secret-0123456789").decode()

PEER = """
import email.utils, http.server, sys, time

class Peer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        with open(sys.argv[2], "a") as fh:
            fh.write("hit\\n")
        self.send_response(429)  # sends Date: from this process's clock
        self.send_header("Retry-After", email.utils.formatdate(time.time() + 60, usegmt=True))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Peer).serve_forever()
"""


@pytest.fixture
def peer_ahead(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(URL, hits file) of a peer whose wall clock runs an hour ahead."""
    lib = libfaketime()
    port = free_port()
    hits = tmp_path / "hits.txt"
    env = {**os.environ, **skewed_env(lib, "+3600s")}
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(port), str(hits)], env=env)
    try:

        def up() -> bool:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            except httpx.HTTPError:
                return False
            return True

        wait_until(up, timeout=20, what="the peer listening")
        yield f"http://127.0.0.1:{port}/hook", hits
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_retry_after_date_is_read_against_the_peers_own_date(
    serve_factory: type[Serve], peer_ahead: tuple[str, Path]
) -> None:
    url, hits = peer_ahead
    s = serve_factory(
        {
            "LACUNA_HANDLERS": "app=http",
            "LACUNA_APP_URL": url,
            "LACUNA_APP_SECRET": SECRET,
            "LACUNA_POLL_INTERVAL": "0.2",
        }
    ).start()
    body, headers = signed(make_event("evt_peer_ahead"))
    assert httpx.post(s.webhook_url, content=body, headers=headers).status_code == 200

    def attempts() -> list[dict[str, object]]:
        lines = [orjson.loads(line) for line in s.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == "delivery.attempt"]

    wait_until(lambda: attempts() != [], timeout=20, what="the first attempt")
    (first,) = attempts()
    assert first["outcome"] == "retry"
    assert "429" in str(first["error"])
    retry_in = first["retry_in_seconds"]
    assert isinstance(retry_in, float)
    # The peer's 60 s (its Retry-After and its Date are one second apart at most), not the
    # hour its date is from our clock.
    assert 55 <= retry_in <= 62, first
    assert hits.read_text().splitlines() == ["hit"]
