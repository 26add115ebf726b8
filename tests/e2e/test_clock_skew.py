"""Two `serve` replicas on one PostgreSQL database, one with its clock 120 s ahead
(libfaketime): no event is handled by both at the same time (issue 9, item 3).

Leases are timed by the database's clock, so the replica from the future does not see
the other one's live lease (handler timeout 10 s + 30 s margin = 40 s) as expired.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI, make_event, signed
from tests.e2e.conftest import CLI, REPO, Serve, handler_workers, stop_process, wait_until
from tests.e2e.overlap_plugin import lines
from tests.e2e.recorder_plugin import recorded

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
PLUGIN = "tests.e2e.overlap_plugin:OverlapRecorder"
RECORDER = "tests.e2e.recorder_plugin:FileRecorder"
SKEW = "+120s"
HOUR_AHEAD = "+3600s"


def libfaketime() -> str:
    """The path of libfaketime (Debian package ``faketime``); fail under CI when missing."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        message = "libfaketime is not installed (apt-get install faketime)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


def skewed_env(lib: str, skew: str = SKEW) -> dict[str, str]:
    # Monotonic clocks left alone: only the wall clock is ahead (120 s), as on a skewed host.
    return {"LD_PRELOAD": lib, "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@contextlib.contextmanager
def running_worker(tmp_path: Path, env: dict[str, str]) -> Iterator[Path]:
    """A real `worker` with ``env`` (skew it with ``skewed_env``; nothing of this process's
    faked clock or settings is inherited) for the ``with`` block, stopped by SIGTERM (killed
    30 s later) at its end; yields the path of its log (JSON), appended to by each start."""
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("LACUNA_", "FAKETIME"))}
    plain.pop("LD_PRELOAD", None)
    log_path = tmp_path / "worker.log"
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        worker = subprocess.Popen(
            [CLI, "worker"],
            cwd=tmp_path,
            env={**plain, "PYTHONPATH": str(REPO), "LACUNA_LOG_FORMAT": "json", **env},
            stdout=log,
            stderr=log,
        )
    try:
        yield log_path
    finally:
        stop_process(worker)


def test_libfaketime_moves_pythons_clock() -> None:
    """The skew is real: under these variables Python's ``time.time()`` runs ~120 s ahead."""
    lib = libfaketime()
    probe = [sys.executable, "-c", "import time; print(time.time())"]
    plain = float(subprocess.run(probe, capture_output=True, check=True, text=True).stdout)
    ahead = float(
        subprocess.run(
            probe, capture_output=True, check=True, text=True, env=skewed_env(lib)
        ).stdout
    )
    assert 110 < ahead - plain < 130


def test_a_replica_whose_clock_is_ahead_does_not_run_a_leased_event_again(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """Replica A (true clock) accepts 3 events and starts running them (8 s each, lease
    40 s); replica B, 120 s ahead, polls meanwhile. B must not take over A's live leases:
    every event runs exactly once, by A, and never two runs of one event overlap."""
    lib = libfaketime()
    env = {
        "LACUNA_DATABASE_URL": postgres_dsn,
        "LACUNA_HANDLERS": PLUGIN,
        "LACUNA_OVERLAP_DIR": str(tmp_path),
        "LACUNA_OVERLAP_DELAY": "8",
        "LACUNA_OVERLAP_TIMEOUT": "10",
        "LACUNA_POLL_INTERVAL": "0.2",
    }
    a = serve_factory(env).start()
    ids = [f"evt_skew_{i}" for i in range(3)]
    for event_id in ids:
        body, headers = signed(make_event(event_id))
        assert httpx.post(a.webhook_url, content=body, headers=headers).status_code == 200
    running = [tmp_path / f"{event_id}.running" for event_id in ids]
    wait_until(lambda: all(p.exists() for p in running), timeout=20, what="A running all 3")
    # Handlers run in serve's worker processes: A's are the ones that may have run them.
    a_workers = {str(pid) for pid in handler_workers(a)}
    assert a_workers
    b = serve_factory({**env, **skewed_env(lib)}).start()
    wait_until(lambda: len(lines(tmp_path / "done.txt")) >= 3, timeout=60, what="3 runs done")
    assert b.proc is not None
    assert b.proc.poll() is None
    done = lines(tmp_path / "done.txt")
    assert lines(tmp_path / "overlaps.txt") == []
    assert sorted(event_id for event_id, _ in done) == ids
    assert {pid for _, pid in done} <= a_workers


def test_events_stored_by_an_intake_whose_clock_is_ahead_are_delivered_at_once(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """Intake (`serve`, LACUNA_DISPATCH=false) on a host whose clock runs an hour ahead, a
    `worker` with a true clock: a new delivery was due from the intake's time, so the worker
    left every event waiting for that hour. It is due at the earlier of the intake's clock and
    the database's (as replays are), and the worker delivers it at once, exactly once."""
    lib = libfaketime()
    out = tmp_path / "delivered.txt"
    env = {
        "LACUNA_DATABASE_URL": postgres_dsn,
        "LACUNA_HANDLERS": RECORDER,
        "LACUNA_RECORDER_PATH": str(out),
        "LACUNA_POLL_INTERVAL": "0.2",
    }
    intake = serve_factory(
        {**env, "LACUNA_DISPATCH": "false", **skewed_env(lib, HOUR_AHEAD)}
    ).start()
    # Signed at the intake's time: its replay window is judged by its own clock.
    body, headers = signed(make_event("evt_from_ahead"), t=int(time.time()) + 3600)
    answer = httpx.post(intake.webhook_url, content=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    with running_worker(tmp_path, env):
        wait_until(
            lambda: recorded(out) == ["evt_from_ahead"],
            timeout=60,
            what="the worker delivering the event",
        )
    assert recorded(out) == ["evt_from_ahead"]


def test_events_are_delivered_at_once_by_a_worker_whose_clock_is_behind(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """The mirror of the intake ahead: intake and database on time, the one `worker` on a host
    ten minutes behind. A new delivery is due at the intake's (and database's) time, which the
    worker's clock reached ten minutes later: every event waited that long. The worker now
    judges what is due by the database's clock."""
    lib = libfaketime()
    out = tmp_path / "delivered.txt"
    env = {
        "LACUNA_DATABASE_URL": postgres_dsn,
        "LACUNA_HANDLERS": RECORDER,
        "LACUNA_RECORDER_PATH": str(out),
        "LACUNA_POLL_INTERVAL": "0.2",
    }
    intake = serve_factory({**env, "LACUNA_DISPATCH": "false"}).start()
    with running_worker(tmp_path, {**env, **skewed_env(lib, "-600s")}) as log_path:
        wait_until(
            lambda: '"dispatcher.started"' in log_path.read_text(),
            timeout=60,
            what="the worker",
        )
        body, headers = signed(make_event("evt_to_behind"))
        answer = httpx.post(intake.webhook_url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        wait_until(
            lambda: recorded(out) == ["evt_to_behind"],
            timeout=30,
            what="the worker behind delivering the event",
        )
    assert recorded(out) == ["evt_to_behind"]


def test_a_worker_whose_clock_is_ahead_does_not_prune_events_early(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """A `worker` (no intake: nothing refuses its skew) on a host two days ahead, retention one
    day. It pruned by its own clock: an event delivered a moment ago was deleted at its next
    prune, and the sender's retry of that very request (still inside the signature window) was
    a new event, its handlers run twice. The database's clock bounds the prune's cutoff."""
    lib = libfaketime()
    out = tmp_path / "delivered.txt"
    env = {
        "LACUNA_DATABASE_URL": postgres_dsn,
        "LACUNA_HANDLERS": RECORDER,
        "LACUNA_RECORDER_PATH": str(out),
        "LACUNA_POLL_INTERVAL": "0.2",
        "LACUNA_RETENTION_DAYS": "1",
    }
    intake = serve_factory({**env, "LACUNA_DISPATCH": "false"}).start()
    worker_env = {**env, **skewed_env(lib, "+172800s")}
    body, headers = signed(make_event("evt_kept"))
    answer = httpx.post(intake.webhook_url, content=body, headers=headers, timeout=10)
    assert answer.json()["duplicate"] is False
    with running_worker(tmp_path, worker_env) as log_path:
        wait_until(lambda: recorded(out) == ["evt_kept"], timeout=60, what="the delivery")
    # A worker prunes at its start: this one, at its clock, two days after the event.
    started = log_path.read_text().count('"dispatcher.started"')
    with running_worker(tmp_path, worker_env):
        wait_until(
            lambda: log_path.read_text().count('"dispatcher.started"') > started,
            timeout=60,
            what="the worker's second start",
        )
        time.sleep(2)  # its first prune pass
        # The sender's retry of the same request (its 2xx was lost), inside the window.
        again = httpx.post(intake.webhook_url, content=body, headers=headers, timeout=10)
        assert again.status_code == 200, again.text
        assert again.json()["duplicate"] is True, log_path.read_text()
        time.sleep(1)
    assert recorded(out) == ["evt_kept"]
