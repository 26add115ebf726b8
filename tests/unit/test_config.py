"""config.py: every variable validated at start; one error naming each bad variable."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lacuna_webhooks.config import (
    HANDLER_NAME_RE,
    Secret,
    Settings,
    read_setting,
    secret_problems,
)
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
        # Huge, tiny and odd numbers: each once passed and broke later (an overflow that
        # stopped the dispatcher or `serve`, a SQLite integer overflow, a busy loop).
        ("LACUNA_RETENTION_DAYS", "1e300"),
        ("LACUNA_HANDLER_TIMEOUT", "1e300"),
        ("LACUNA_RETRY_MAX_DELAY", "1e308"),
        ("LACUNA_RETRY_BASE_DELAY", "1e300"),
        ("LACUNA_RETRY_MAX_ATTEMPTS", "9" * 30),
        ("LACUNA_HANDLER_CONCURRENCY", "99999999999"),
        ("LACUNA_POLL_INTERVAL", "1e-320"),
        ("LACUNA_SHUTDOWN_TIMEOUT", "1e300"),
        ("LACUNA_WEBHOOK_TOLERANCE", "9" * 30),
        ("LACUNA_MAX_BODY_BYTES", "9" * 30),
        # The connection limits and timeouts: without a bound, a typo turned the header cap
        # or a timeout off (LACUNA_MAX_HEADER_BYTES=999999999999999999 took any header).
        ("LACUNA_KEEPALIVE_TIMEOUT", "1e300"),
        ("LACUNA_HEADER_TIMEOUT", "1e300"),
        ("LACUNA_BODY_TIMEOUT", "1e300"),
        ("LACUNA_COMMIT_TIMEOUT", "1e300"),
        ("LACUNA_MAX_HEADER_BYTES", "9" * 18),
        ("LACUNA_MAX_HEADERS", "9" * 18),
        ("LACUNA_MAX_CONNECTIONS", "9" * 18),
        ("LACUNA_WEBHOOK_TOLERANCE", "\uff11\uff12"),  # fullwidth digits: int() takes them
        ("PORT", "\u0668\u0660\u0660\u0660"),  # Arabic-Indic 8000
        ("LACUNA_MAX_BODY_BYTES", "1_000"),
        ("LACUNA_WEBHOOK_TOLERANCE", "--5"),
        ("LACUNA_ADMIN_PORT", "0"),
        ("LACUNA_ADMIN_PORT", "65536"),
        ("LACUNA_ADMIN_PORT", "admin"),
        ("LACUNA_ADMIN_SEARCH_BUDGET", "0"),
        ("LACUNA_ADMIN_SEARCH_BUDGET", "0.01"),
        ("LACUNA_ADMIN_SEARCH_BUDGET", "11"),
        ("LACUNA_ADMIN_SEARCH_BUDGET", "nan"),
        ("LACUNA_ADMIN_SEARCH_BUDGET", "half"),
        ("LACUNA_ADMIN_HOST", "http://127.0.0.1"),
        ("LACUNA_ADMIN_HOST", "a b"),
        # An empty or over-long DNS label was a raw UnicodeError traceback from the server.
        ("LACUNA_ADMIN_HOST", "not..a.host"),
        ("HOST", "not..a.host"),
        ("HOST", "a" * 64 + ".example"),
        ("HOST", "[127.0.0.1]"),  # brackets are for IPv6 literals
        ("HOST", "[not-an-address]"),
        # What the idna codec keeps but no host name holds: looked up, then "could not
        # listen" and exit 1, as if the network had failed, not the setting.
        ("HOST", ","),
        ("HOST", "a,b"),
        ("HOST", "host:8000"),
        ("HOST", "[::1"),
        ("HOST", "\x1b[31m"),
        ("LACUNA_ADMIN_HOST", "127.0.0.1,::1"),
        ("LACUNA_ADMIN_HOST", "a%b"),
        # float() takes "1_0" and other scripts' digits: 10 s, 3 s.
        ("LACUNA_HANDLER_TIMEOUT", "1_0"),
        ("LACUNA_POLL_INTERVAL", "\u0663"),
        ("LACUNA_COMMIT_TIMEOUT", "\uff15"),
        # Commas alone: read as no token, the admin API was silently off.
        ("LACUNA_ADMIN_TOKEN", ",,"),
    ],
)
def test_bad_values_name_their_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, var: value})
    assert any(p.startswith(var) for p in info.value.problems), info.value.problems


def test_bounds_are_inclusive_and_shown_as_typed() -> None:
    """The largest value of each bound is accepted; one past it names the bound as a user
    types it (``2592000``, not ``2.592e+06``)."""
    top = {
        "LACUNA_HANDLER_TIMEOUT": "86400",
        "LACUNA_RETRY_MAX_DELAY": "2592000",
        "LACUNA_POLL_INTERVAL": "0.01",
        "LACUNA_HANDLER_CONCURRENCY": "1000",
    }
    s = Settings.from_env({**BASE, **top})
    assert (s.handler_timeout_seconds, s.poll_interval_seconds) == (86400.0, 0.01)
    with pytest.raises(ConfigError, match="LACUNA_RETRY_MAX_DELAY must be at most 2592000,"):
        Settings.from_env({**BASE, "LACUNA_RETRY_MAX_DELAY": "2592001"})


def test_a_whole_number_with_thousands_of_leading_zeros_is_its_number() -> None:
    """int() counts leading zeros against its 4300 digits: ``PORT`` of 5000 zeros and 8080
    was refused in Python's own words ("Exceeds the limit (4300 digits) for integer string
    conversion ... sys.set_int_max_str_digits()"). It is 8080; past a bound, the bound's
    line."""
    zeros = "0" * 5000
    s = Settings.from_env({**BASE, "PORT": zeros + "8080", "LACUNA_MAX_HEADERS": zeros + "64"})
    assert (s.port, s.max_headers) == (8080, 64)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "PORT": zeros + "70000", "LACUNA_MAX_BODY_BYTES": zeros})
    problems = sorted(info.value.problems)
    assert len(problems) == 2, problems
    assert problems[0].startswith("LACUNA_MAX_BODY_BYTES must be greater than 0"), problems
    assert problems[1].startswith("PORT must be a port number from 1 to 65535"), problems
    assert not any("set_int_max_str_digits" in p for p in problems)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PORT": "x", "LACUNA_WEBHOOK_TOLERANCE": "y"})
    names = " ".join(info.value.problems)
    for var in ("LACUNA_WEBHOOK_SECRET", "PORT", "LACUNA_WEBHOOK_TOLERANCE"):
        assert var in names


def test_retry_cap_below_base_is_refused() -> None:
    with pytest.raises(ConfigError, match="LACUNA_RETRY_MAX_DELAY"):
        Settings.from_env({**BASE, "LACUNA_RETRY_BASE_DELAY": "10", "LACUNA_RETRY_MAX_DELAY": "1"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # A bad value is its own one line: the check across settings does not run on the
        # default it left (a retry base of 5 against a cap of 2 was a second, false line).
        (
            {"LACUNA_RETRY_BASE_DELAY": "abc", "LACUNA_RETRY_MAX_DELAY": "2"},
            "LACUNA_RETRY_BASE_DELAY",
        ),
        ({"LACUNA_RETRY_BASE_DELAY": "nan", "LACUNA_RETRY_MAX_DELAY": "2"}, "LACUNA_RETRY_BASE"),
        ({"LACUNA_RETRY_BASE_DELAY": "inf", "LACUNA_RETRY_MAX_DELAY": "2"}, "LACUNA_RETRY_BASE"),
        ({"LACUNA_RETRY_BASE_DELAY": "10", "LACUNA_RETRY_MAX_DELAY": "x"}, "LACUNA_RETRY_MAX"),
        ({"LACUNA_RETENTION_DAYS": "x", "LACUNA_WEBHOOK_TOLERANCE": "86400"}, "LACUNA_RETENTION"),
        ({"LACUNA_RETENTION_DAYS": "0.001", "LACUNA_WEBHOOK_TOLERANCE": "x"}, "LACUNA_WEBHOOK_TOL"),
        (
            {"LACUNA_DISPATCH": "false", "LACUNA_HANDLERS": "log", "LACUNA_DATABASE_URL": "x"},
            "LACUNA_DATABASE_URL",
        ),
        (
            {
                "LACUNA_DISPATCH": "false",
                "LACUNA_HANDLERS": "Bad Name!",
                "LACUNA_DATABASE_URL": "postgresql://u@db/hooks",
            },
            "LACUNA_HANDLERS",
        ),
        (
            {"LACUNA_ADMIN_TOKEN": "t" * 40, "LACUNA_ADMIN_PORT": "8000", "HOST": "not a host"},
            "HOST",
        ),
    ],
)
def test_a_cross_check_skips_a_value_that_failed_its_own(
    env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, **env})
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(expected)


def test_retention_shorter_than_four_signature_windows_is_refused() -> None:
    """Pruned sooner, an event's request replayed inside the signature window was accepted
    as new (`duplicate: false`) and its handlers ran again: twice the window for the
    request's own life, twice for replicas' clocks (an intake 55 s behind stamped the event
    early and a replica on time pruned it at twice a 60 s window)."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "LACUNA_RETENTION_DAYS": "0.0005"})
    assert info.value.problems == [
        "LACUNA_RETENTION_DAYS (0.0005) must keep events for at least four times "
        "LACUNA_WEBHOOK_TOLERANCE (1200 s), or a replayed request would be taken for a new "
        "event once the first was pruned (twice the signature window, and as much again for "
        "replicas' clocks that disagree)"
    ]
    for days in ("0.0013889", "0.0027"):  # 120 s and 233 s: under 4 x 60 s
        env = {**BASE, "LACUNA_RETENTION_DAYS": days, "LACUNA_WEBHOOK_TOLERANCE": "60"}
        with pytest.raises(ConfigError):
            Settings.from_env(env)
    env = {**BASE, "LACUNA_RETENTION_DAYS": "0.0028", "LACUNA_WEBHOOK_TOLERANCE": "60"}
    assert Settings.from_env(env).retention_days == 0.0028  # 241.9 s >= 240 s


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


# --- secrets from files (SPEC §10) and secrets that cannot be right ------------------------


def write(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_webhook_secret_from_a_file_loses_exactly_one_trailing_newline(tmp_path: Path) -> None:
    """The file form gives the same secrets as the variable; one newline is stripped."""
    path = write(tmp_path, "secret", b"whsec_new,whsec_old\n")
    s = Settings.from_env({"LACUNA_WEBHOOK_SECRET_FILE": path})
    assert s.secret_values == ("whsec_new", "whsec_old")
    assert s.secret_warnings == ()
    assert read_setting({"X_FILE": write(tmp_path, "two", b"a\n\n")}, "X") == "a\n"
    assert read_setting({"X_FILE": write(tmp_path, "crlf", b"a\r\n")}, "X") == "a"
    assert read_setting({"X_FILE": write(tmp_path, "bare", b" a ")}, "X") == " a "


def test_a_blank_variable_counts_as_unset(tmp_path: Path) -> None:
    """Compose's `${VAR:-}` gives an empty value: that is not 'both forms set'."""
    path = write(tmp_path, "secret", b"whsec_file\n")
    env = {"LACUNA_WEBHOOK_SECRET": " ", "LACUNA_WEBHOOK_SECRET_FILE": path}
    assert Settings.from_env(env).secret_values == ("whsec_file",)
    assert read_setting({"X": "", "X_FILE": ""}, "X") is None


def test_both_forms_set_is_one_line_naming_both(tmp_path: Path) -> None:
    env = {
        "LACUNA_WEBHOOK_SECRET": "whsec_env",
        "LACUNA_WEBHOOK_SECRET_FILE": write(tmp_path, "s", b"whsec_file"),
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.problems == [
        "LACUNA_WEBHOOK_SECRET and LACUNA_WEBHOOK_SECRET_FILE are both set: keep one of them"
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read .*: No such file or directory"),
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"whsec_\xff\xfe", "is not UTF-8 text"),
        (b"whsec_" + b"x" * 70_000, "is larger than 64 KiB"),
    ],
)
def test_an_unusable_file_is_one_line_without_its_content(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = str(tmp_path / "missing") if content is None else write(tmp_path, "s", content)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LACUNA_WEBHOOK_SECRET_FILE": path})
    (problem,) = info.value.problems
    assert problem.startswith("LACUNA_WEBHOOK_SECRET_FILE: ")
    assert path in problem
    assert re.search(reason, problem)
    assert "whsec_" not in problem


def test_a_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"LACUNA_DATABASE_URL_FILE: .* Is a directory"):
        Settings.from_env({**BASE, "LACUNA_DATABASE_URL_FILE": str(tmp_path)})


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_refused_without_hanging(tmp_path: Path, kind: str) -> None:
    # A FIFO named by mistake used to block the start forever in open() (no writer ever came).
    if kind == "fifo":
        path = str(tmp_path / "secret.fifo")
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    with pytest.raises(ConfigError, match=r"LACUNA_WEBHOOK_SECRET_FILE: .* is not a regular file"):
        Settings.from_env({"LACUNA_WEBHOOK_SECRET_FILE": path})


def test_database_url_from_a_file(tmp_path: Path) -> None:
    url = "postgresql://lacuna:pw@db:5432/lacuna"
    path = write(tmp_path, "url", url.encode() + b"\n")
    assert Settings.from_env({**BASE, "LACUNA_DATABASE_URL_FILE": path}).database_url == url


def test_admin_tokens_are_validated_for_the_admin_api(tmp_path: Path) -> None:
    """LACUNA_ADMIN_TOKEN(_FILE): comma-separated, each at least 32 characters (SPEC §9)."""
    good = "t" * 32
    s = Settings.from_env(
        {**BASE, "LACUNA_ADMIN_TOKEN_FILE": write(tmp_path, "a", b"%s\n" % good.encode())}
    )
    assert [t.reveal() for t in s.admin_tokens] == [good]
    assert good not in repr(s)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "LACUNA_ADMIN_TOKEN": f"{good},short"})
    assert info.value.problems == [
        "LACUNA_ADMIN_TOKEN must hold tokens of at least 32 characters each (too short: #2)"
    ]
    assert Settings.from_env(BASE).admin_tokens == ()


@pytest.mark.parametrize("token", ["é" * 40, "t" * 20 + " " + "t" * 20, "t" * 39 + "\x7f"])
def test_an_admin_token_no_header_can_carry_stops_serve(token: str) -> None:
    """The CLI's rule for --token is serve's for LACUNA_ADMIN_TOKEN (config.is_admin_token_text):
    40 x `é` started serve, whose console sign-in worked while every Bearer call was a 401."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "LACUNA_ADMIN_TOKEN": f"{'t' * 32},{token}"})
    assert info.value.problems == [
        "LACUNA_ADMIN_TOKEN must hold tokens of printable ASCII without spaces (an "
        "Authorization header carries nothing else) (not so: #2)"
    ]
    assert token not in str(info.value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"whsec_abc"', "is wrapped in quotes"),
        ("'whsec_abc'", "is wrapped in quotes"),
        ('whsec_abc"', "starts or ends with a quote character"),
        ("whsec_abc ", "leading or trailing whitespace"),
        ("whsec_ab c", "contains whitespace"),
        ("whsec_ab\x00c", "contains control characters"),
    ],
)
def test_a_secret_that_cannot_be_right_is_warned_about(value: str, problem: str) -> None:
    """Settings carry (variable, problem) pairs; the problem never quotes the secret."""
    s = Settings.from_env({"LACUNA_WEBHOOK_SECRET": value})
    assert any(
        var == "LACUNA_WEBHOOK_SECRET" and problem in text for var, text in s.secret_warnings
    ), s.secret_warnings
    assert all("whsec_ab" not in text for _, text in s.secret_warnings)


def test_rotating_secrets_are_checked_one_by_one() -> None:
    """Spaces around the commas are separators, not a problem; a quoted one is named by position."""
    s = Settings.from_env({"LACUNA_WEBHOOK_SECRET": 'whsec_new, "whsec_old"'})
    assert s.secret_warnings == (
        (
            "LACUNA_WEBHOOK_SECRET",
            "secret 2 of 2 is wrapped in quotes, which are used as part of the secret "
            "(an env-file loader may have kept them)",
        ),
    )
    assert secret_problems("whsec_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH") == []


@pytest.mark.parametrize("name", ["slack\n", "slack\nx", "Slack", "9lives", "a" * 41, "sl-ack"])
def test_handler_names_are_matched_whole(name: str) -> None:
    """No trailing newline slips through (``$`` would let ``slack\\n`` pass), with match too."""
    assert HANDLER_NAME_RE.match(name) is None
    assert HANDLER_NAME_RE.fullmatch(name) is None
    assert HANDLER_NAME_RE.fullmatch("slack_2")


def test_dispatch_is_on_by_default_and_off_only_on_postgres() -> None:
    """LACUNA_DISPATCH=false makes serve intake only; on SQLite (one writer, no `worker`)
    that would leave nothing to deliver, so it is refused naming the variable."""
    assert Settings.from_env(BASE).dispatch is True
    pg = {
        **BASE,
        "LACUNA_DATABASE_URL": "postgresql://db/x",
        "LACUNA_DISPATCH": "false",
        "LACUNA_HANDLERS": "log",
    }
    assert Settings.from_env(pg).dispatch is False
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "LACUNA_DISPATCH": "false", "LACUNA_HANDLERS": "log"})
    assert info.value.problems == [
        "LACUNA_DISPATCH=false needs PostgreSQL: on SQLite only `serve` may dispatch "
        "(the database has one writer), so nothing would ever deliver"
    ]
    with pytest.raises(ConfigError, match="LACUNA_DISPATCH must be true or false"):
        Settings.from_env({**BASE, "LACUNA_DISPATCH": "maybe"})


def test_intake_only_without_handlers_is_refused() -> None:
    """Deliveries are made at intake, one per handler it is configured with: an intake-only
    `serve` (LACUNA_DISPATCH=false) with no LACUNA_HANDLERS answered 200 to every event and
    gave it no delivery, so the workers never ran it."""
    pg = {**BASE, "LACUNA_DATABASE_URL": "postgresql://db/x", "LACUNA_DISPATCH": "false"}
    with pytest.raises(ConfigError) as info:
        Settings.from_env({k: v for k, v in pg.items() if k != "LACUNA_HANDLERS"})
    assert info.value.problems == [
        "LACUNA_DISPATCH=false needs LACUNA_HANDLERS, the same list as the workers': "
        "each event's deliveries are made here, at intake, one per handler it names"
    ]
    assert Settings.from_env({**pg, "LACUNA_HANDLERS": "log"}).handlers == ("log",)


ADMIN = {**BASE, "LACUNA_ADMIN_TOKEN": "t" * 32}


def test_admin_listener_settings() -> None:
    """LACUNA_ADMIN_HOST / LACUNA_ADMIN_PORT default to loopback:8001 (SPEC §9)."""
    s = Settings.from_env(ADMIN)
    assert (s.admin_host, s.admin_port) == ("127.0.0.1", 8001)
    s = Settings.from_env({**ADMIN, "LACUNA_ADMIN_HOST": " ::1 ", "LACUNA_ADMIN_PORT": "9001"})
    assert (s.admin_host, s.admin_port) == ("::1", 9001)


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("[::1]", "::1"),
        ("[::]", "::"),
        (" [0:0::1] ", "::1"),
        ("0:0::1", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ],
)
def test_a_bracketed_ipv6_host_is_the_address(value: str, host: str) -> None:
    """HOST=[::1] (as written in a URL) passed the check with its brackets, and binding then
    failed with "Name or service not known"; it is the address itself."""
    s = Settings.from_env({**ADMIN, "HOST": value, "LACUNA_ADMIN_HOST": value, "PORT": "8000"})
    assert (s.host, s.admin_host) == (host, host)


def test_admin_search_budget() -> None:
    """LACUNA_ADMIN_SEARCH_BUDGET: seconds, 0.5 by default, 0.05 to 10 inclusive."""
    assert Settings.from_env(ADMIN).admin_search_budget_seconds == 0.5
    for given, seconds in [("0.05", 0.05), ("10", 10.0), (" 2 ", 2.0)]:
        s = Settings.from_env({**ADMIN, "LACUNA_ADMIN_SEARCH_BUDGET": given})
        assert s.admin_search_budget_seconds == seconds


@pytest.mark.parametrize(
    ("host", "port", "admin_host", "admin_port"),
    [
        ("127.0.0.1", "9000", "127.0.0.1", "9000"),
        ("0.0.0.0", "9000", "127.0.0.1", "9000"),
        ("10.0.0.1", "8001", "::", ""),
        ("0.0.0.0", "8001", "", ""),
    ],
)
def test_admin_port_on_the_webhook_socket_is_refused(
    host: str, port: str, admin_host: str, admin_port: str
) -> None:
    """With a token set, the admin listener on the webhook listener's socket is a bad
    setting, reported with the others; without a token there is no admin listener."""
    env = {**ADMIN, "HOST": host, "PORT": port, "LACUNA_WEBHOOK_TOLERANCE": "x"}
    env |= {
        k: v for k, v in [("LACUNA_ADMIN_HOST", admin_host), ("LACUNA_ADMIN_PORT", admin_port)] if v
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    problems = " ".join(info.value.problems)
    assert "LACUNA_ADMIN_PORT must differ from PORT" in problems
    assert "LACUNA_WEBHOOK_TOLERANCE" in problems
    env.pop("LACUNA_ADMIN_TOKEN")
    env.pop("LACUNA_WEBHOOK_TOLERANCE")
    Settings.from_env(env)


def test_admin_port_beside_the_webhook_port() -> None:
    """Same port on two distinct addresses, or distinct ports: fine."""
    Settings.from_env({**ADMIN, "HOST": "10.0.0.1", "PORT": "8001"})
    Settings.from_env({**ADMIN, "HOST": "0.0.0.0", "PORT": "8000"})


@pytest.mark.parametrize(
    "url", ["postgresql://", "postgresql://db.example:5432", "postgres://u:pw-x@db/"]
)
def test_a_postgres_url_naming_no_database_is_refused(url: str) -> None:
    """`postgresql://` connected through the driver's defaults (a local socket, a database
    named after the user) and applied the migrations into that unrelated database."""
    with pytest.raises(ConfigError, match="names no database") as info:
        Settings.from_env({**BASE, "LACUNA_DATABASE_URL": url})
    assert "pw-x" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["postgresql:///events", "postgresql://db/events", "postgresql://db?dbname=events"]
)
def test_a_postgres_url_naming_its_database_is_taken(url: str) -> None:
    assert Settings.from_env({**BASE, "LACUNA_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize("value", ["127.0.0.0/33", "garbage", "10.0.0.1,proxy.local", "*,10.0.0.1"])
def test_a_trusted_proxy_that_is_no_address_is_refused(value: str) -> None:
    """uvicorn keeps such an entry as a literal no client ever matches: a typo silently
    stopped trusting the proxy (every webhook behind it refused by the source allowlist)."""
    with pytest.raises(ConfigError, match="LACUNA_TRUSTED_PROXIES") as caught:
        Settings.from_env({**BASE, "LACUNA_TRUSTED_PROXIES": value})
    assert len(str(caught.value).splitlines()) == 1


def test_trusted_proxies_are_normalized_for_uvicorn() -> None:
    """A network written with host bits (10.0.0.1/8) is a literal to uvicorn's strict parse;
    it is handed on as the network it means."""
    s = Settings.from_env({**BASE, "LACUNA_TRUSTED_PROXIES": " 10.0.0.1/8, ::1 ,192.0.2.7"})
    assert s.trusted_proxies == "10.0.0.0/8,::1,192.0.2.7"
    assert Settings.from_env({**BASE, "LACUNA_TRUSTED_PROXIES": "*"}).trusted_proxies == "*"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LACUNA_WEBHOOK_SECRET", "whsec_\udcff\udcfeabcdefghijklmn"),
        ("LACUNA_ADMIN_TOKEN", "t" * 40 + "\udcff"),
        ("LACUNA_TRUSTED_PROXIES", "a\udcffb"),
        ("LACUNA_LOG_LEVEL", "\udcff"),
    ],
)
def test_a_setting_that_is_not_utf8_is_one_line_naming_it(var: str, value: str) -> None:
    """Bytes that are not UTF-8 reach Python's environment as lone surrogates; the secret's
    was a traceback (UnicodeEncodeError) at the first signature check. Never echoed."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, var: value})
    message = str(caught.value)
    assert f"{var} is not valid UTF-8 text" in message
    assert "\udcff" not in message


def test_a_sqlite_url_with_a_query_is_refused() -> None:
    """`sqlite:///x.db?mode=ro` created a file named `x.db?mode=ro`: the SQLite store takes
    no URL options, so a query or a fragment is refused."""
    for url in ("sqlite:///x.db?mode=ro", "sqlite:////tmp/x.db#a"):
        with pytest.raises(ConfigError, match=r"LACUNA_DATABASE_URL .*no \? or #"):
            Settings.from_env({**BASE, "LACUNA_DATABASE_URL": url})


@pytest.mark.parametrize(
    ("var", "value", "floor"),
    [
        ("LACUNA_RETRY_BASE_DELAY", "1e-320", "0.001"),
        ("LACUNA_HEADER_TIMEOUT", "1e-9", "0.1"),
        ("LACUNA_BODY_TIMEOUT", "0.05", "0.1"),
        ("LACUNA_KEEPALIVE_TIMEOUT", "0.001", "0.1"),
        ("LACUNA_COMMIT_TIMEOUT", "0.01", "0.1"),
        ("LACUNA_MAX_HEADER_BYTES", "1", "1024"),
        ("LACUNA_MAX_HEADERS", "3", "8"),
    ],
)
def test_numbers_below_any_working_value_are_refused(var: str, value: str, floor: str) -> None:
    """Accepted before: a retry delay of 1e-320 s retried a failing peer as fast as the loop
    could; a header timeout of 1e-9 s or a 1-byte header limit refused every request."""
    with pytest.raises(ConfigError, match=re.escape(f"{var} must be at least {floor}, got")):
        Settings.from_env({**BASE, var: value})
    Settings.from_env({**BASE, var: floor})  # the floor itself is allowed


def test_an_instance_retry_delay_has_the_global_floor() -> None:
    from lacuna_webhooks.plugins import build_handlers

    env = {"LACUNA_APP_RETRY_BASE_DELAY": "1e-320"}
    with pytest.raises(ConfigError, match=r"LACUNA_APP_RETRY_BASE_DELAY must be at least 0\.001"):
        build_handlers(["app=log"], env)


def test_unknown_lacuna_variables_are_named_with_a_hint() -> None:
    """LACUNA_HANDLER=log (singular) started serve with no handler and no word; each
    LACUNA_* variable nothing can read is named with the closest known name, and the
    settings of handlers not configured are listed apart; never a value, never an empty
    (unset) variable."""
    from lacuna_webhooks.config import unknown_variables

    environ = {
        "LACUNA_HANDLER": "log",
        "LACUNA_WEBHOOK_TOLERENCE": "600",
        "LACUNA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/secret",
        "LACUNA_STORAGE_URL": "",  # empty is unset, as .env.example has it
        "LACUNA_TEAM_A_URL": "x",  # a setting of a configured instance: known
        "LACUNA_WEBHOOK_SECRET_FILE": "/run/secret",  # a _FILE form: known
        "LACUNA_ZZZZZZZZ": "1",
        "LACUNA_TEST_POSTGRES_DSN": "postgresql://localhost/test",  # the test suite's own
        "LACUNA_CONSOLE_SCREENSHOTS": "shots",  # docs/console.md
        "NOT_OURS": "1",
        "LACUNA_LOG_LEVEL": "info",
    }
    unknown, unused = unknown_variables(environ, ["team_a"], ["log", "slack", "storage"])
    assert unknown == [
        ("LACUNA_HANDLER", "did you mean LACUNA_HANDLERS?"),
        ("LACUNA_WEBHOOK_TOLERENCE", "did you mean LACUNA_WEBHOOK_TOLERANCE?"),
        ("LACUNA_ZZZZZZZZ", "no setting has this name"),
    ]
    assert unused == ["LACUNA_SLACK_WEBHOOK_URL"]


def test_global_variables_lists_every_name_the_package_reads() -> None:
    """GLOBAL_VARIABLES (what the unknown-variable warning knows) holds every quoted
    LACUNA_* name in the package's source: a new setting cannot be warned about as unknown."""
    from pathlib import Path

    import lacuna_webhooks
    from lacuna_webhooks.config import GLOBAL_VARIABLES

    root = Path(lacuna_webhooks.__file__).parent
    read = set()
    for source in root.rglob("*.py"):
        read |= set(re.findall(r"[\"'](LACUNA_[A-Z0-9_]+)[\"']", source.read_text()))
    assert read, "no name found: the pattern no longer matches the source"
    read = {name for name in read if not name.endswith("_")}  # a prefix (LACUNA_TEST_)
    known = GLOBAL_VARIABLES | {f"{v}_FILE" for v in GLOBAL_VARIABLES}
    assert read <= known, sorted(read - GLOBAL_VARIABLES)


@pytest.mark.parametrize(("host", "admin"), [("0:0::1", "::1"), ("::ffff:127.0.0.1", "127.0.0.1")])
def test_one_address_spelt_two_ways_clashes(host: str, admin: str) -> None:
    """HOST=0:0::1 and LACUNA_ADMIN_HOST=::1 on one port were two strings, not one address:
    serve started, logged the admin listener, and its API answered 404 from the webhook app."""
    with pytest.raises(ConfigError, match="LACUNA_ADMIN"):
        Settings.from_env({**ADMIN, "HOST": host, "PORT": "8001", "LACUNA_ADMIN_HOST": admin})
