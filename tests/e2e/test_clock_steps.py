"""A ``serve`` on SQLite whose wall clock steps while it runs (libfaketime reading its offset
from a file, the monotonic clock left alone, as NTP stepping a host's clock would).

SQLite's schedules are wall-clock times of the one machine: a delivery due at 12:00:05 is
claimed once the clock says so. When that clock steps back an hour, every schedule written
before the step lay an hour further off than it was meant to: a retry due in 6 s, and an event
accepted a moment before the step (both due at once), waited that hour. The dispatcher sees
the step (the wall clock went back against the monotonic one) and brings those schedules
back by as much.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import CLI, REPO, Serve, wait_until
from tests.e2e.flaky_plugin import attempts
from tests.e2e.test_clock_skew import libfaketime

pytestmark = pytest.mark.e2e
PLUGIN = "flaky=tests.e2e.flaky_plugin:FailsOnce"
STEP_BACK = "-3600s"


def stepping_env(lib: str, offset_file: Path) -> dict[str, str]:
    """libfaketime reading the wall clock's offset from ``offset_file`` (re-read every
    second); the monotonic clock is not faked."""
    offset_file.write_text("+0s\n")
    return {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def step(offset_file: Path, offset: str) -> None:
    offset_file.write_text(f"{offset}\n")


def serve_env(tmp_path: Path, out: Path) -> dict[str, str]:
    return {
        "LACUNA_HANDLERS": PLUGIN,
        "LACUNA_FLAKY_PATH": str(out),
        "LACUNA_POLL_INTERVAL": "0.2",
        "LACUNA_RETRY_BASE_DELAY": "6",
    }


def test_a_retry_is_not_held_back_by_a_clock_stepping_back(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """The first attempt fails (retry in about 6 s); then the clock steps back an hour. The
    retry runs within seconds, not an hour later."""
    lib = libfaketime()
    offset_file = tmp_path / "offset"
    out = tmp_path / "attempts.txt"
    s = serve_factory({**serve_env(tmp_path, out), **stepping_env(lib, offset_file)}).start()
    body, headers = signed(make_event("evt_step_retry"))
    assert httpx.post(s.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(lambda: attempts(out) == ["evt_step_retry"], timeout=20, what="attempt 1")
    step(offset_file, STEP_BACK)
    time.sleep(2)  # libfaketime reads the file again within a second
    assert attempts(out) == ["evt_step_retry"]  # the retry is not due yet (4.8 s at least)
    wait_until(
        lambda: attempts(out) == ["evt_step_retry"] * 2,
        timeout=20,
        what=f"the retry after the clock stepped back:\n{s.log()}",
    )
    assert '"dispatcher.clock_stepped_back"' in s.log()


def test_an_event_accepted_before_the_clock_stepped_back_is_delivered_at_once(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """The handler is paused, an event is accepted (due at once), the clock steps back an
    hour, the handler is resumed: the event is delivered within seconds."""
    lib = libfaketime()
    offset_file = tmp_path / "offset"
    out = tmp_path / "attempts.txt"
    env = serve_env(tmp_path, out)
    s = serve_factory({**env, **stepping_env(lib, offset_file)}).start()
    cli_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": str(REPO),
        **env,
    }

    def handlers(*args: str) -> None:
        subprocess.run([CLI, "handlers", *args], cwd=tmp_path, env=cli_env, check=True)

    handlers("pause", "flaky")
    time.sleep(1)  # a pause reaches the dispatcher within the poll interval (0.2 s)
    body, headers = signed(make_event("evt_fine_before_step"))
    assert httpx.post(s.webhook_url, content=body, headers=headers).status_code == 200
    time.sleep(0.5)
    assert attempts(out) == []
    step(offset_file, STEP_BACK)
    time.sleep(2)  # libfaketime reads the file again within a second
    handlers("resume", "flaky")
    wait_until(
        lambda: len(attempts(out)) >= 1,
        timeout=20,
        what=f"the event accepted before the step:\n{s.log()}",
    )


def test_an_attempt_during_a_clock_step_is_recorded_with_its_true_length(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """An attempt that takes 3 s, with the clock stepping back an hour while it runs: its
    recorded length (``events show``, the handler's p50/p95) is about 3 s, not -3597 s."""
    lib = libfaketime()
    offset_file = tmp_path / "offset"
    out = tmp_path / "attempts.txt"
    env = {**serve_env(tmp_path, out), "LACUNA_FLAKY_DELAY": "3"}
    s = serve_factory({**env, **stepping_env(lib, offset_file)}).start()
    body, headers = signed(make_event("evt_step_during"))
    assert httpx.post(s.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(lambda: attempts(out) == ["evt_step_during"], timeout=20, what="attempt 1")
    step(offset_file, STEP_BACK)
    wait_until(lambda: len(attempts(out)) == 2, timeout=30, what=f"the retry:\n{s.log()}")
    cli_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": str(REPO),
        **env,
    }

    def shown() -> list[dict[str, object]]:
        text = subprocess.run(
            [CLI, "events", "show", "evt_step_during", "--json"],
            cwd=tmp_path,
            env=cli_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (delivery,) = orjson.loads(text)["deliveries"]
        log: list[dict[str, object]] = delivery["attempts_log"]
        return log

    wait_until(lambda: len(shown()) == 2, timeout=20, what="both attempts recorded")
    first, second = shown()
    assert first["outcome"] == "retry"
    for attempt in (first, second):
        duration = attempt["duration_ms"]
        assert isinstance(duration, float)
        assert 2900 <= duration < 10_000, attempt
