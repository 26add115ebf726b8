"""config.py: every variable validated at start; one error naming each bad variable."""

from __future__ import annotations

import pytest

from lacuna_webhooks.config import Secret, Settings
from lacuna_webhooks.errors import ConfigError

BASE = {"LACUNA_WEBHOOK_SECRET": "whsec_a"}


def test_defaults_match_the_spec() -> None:
    s = Settings.from_env(BASE)
    assert s.secret_values == ("whsec_a",)
    assert s.tolerance_seconds == 300
    assert s.max_body_bytes == 1_048_576
    assert s.database_url == "sqlite:///./lacuna-webhooks.db"
    assert s.handlers == ()
    assert (s.host, s.port) == ("0.0.0.0", 8000)
    assert (s.retry_max_attempts, s.retry_base_delay_seconds, s.retry_max_delay_seconds) == (
        10,
        5.0,
        3600.0,
    )
    assert s.allow_private_urls is False


def test_several_secrets_while_rotating() -> None:
    s = Settings.from_env({"LACUNA_WEBHOOK_SECRET": "whsec_new, whsec_old ,"})
    assert s.secret_values == ("whsec_new", "whsec_old")


def test_secrets_never_show_in_repr() -> None:
    s = Settings.from_env(BASE)
    assert "whsec_a" not in repr(s)
    assert "whsec_a" not in str(Secret("whsec_a"))


def test_missing_secret_is_one_clear_problem() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("LACUNA_WEBHOOK_SECRET is not set")


def test_secret_optional_for_admin_commands() -> None:
    assert Settings.from_env({}, require_secret=False).webhook_secrets == ()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LACUNA_WEBHOOK_TOLERANCE", "abc"),
        ("LACUNA_WEBHOOK_TOLERANCE", "-1"),
        ("LACUNA_MAX_BODY_BYTES", "0"),
        ("LACUNA_MAX_BODY_BYTES", "1.5"),
        ("LACUNA_DATABASE_URL", "mysql://x"),
        ("LACUNA_DATABASE_URL", "sqlite:///"),
        ("PORT", "70000"),
        ("PORT", "http"),
        ("LACUNA_RETRY_MAX_ATTEMPTS", "0"),
        ("LACUNA_RETRY_BASE_DELAY", "nan"),
        ("LACUNA_RETRY_MAX_DELAY", "inf"),
        ("LACUNA_ALLOW_PRIVATE_URLS", "maybe"),
        ("LACUNA_HANDLERS", "Slack"),
        ("LACUNA_HANDLERS", "log,log"),
        ("LACUNA_LOG_FORMAT", "xml"),
        ("LACUNA_SQLITE_SYNCHRONOUS", "off"),
        ("LACUNA_RETENTION_DAYS", "0"),
    ],
)
def test_bad_values_name_their_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, var: value})
    assert any(p.startswith(var) for p in info.value.problems), info.value.problems


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PORT": "x", "LACUNA_WEBHOOK_TOLERANCE": "y"})
    names = " ".join(info.value.problems)
    for var in ("LACUNA_WEBHOOK_SECRET", "PORT", "LACUNA_WEBHOOK_TOLERANCE"):
        assert var in names


def test_retry_cap_below_base_is_refused() -> None:
    with pytest.raises(ConfigError, match="LACUNA_RETRY_MAX_DELAY"):
        Settings.from_env({**BASE, "LACUNA_RETRY_BASE_DELAY": "10", "LACUNA_RETRY_MAX_DELAY": "1"})


def test_fractional_delays_and_booleans() -> None:
    s = Settings.from_env(
        {
            **BASE,
            "LACUNA_RETRY_BASE_DELAY": "0.25",
            "LACUNA_RETRY_MAX_DELAY": "1.5",
            "LACUNA_ALLOW_PRIVATE_URLS": "TRUE",
            "LACUNA_HANDLERS": " log , my.pkg:Handler ",
            "LACUNA_DATABASE_URL": "postgresql://u@h/db",
        }
    )
    assert (s.retry_base_delay_seconds, s.retry_max_delay_seconds) == (0.25, 1.5)
    assert s.allow_private_urls is True
    assert s.handlers == ("log", "my.pkg:Handler")
    assert s.database_url == "postgresql://u@h/db"


def test_empty_handlers_means_none() -> None:
    assert Settings.from_env({**BASE, "LACUNA_HANDLERS": ""}).handlers == ()


def test_dispatch_is_on_by_default_and_off_only_on_postgres() -> None:
    """LACUNA_DISPATCH=false makes serve intake only; on SQLite (one writer, no `worker`)
    that would leave nothing to deliver, so it is refused naming the variable."""
    assert Settings.from_env(BASE).dispatch is True
    pg = {**BASE, "LACUNA_DATABASE_URL": "postgresql://db/x", "LACUNA_DISPATCH": "false"}
    assert Settings.from_env(pg).dispatch is False
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "LACUNA_DISPATCH": "false"})
    assert info.value.problems == [
        "LACUNA_DISPATCH=false needs PostgreSQL: on SQLite only `serve` may dispatch "
        "(the database has one writer), so nothing would ever deliver"
    ]
    with pytest.raises(ConfigError, match="LACUNA_DISPATCH must be true or false"):
        Settings.from_env({**BASE, "LACUNA_DISPATCH": "maybe"})
