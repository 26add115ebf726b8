"""``lacuna-webhooks handlers pause|resume NAME`` and the paused state in ``handlers``, in-process
against a real SQLite file; the pause is what a dispatcher reads from that file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lacuna_webhooks.cli import main
from lacuna_webhooks.store import HandlerState, open_store


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Two configured handlers over a migrated, empty SQLite store."""
    environ = {
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'flow.db'}",
        "LACUNA_HANDLERS": "log,slack",
    }
    assert main(["migrate"], environ) == 0
    return environ


def paused(env: dict[str, str]) -> dict[str, HandlerState]:
    async def read() -> dict[str, HandlerState]:
        store = open_store(env["LACUNA_DATABASE_URL"])
        await store.open()
        try:
            return await store.paused_handlers()
        finally:
            await store.close()

    return asyncio.run(read())


def test_pause_then_resume(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """pause persists the handler's pause with the reason (a second pause says so), handlers
    shows it, resume clears it (a second resume says so)."""
    capsys.readouterr()
    assert main(["handlers", "pause", "slack", "--reason", "Slack outage"], env) == 0
    assert "paused slack" in capsys.readouterr().out
    assert paused(env)["slack"].reason == "Slack outage"
    assert main(["handlers", "pause", "slack"], env) == 0
    assert capsys.readouterr().out.strip() == "slack was already paused"

    # slack's own settings are missing here: the listing says so and exits 2 (as serve would
    # refuse to start), and still shows each instance's state.
    assert main(["handlers"], env) == 2
    out = capsys.readouterr().out
    assert "LACUNA_SLACK_WEBHOOK_URL is required" in out
    assert "  log          running\n" in out
    assert "  slack        paused since " in out
    assert out.rstrip().endswith(": Slack outage")

    assert main(["handlers", "resume", "slack"], env) == 0
    assert "resumed slack" in capsys.readouterr().out
    assert paused(env) == {}
    assert main(["handlers", "resume", "slack"], env) == 0
    assert capsys.readouterr().out.strip() == "slack was not paused"


def test_pause_default_reason(env: dict[str, str]) -> None:
    """Without --reason the pause is recorded as an operator's."""
    assert main(["handlers", "pause", "log"], env) == 0
    assert paused(env)["log"].reason == "paused by an operator"


@pytest.mark.parametrize("action", ["pause", "resume"])
def test_unknown_handler_is_one_line_exit_2(
    action: str, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A name not in LACUNA_HANDLERS: one clear line naming the configured ones, exit 2,
    nothing written."""
    capsys.readouterr()
    assert main(["handlers", action, "slak"], env) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "lacuna-webhooks: error: no handler 'slak' in LACUNA_HANDLERS (configured: log, slack)\n"
    )
    assert captured.out == ""
    assert paused(env) == {}


def test_pause_needs_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`handlers pause` without a name is argparse's one line, exit 2."""
    with pytest.raises(SystemExit) as exited:
        main(["handlers", "pause"], {})
    assert exited.value.code == 2
    assert "name" in capsys.readouterr().err


def test_handlers_without_a_store_still_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no database yet the configured handlers are listed with their state unknown."""
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}", "LACUNA_HANDLERS": "log"}
    assert main(["handlers"], env) == 0
    assert "  log          state unknown (no database at" in capsys.readouterr().out


def test_serve_refuses_a_bad_flow_setting_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad RATE_LIMIT or PAUSE_AFTER_FAILURES stops serve before it listens: one line, exit 2."""
    env = {
        "LACUNA_WEBHOOK_SECRET": "whsec_test",
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "LACUNA_HANDLERS": "log",
        "LACUNA_LOG_RATE_LIMIT": "fast",
    }
    assert main(["serve"], env) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "LACUNA_LOG_RATE_LIMIT must be N/s, N/m or N/h" in err
    assert not (tmp_path / "serve.db").exists()


@pytest.mark.parametrize("reason", ["", "   ", "x" * 1001, "a\x00b"])
def test_a_pause_reason_the_api_refuses_the_cli_refuses(
    reason: str, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--reason` is checked by the admin API's rule (models.pause_reason_problem: 1 to 1000
    characters, no NUL): '' and 2000 characters were stored. One line, exit 2, no pause."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["handlers", "pause", "log", "--reason", reason], env)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --reason: must " in err
    assert paused(env) == {}


def test_a_reason_of_1000_characters_is_kept(env: dict[str, str]) -> None:
    assert main(["handlers", "pause", "log", "--reason", "x" * 1000], env) == 0
    assert paused(env)["log"].reason == "x" * 1000
