"""Handlers in worker processes of their own, with a real ``serve``: nothing a handler does
(block, spin, raise any BaseException, exit, be killed) stalls intake or ends ``serve``.

The plugin is ``tests/e2e/misbehaving_plugin.py``: its behaviour follows the event id, and it
writes ``<event id> <pid>`` to a file as each attempt starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_SECRET, make_event, process_exited, signed
from tests.e2e.conftest import (
    CLI,
    REPO,
    Serve,
    children,
    handler_workers,
    stop_process,
    wait_until,
)
from tests.e2e.misbehaving_plugin import started

pytestmark = pytest.mark.e2e
PLUGIN = "tests.e2e.misbehaving_plugin:Misbehaving"
SYNC = "tests.e2e.misbehaving_plugin:SyncMisbehaving"  # its handle() is a plain def
#: Generous: an answer must not wait for a handler, but the machine is shared and busy.
ANSWER_BOUND_SECONDS = 2.0


def plugin_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        "LACUNA_HANDLERS": PLUGIN,
        "LACUNA_MISBEHAVING_PATH": str(tmp_path / "started.txt"),
        "LACUNA_RETRY_BASE_DELAY": "0.2",
        "LACUNA_RETRY_MAX_DELAY": "1",
        **extra,
    }


def send(serve: Serve, event_id: str, timeout: float = 10) -> httpx.Response:
    body, headers = signed(make_event(event_id))
    return httpx.post(serve.webhook_url, content=body, headers=headers, timeout=timeout)


def attempts_of(serve: Serve, event_id: str) -> list[dict[str, Any]]:
    """The event's (only) delivery's attempts, from ``events show --json``."""
    result = subprocess.run(
        [CLI, "events", "show", event_id, "--json"],
        env={"LACUNA_DATABASE_URL": serve.env["LACUNA_DATABASE_URL"], "PATH": "/usr/bin:/bin"},
        cwd=serve.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return []
    (delivery,) = json.loads(result.stdout)["deliveries"]
    attempts: list[dict[str, Any]] = delivery["attempts_log"]
    return attempts


def started_ids(path: Path) -> list[str]:
    return [event_id for event_id, _ in started(path)]


def pids_of(path: Path, event_id: str) -> list[int]:
    return [pid for eid, pid in started(path) if eid == event_id]


def assert_intake_answers(serve: Serve, tag: str, count: int = 5) -> list[str]:
    """Signed webhooks and /healthz each answer within the bound; returns the ids sent."""
    ids = []
    for i in range(count):
        health = httpx.get(f"{serve.base_url}/healthz", timeout=ANSWER_BOUND_SECONDS)
        assert health.status_code == 200
        event_id = f"evt_probe_{tag}_{i}"
        response = send(serve, event_id, timeout=ANSWER_BOUND_SECONDS)
        assert response.status_code == 200, response.text
        ids.append(event_id)
    return ids


@pytest.mark.parametrize(
    ("how", "plugin"),
    [("sleep", PLUGIN), ("spin", PLUGIN), ("sleep", SYNC), ("offload", PLUGIN)],
)
def test_a_blocking_handler_stalls_neither_intake_nor_healthz(
    serve_factory: type[Serve], tmp_path: Path, how: str, plugin: str
) -> None:
    """While a handler blocks its worker (time.sleep, or a CPU loop) past its timeout,
    webhooks and /healthz keep answering within the bound; the attempt is recorded as a
    timeout, its worker replaced, and the delivery retried in the new worker. Webhooks that
    arrived meanwhile are delivered too. The same with a plain-def handle() that blocks in
    its thread (SYNC), and with an async handle() whose job in asyncio's executor blocks
    (offload: the thread ran on past the timeout, the worker was kept, and the retry ran
    beside it in the same process)."""
    out = tmp_path / "started.txt"
    serve = serve_factory(
        plugin_env(
            tmp_path,
            LACUNA_HANDLERS=plugin,
            LACUNA_MISBEHAVING_TIMEOUT="10",
            LACUNA_MISBEHAVING_BLOCK="300",
        )
    ).start()
    blocker = f"evt_{how}_1"
    assert send(serve, blocker).status_code == 200
    wait_until(lambda: blocker in started_ids(out), what="the blocking attempt to start")
    probes = assert_intake_answers(serve, how)
    assert attempts_of(serve, blocker) == []  # the probes ran while it still blocked

    wait_until(lambda: attempts_of(serve, blocker), timeout=60, what="the timeout recorded")
    first = attempts_of(serve, blocker)[0]
    assert first["outcome"] == "retry"
    assert first["error"].startswith("TimeoutError: handler exceeded 10s")
    wait_until(lambda: len(pids_of(out, blocker)) >= 2, timeout=60, what="the retry")
    old_pid, new_pid = pids_of(out, blocker)[:2]
    assert new_pid != old_pid  # retried in the replacement worker
    assert process_exited(old_pid)
    wait_until(lambda: set(probes) <= set(started_ids(out)), timeout=60, what="probes delivered")
    assert "handler_worker.killed" in serve.log()
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_a_handler_printing_without_pause_stalls_neither_intake_nor_healthz(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A worker's output comes through ``serve``, which relays it (so that no process a
    handler starts holds ``serve``'s own stderr): while a handler prints without pause,
    webhooks and /healthz keep answering within the bound, and its lines reach the log."""
    out = tmp_path / "started.txt"
    serve = serve_factory(
        plugin_env(tmp_path, LACUNA_MISBEHAVING_TIMEOUT="60", LACUNA_MISBEHAVING_BLOCK="10")
    ).start()
    flood = "evt_flood_1"
    assert send(serve, flood).status_code == 200
    wait_until(lambda: flood in started_ids(out), what="the flooding attempt to start")
    wait_until(lambda: "flood xxxx" in serve.log(), what="its lines relayed")
    assert_intake_answers(serve, "flood", count=20)
    assert attempts_of(serve, flood) == []  # the probes ran while it still printed
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_a_handler_failing_fast_stalls_neither_intake_nor_healthz(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A handler that fails at once, every time, with retries 1-10 ms apart and no pause:
    its attempts, their outcomes and the claims of their retries all go through the same
    SQLite writer as intake's commits. While hundreds of attempts churn through it,
    webhooks and /healthz keep answering within the bound, and the events that arrived
    meanwhile are delivered."""
    out = tmp_path / "started.txt"
    serve = serve_factory(
        plugin_env(
            tmp_path,
            LACUNA_RETRY_BASE_DELAY="0.001",
            LACUNA_RETRY_MAX_DELAY="0.01",
            LACUNA_RETRY_MAX_ATTEMPTS="1000000",
            LACUNA_MISBEHAVING_CONCURRENCY="16",
        )
    ).start()
    failing = [f"evt_fail_{i}" for i in range(32)]
    for event_id in failing:
        assert send(serve, event_id).status_code == 200
    wait_until(lambda: len(started(out)) >= 500, timeout=60, what="hundreds of failed attempts")
    probes = assert_intake_answers(serve, "churn", count=20)
    churned = len(started(out))
    wait_until(lambda: set(probes) <= set(started_ids(out)), timeout=60, what="probes delivered")
    wait_until(lambda: len(started(out)) > churned + 100, timeout=60, what="the churn going on")
    assert attempts_of(serve, probes[0])[0]["outcome"] == "ok"
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_every_base_exception_is_an_attempt_outcome(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SystemExit(0), KeyboardInterrupt, GeneratorExit, CancelledError, a BaseException
    subclass and an exception that cannot be printed, raised by handle(), are each recorded
    as a failed attempt and retried; serve and the handler's worker process keep running."""
    serve = serve_factory(plugin_env(tmp_path, LACUNA_RETRY_MAX_ATTEMPTS="2")).start()
    wait_until(lambda: handler_workers(serve), what="the handler worker")
    workers = handler_workers(serve)
    names = [
        "SystemExit",
        "KeyboardInterrupt",
        "GeneratorExit",
        "CancelledError",
        "Custom",
        # Its __str__ raises: describe_error raised in turn, the attempt never answered and
        # the delivery stayed running until its worker process was replaced.
        "Unprintable",
        # Its __str__ raises KeyboardInterrupt: that crashed the worker.
        "BadStr",
        # Its class's __name__ (a metaclass property), its __class__, or its __str__'s
        # str subclass raises: describing it raised, and the attempt was recorded as a
        # timeout that "did not yield" 20 s past its timeout, its neighbours released.
        "MetaName",
        "ClassProp",
        "StrSub",
    ]
    for name in names:
        assert send(serve, f"evt_raise_{name}").status_code == 200
    for name in names:
        event_id = f"evt_raise_{name}"
        wait_until(lambda e=event_id: len(attempts_of(serve, e)) == 2, what=f"{name} recorded")
        attempts = attempts_of(serve, event_id)
        assert [a["outcome"] for a in attempts] == ["retry", "dead"]
        assert all(a["error"].startswith(name) for a in attempts), attempts
    assert serve.proc is not None
    assert serve.proc.poll() is None
    assert httpx.get(f"{serve.base_url}/healthz", timeout=5).status_code == 200
    assert handler_workers(serve) == workers  # nothing raised ended the worker either


def test_a_handler_that_breaks_its_worker_gets_a_fresh_one(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A handler that breaks what its worker process runs on (it replaces
    ``asyncio.timeout``): the next attempt cannot even start there. It is answered at once as
    a failure naming the worker (it was left unanswered, recorded 20 s past its timeout as
    one that "did not yield"), the worker ends itself and a fresh one delivers the retry."""
    out = tmp_path / "started.txt"
    serve = serve_factory(plugin_env(tmp_path, LACUNA_RETRY_MAX_ATTEMPTS="3")).start()
    assert send(serve, "evt_breakloop_1").status_code == 200
    wait_until(lambda: attempts_of(serve, "evt_breakloop_1"), what="the breaking attempt")
    (old_pid,) = handler_workers(serve)
    assert send(serve, "evt_after_1").status_code == 200
    wait_until(lambda: len(attempts_of(serve, "evt_after_1")) >= 2, what="the retry recorded")
    first, second = attempts_of(serve, "evt_after_1")[:2]
    assert first["outcome"] == "retry"
    assert first["error"].startswith("WorkerError: the handler's worker process could not run")
    assert "TypeError" in first["error"]
    assert second["outcome"] == "ok"
    assert pids_of(out, "evt_after_1")[-1] != old_pid  # in a fresh worker
    assert process_exited(old_pid)
    assert "handler_worker.broken" in serve.log()
    assert "exited with code 70" in serve.log()
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_a_handler_writing_to_its_workers_socket_is_bounded_and_checked(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A handler writes to its worker's socket to ``serve``. An 8 MiB frame (bounded only by
    the parent's 256 MiB before: one such frame took serve from 58 to 670 MB, an OOM kill in
    a container) is a protocol error: the worker is replaced, its attempt recorded as lost.
    A forged ``done`` holding a 900 KB result (a handler's own is cut at 64 KiB) completes
    the delivery without storing it."""
    serve = serve_factory(plugin_env(tmp_path, LACUNA_RETRY_MAX_ATTEMPTS="2")).start()
    assert send(serve, "evt_forgeresult_1").status_code == 200
    wait_until(lambda: attempts_of(serve, "evt_forgeresult_1"), what="the forged outcome")
    assert attempts_of(serve, "evt_forgeresult_1")[0]["outcome"] == "ok"
    result = subprocess.run(
        [CLI, "events", "show", "evt_forgeresult_1", "--json"],
        env={"LACUNA_DATABASE_URL": serve.env["LACUNA_DATABASE_URL"], "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (delivery,) = json.loads(result.stdout)["deliveries"]
    assert delivery["result"] is None
    assert "handler.result_not_stored" in serve.log()

    (old_pid,) = handler_workers(serve)
    assert send(serve, "evt_bigframe_1").status_code == 200
    wait_until(lambda: attempts_of(serve, "evt_bigframe_1"), what="the big frame's attempt")
    first = attempts_of(serve, "evt_bigframe_1")[0]
    assert first["outcome"] == "retry"
    assert first["error"].startswith("WorkerLost")
    assert "handler_worker.protocol_error" in serve.log()
    assert process_exited(old_pid)
    assert_intake_answers(serve, "bigframe")
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_a_worker_that_exits_is_restarted_and_deliveries_go_on(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A handler that calls os._exit(3): the attempt is recorded (lost, retried, then dead
    after the budget), the worker is restarted with backoff, later events are delivered."""
    out = tmp_path / "started.txt"
    serve = serve_factory(
        plugin_env(tmp_path, LACUNA_RETRY_MAX_ATTEMPTS="2", LACUNA_HANDLER_CONCURRENCY="1")
    ).start()
    assert send(serve, "evt_exit_1").status_code == 200
    wait_until(lambda: len(attempts_of(serve, "evt_exit_1")) == 2, timeout=60, what="2 attempts")
    attempts = attempts_of(serve, "evt_exit_1")
    assert [a["outcome"] for a in attempts] == ["retry", "dead"]
    assert all("worker process exited with code 3" in a["error"] for a in attempts)
    assert send(serve, "evt_after_exit").status_code == 200
    wait_until(lambda: "evt_after_exit" in started_ids(out), timeout=60, what="delivery")
    assert len(set(pids_of(out, "evt_exit_1"))) == 2  # a new worker for the retry
    assert "handler_worker.restarting" in serve.log()
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_a_sigkilled_worker_is_restarted_and_deliveries_go_on(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SIGKILL of the handler's worker mid-attempt: the attempt is recorded as lost and
    retried, a new worker starts, and new events are delivered by it."""
    out = tmp_path / "started.txt"
    serve = serve_factory(
        plugin_env(tmp_path, LACUNA_MISBEHAVING_TIMEOUT="3", LACUNA_RETRY_MAX_ATTEMPTS="2")
    ).start()
    assert send(serve, "evt_hang_1").status_code == 200
    wait_until(lambda: "evt_hang_1" in started_ids(out), what="the attempt to start")
    (worker,) = handler_workers(serve)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: attempts_of(serve, "evt_hang_1"), timeout=60, what="the loss recorded")
    first = attempts_of(serve, "evt_hang_1")[0]
    assert first["outcome"] == "retry"
    assert "killed by SIGKILL" in first["error"]
    assert send(serve, "evt_after_kill").status_code == 200
    wait_until(lambda: "evt_after_kill" in started_ids(out), timeout=60, what="delivery")
    assert pids_of(out, "evt_after_kill")[0] != worker
    assert serve.proc is not None
    assert serve.proc.poll() is None


def test_what_a_plugin_prints_is_logged_redacted(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A plugin that prints the webhook secret and a Slack URL (stdout, stderr, their binary
    buffers, a line without its newline, a non-UTF-8 byte): each line reaches the output as a
    JSON ``process.output`` line of its handler, secret masked and URL cut to its host; the
    secret never appears, nor the URL's path. Writes to the descriptor and a program given
    sys.stdout are caught too; the partial line is logged once the output idles."""
    out = tmp_path / "started.txt"
    serve = serve_factory(plugin_env(tmp_path, LACUNA_LOG_FORMAT="json")).start()
    assert send(serve, "evt_print_1").status_code == 200
    wait_until(lambda: "evt_print_1" in started_ids(out), what="the attempt to start")
    wait_until(lambda: attempts_of(serve, "evt_print_1"), what="the attempt recorded")
    wait_until(lambda: "no newline" in serve.log(), what="the partial line, once idle")
    serve.signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0
    log = serve.log()
    assert TEST_SECRET not in log
    assert "XXXXSECRETPATH" not in log
    assert "B000" not in log
    printed = [
        line
        for line in (json.loads(x) for x in log.splitlines() if x.startswith("{"))
        if line.get("event") == "process.output"
    ]
    assert {(p["stream"], p["handler"]) for p in printed} == {
        ("stdout", "misbehaving"),
        ("stderr", "misbehaving"),
    }
    lines = [p["line"] for p in printed]
    assert "plugin debug: secret=**********" in lines
    assert "posting to https://hooks.slack.com/…" in lines
    assert "caf\\xe9 **********" in lines
    assert "fd **********" in lines
    assert "child **********" in lines
    assert "no newline **********" in lines  # a partial line, logged when the output idles
    assert not [x for x in log.splitlines() if "plugin debug" in x and not x.startswith("{")]


def stored_deliveries(serve: Serve, cwd: Path) -> dict[str, tuple[str, int]]:
    """event id -> (status, attempts) of every delivery, read with the CLI."""
    listed = subprocess.run(
        [CLI, "deliveries", "list", "--json"],
        env={"LACUNA_DATABASE_URL": serve.env["LACUNA_DATABASE_URL"], "PATH": "/usr/bin:/bin"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {row["event_id"]: (row["status"], row["attempts"]) for row in json.loads(listed.stdout)}


def test_sigterm_exits_0_releases_the_attempt_and_leaves_no_child(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SIGTERM with an attempt still running past LACUNA_SHUTDOWN_TIMEOUT: serve gives the
    claim back (pending, attempt uncounted), ends its writer and handler workers, exits 0."""
    out = tmp_path / "started.txt"
    serve = serve_factory(plugin_env(tmp_path, LACUNA_SHUTDOWN_TIMEOUT="1")).start()
    assert send(serve, "evt_hang_term").status_code == 200
    wait_until(lambda: "evt_hang_term" in started_ids(out), what="the attempt to start")
    kids = children(serve)
    assert len(kids) == 2, kids  # the SQLite writer and the handler's worker
    serve.signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0
    assert all(process_exited(pid) for pid in kids)
    assert stored_deliveries(serve, tmp_path) == {"evt_hang_term": ("pending", 0)}


def test_a_blocking_handler_that_finishes_during_the_stop_is_recorded_not_run_again(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Two attempts of a handler that blocks its loop for 2 s (the second waits behind the
    first), SIGTERM with LACUNA_SHUTDOWN_TIMEOUT=1: the cancellation cannot reach them, and
    both finish during the stop. Their outcomes used to be thrown away and the claims
    released (pending, attempts 0), so both ran again after the restart: one handler run
    twice for one event on a requested stop. Now what finishes is recorded."""
    out = tmp_path / "started.txt"
    env = plugin_env(tmp_path, LACUNA_SHUTDOWN_TIMEOUT="1", LACUNA_MISBEHAVING_BLOCK="2")
    serve = serve_factory(env).start()
    for event_id in ("evt_sleep_stop_a", "evt_sleep_stop_b"):
        assert send(serve, event_id).status_code == 200
    wait_until(lambda: started_ids(out), what="the first attempt to start")
    serve.signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0
    ran = set(started_ids(out))
    assert "evt_sleep_stop_a" in ran
    # What ran is recorded; what never started (its run and its cancel read together, after
    # the block) is given back, uncounted.
    assert stored_deliveries(serve, tmp_path) == {
        event_id: ("done", 1) if event_id in ran else ("pending", 0)
        for event_id in ("evt_sleep_stop_a", "evt_sleep_stop_b")
    }
    again = serve_factory(env).start()
    assert send(again, "evt_ok_after_stop").status_code == 200
    wait_until(
        lambda: set(stored_deliveries(again, tmp_path).values()) == {("done", 1)},
        what="every delivery done after the restart",
    )
    assert sorted(started_ids(out)) == ["evt_ok_after_stop", "evt_sleep_stop_a", "evt_sleep_stop_b"]


def test_the_shutdown_timeout_bounds_the_whole_stop(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A body trickling in (the HTTP drain waits for it) and an attempt that never ends:
    LACUNA_SHUTDOWN_TIMEOUT=6 used to be spent twice, the drain's then the dispatcher's
    (16.6 s here, 44 s at the default of 20, past Kubernetes' 40 s grace period). The
    dispatcher now gets what the drain left. A bound, not a measurement: 6 s, plus 3 s of
    slack for a busy machine (the worker here stops at once: its attempt yields)."""
    out = tmp_path / "started.txt"
    serve = serve_factory(plugin_env(tmp_path, LACUNA_SHUTDOWN_TIMEOUT="6")).start()
    assert send(serve, "evt_hang_stop").status_code == 200
    wait_until(lambda: "evt_hang_stop" in started_ids(out), what="the attempt to start")
    with socket.create_connection(("127.0.0.1", serve.port)) as trickle:
        trickle.sendall(b"POST /webhooks/lacuna HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{")
        began = time.monotonic()
        serve.signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        took = time.monotonic() - began
    assert took < 6 + 3, f"the stop took {took:.1f} s"


def test_sigterm_exits_0_when_a_handler_aclose_blocks(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A plugin whose aclose() blocks its event loop for an hour: SIGTERM still ends serve
    with 0 and no child left. serve used to close its own (unused) copy of each handler on
    its main loop at shutdown and hung there until SIGKILL."""
    out = tmp_path / "started.txt"
    env = plugin_env(tmp_path, LACUNA_SHUTDOWN_TIMEOUT="1", LACUNA_MISBEHAVING_ACLOSE_BLOCK="3600")
    serve = serve_factory(env).start()
    assert send(serve, "evt_ok_close").status_code == 200
    wait_until(lambda: "evt_ok_close" in started_ids(out), what="the attempt to start")
    kids = children(serve)
    serve.signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0
    assert all(process_exited(pid) for pid in kids)


def test_sigterm_exits_when_a_plugin_left_a_thread_in_serve(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A plugin that starts a non-daemon thread in __init__, stopped only by aclose(): serve
    built each handler once to check it and never closed that copy, and the interpreter
    waited for the thread forever after a clean stop (a second SIGTERM was ignored). That
    copy is now built in the check process, which ends with its thread: none is left in
    serve to warn about (``serve.threads_left``), and SIGTERM ends it with 0."""
    env = plugin_env(tmp_path, LACUNA_SHUTDOWN_TIMEOUT="1", LACUNA_MISBEHAVING_THREAD="1")
    serve = serve_factory(env).start()
    assert send(serve, "evt_ok_thread").status_code == 200
    serve.signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0
    assert "serve.threads_left" not in serve.log()


def test_a_process_forked_by_a_handler_does_not_hide_its_workers_death(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A handler forks a process that lives on for a minute holding every descriptor of
    its worker, then the worker exits: the death is seen at once (the exit of the process,
    not only the end of its socket), a new worker starts and later events are delivered.
    The forked copy held the socket open and nothing was delivered until it ended."""
    out = tmp_path / "started.txt"
    env = plugin_env(tmp_path, LACUNA_MISBEHAVING_BLOCK="90", LACUNA_RETRY_MAX_ATTEMPTS="1")
    serve = serve_factory(env).start()
    forked: list[int] = []
    try:
        assert send(serve, "evt_forkhold_1").status_code == 200
        wait_until(lambda: "forked_evt_forkhold_1" in started_ids(out), what="the fork")
        forked = pids_of(out, "forked_evt_forkhold_1")
        (first,) = pids_of(out, "evt_forkhold_1")
        assert send(serve, "evt_exit_1").status_code == 200
        wait_until(lambda: process_exited(first), what="the worker's exit")
        assert send(serve, "evt_after_fork").status_code == 200
        # Restart delays are 0.5 s and up: well within, and far below the forked 90 s.
        wait_until(lambda: "evt_after_fork" in started_ids(out), timeout=30, what="delivery")
        assert pids_of(out, "evt_after_fork")[0] != first
        assert "handler_worker.exited" in serve.log()
        serve.signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    finally:
        for pid in forked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_handler_killing_its_process_group_does_not_end_serve(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """`os.killpg(0, SIGTERM)` in a handler (meant for helpers it started): the worker's
    group was serve's, which drained and exited 0, and a unit restarting on failure left
    it down. Each child now has a process group of its own."""
    out = tmp_path / "started.txt"
    serve = serve_factory(plugin_env(tmp_path)).start()
    assert send(serve, "evt_killpg_1").status_code == 200
    wait_until(lambda: attempts_of(serve, "evt_killpg_1"), timeout=30, what="the outcome")
    assert serve.proc is not None
    assert serve.proc.poll() is None
    assert_intake_answers(serve, "after_killpg")
    assert send(serve, "evt_after_killpg").status_code == 200
    wait_until(lambda: "evt_after_killpg" in started_ids(out), timeout=30, what="delivery")


def test_outcomes_no_store_could_hold_are_recorded_escaped_or_without_their_result(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """An error naming a non-UTF-8 file (a lone surrogate) or holding a NUL, a result
    holding a NUL or of 10 MB: each attempt is recorded, once. The surrogate failed the
    worker's JSON wire (the worker was killed at the timeout and the attempt run again);
    a NUL failed PostgreSQL's record (the handler ran at every lease); a 10 MB result was
    parsed on the intake loop and stored."""
    out = tmp_path / "started.txt"
    serve = serve_factory(plugin_env(tmp_path, LACUNA_RETRY_MAX_ATTEMPTS="1")).start()
    ids = ["evt_surrogate_1", "evt_nul_1", "evt_nulresult_1", "evt_bigresult_1"]
    for event_id in ids:
        assert send(serve, event_id).status_code == 200
    for event_id in ids:
        wait_until(lambda e=event_id: attempts_of(serve, e), timeout=30, what=event_id)
    (surrogate,) = attempts_of(serve, "evt_surrogate_1")
    assert surrogate["error"] == "FileNotFoundError: /data/caf\\udce9.mp3"
    (nul,) = attempts_of(serve, "evt_nul_1")
    assert nul["error"] == "ValueError: upstream \\x00 failure"
    for event_id in ("evt_nulresult_1", "evt_bigresult_1"):
        (done,) = attempts_of(serve, event_id)
        assert done["outcome"] == "ok"
        assert started_ids(out).count(event_id) == 1
    assert serve.log().count("handler.result_not_stored") == 2


def test_worker_refuses_sqlite_with_one_line(tmp_path: Path) -> None:
    """On SQLite `worker` refuses (serve dispatches there, so the database keeps one writer)."""
    result = subprocess.run(
        [CLI, "worker"],
        env={
            "PATH": "/usr/bin:/bin",
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}",
            "LACUNA_HANDLERS": "log",
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lacuna-webhooks: error: `worker` needs PostgreSQL")


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (tmp_path / f"worker-{len(procs)}.log").open("ab") as log:  # the child keeps its own
            proc = subprocess.Popen(
                [CLI, "worker"],
                cwd=tmp_path,
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
                    "PYTHONPATH": str(REPO),
                    "LACUNA_LOG_FORMAT": "json",
                    **env,
                },
                stdout=log,
                stderr=log,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.mark.postgres
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_intake_and_dispatch_apart_on_postgres(
    serve_factory: type[Serve],
    worker_factory: Any,
    tmp_path: Path,
    postgres_dsn: str,
    signum: signal.Signals,
) -> None:
    """serve with LACUNA_DISPATCH=false only stores; `lacuna-webhooks worker` delivers what
    it stored (in a handler worker process of its own) and exits 0 on SIGTERM, and on SIGHUP
    (a closed terminal) alike."""
    out = tmp_path / "started.txt"
    env = {**plugin_env(tmp_path), "LACUNA_DATABASE_URL": postgres_dsn}
    serve = serve_factory({**env, "LACUNA_DISPATCH": "false"}).start()
    assert handler_workers(serve) == []
    assert send(serve, "evt_apart_1").status_code == 200
    worker = worker_factory({**env, "LACUNA_WEBHOOK_SECRET": TEST_SECRET})
    wait_until(lambda: "evt_apart_1" in started_ids(out), timeout=60, what="delivery by worker")
    assert send(serve, "evt_apart_2").status_code == 200
    wait_until(lambda: "evt_apart_2" in started_ids(out), timeout=60, what="second delivery")
    pid = pids_of(out, "evt_apart_1")[0]
    assert Path(f"/proc/{pid}/status").read_text().count(f"PPid:\t{worker.pid}") == 1
    worker.send_signal(signum)
    assert worker.wait(60) == 0
    wait_until(lambda: process_exited(pid), what="the worker's handler process to end")


def test_a_forged_start_failure_is_logged_bounded(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A plugin that, at import in its worker, writes a ``failed`` answer of 900 KB to that
    worker's socket: ``handler_worker.start_failed`` shows at most 2000 characters of it (the
    whole was one log line of 900 KB, once per restart)."""
    (tmp_path / "forged_start.py").write_text(
        "import re\n"
        "from pathlib import Path\n"
        "import orjson\n"
        "from tests.e2e.misbehaving_plugin import Misbehaving, write_to_parent\n"
        "if b'worker_child' in Path('/proc/self/cmdline').read_bytes():\n"
        "    data = orjson.dumps(['failed', 'F' * 900_000])\n"
        "    write_to_parent(len(data).to_bytes(4, 'big') + data)\n"
        "class Forged(Misbehaving):\n"
        "    name = 'misbehaving'\n"
    )
    serve = serve_factory(
        {
            **plugin_env(tmp_path, LACUNA_HANDLERS="forged_start:Forged"),
            "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
        }
    ).start()
    wait_until(lambda: "handler_worker.start_failed" in serve.log(), what="the start failure")
    (line, *_) = [line for line in serve.log().splitlines() if "start_failed" in line]
    assert "FFFF" in line
    assert len(line) < 3000


def test_serve_with_its_stderr_closed_starts_takes_webhooks_and_stops_0(tmp_path: Path) -> None:
    """``serve 2>&-``: configuring its logs on no stderr (``sys.stderr`` is ``None``) ended
    it at its start with exit 1. Now its lines, and what it relays of a flooding handler's
    worker, go to /dev/null; intake answers, and SIGTERM ends it with 0."""
    serve = Serve(tmp_path, plugin_env(tmp_path, LACUNA_MISBEHAVING_BLOCK="3"))
    serve.proc = subprocess.Popen(
        ["sh", "-c", f'exec "{CLI}" serve 2>&-'],
        cwd=tmp_path,
        env=serve.env,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: serve.proc is not None and (serve.proc.poll() is not None or ready(serve)),
            what="serve to be ready or to end",
        )
        assert serve.proc.poll() is None, f"serve exited with {serve.proc.returncode}"
        out = tmp_path / "started.txt"
        assert send(serve, "evt_flood_1").status_code == 200
        wait_until(lambda: "evt_flood_1" in started_ids(out), what="the flooding attempt")
        assert_intake_answers(serve, "stderr_closed", count=3)
        serve.signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    finally:
        serve.stop()


def ready(serve: Serve) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{serve.base_url}/readyz", timeout=1).status_code == 200
    return False


def test_a_flooding_handler_and_a_slow_reader_of_serves_output_stall_no_route(
    tmp_path: Path,
) -> None:
    """serve's stderr a pipe read slowly (into a slow program): the relay wrote a flooding
    handler's lines on serve's event loop, waiting for that reader each time, and /healthz
    took seconds. Now what stderr cannot take at once is dropped."""
    serve = Serve(tmp_path, plugin_env(tmp_path, LACUNA_MISBEHAVING_BLOCK="10"))
    serve.proc = subprocess.Popen(
        [CLI, "serve"], cwd=tmp_path, env=serve.env, stderr=subprocess.PIPE
    )
    err = serve.proc.stderr
    assert err is not None

    def read_slowly() -> None:
        with contextlib.suppress(OSError, ValueError):
            while err.read1(4096):
                time.sleep(0.05)  # about 80 KB/s

    threading.Thread(target=read_slowly, daemon=True).start()
    try:
        wait_until(lambda: ready(serve), what="serve to be ready")
        out = tmp_path / "started.txt"
        assert send(serve, "evt_flood_1").status_code == 200
        wait_until(lambda: "evt_flood_1" in started_ids(out), what="the flooding attempt")
        time.sleep(1)  # the pipe is full by now
        assert_intake_answers(serve, "slow_reader", count=10)
    finally:
        serve.proc.kill()
        serve.proc.wait()
        err.close()
