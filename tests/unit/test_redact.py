"""redact.py: URLs cut to their host, secret values from the environment masked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lacuna_webhooks import redact
from lacuna_webhooks.redact import (
    MASK,
    mask_secrets,
    redact_text,
    redact_url,
    remember_secrets,
    secret_values,
)


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """``remember_secrets`` is process-wide: each test starts and ends with none."""
    saved = redact._known, redact._known_re
    redact._known, redact._known_re = (), None
    yield
    redact._known, redact._known_re = saved


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T0/B0/XXXX", "https://hooks.slack.com/…"),
        ("https://user:pw@api.example:8443/x?y=1#z", "https://api.example:8443/…"),
        ("https://cdn.example?X-Amz-Signature=abc", "https://cdn.example/…"),
        ("https://cdn.example#token=abc", "https://cdn.example/…"),
        ("https://cdn.example/", "https://cdn.example"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://[2606:4700::1111]:443/a", "https://[2606:4700::1111]:443/…"),
        ("postgress://u:hunter2@db.internal/app", "postgress://db.internal/…"),
        # an unescaped "/" in a password: what precedes it is no host
        ("postgresql://u:hun/ter2@db/app", "postgresql://…"),
        ("postgresql://u:1234/5678@db/app", "postgresql://…"),
        ("http://u:pw@host:notaport/x", "http://…"),
        ("https://a.example\\@evil.example/x", "https://…"),
        ("s3://bucket/prefix/key.mp3?versionId=1", "s3://bucket/prefix/key.mp3"),
        ("file:///srv/audio/t1/a.mp3", "file:///srv/audio/t1/a.mp3"),
        ("no scheme here", "…"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """Only scheme, host and port remain (file/s3 keep their path); never userinfo, path,
    query or fragment; anything that does not parse as a host hides the whole rest."""
    assert redact_url(url) == shown


def test_redact_text_redacts_every_url_in_free_text() -> None:
    text = (
        "GET https://cdn.example/a.mp3?token=s3cr3t failed; then "
        "'https://hooks.slack.com/services/T/B/X' said 404"
    )
    assert redact_text(text) == (
        "GET https://cdn.example/… failed; then 'https://hooks.slack.com/…' said 404"
    )


def test_remembered_secrets_are_masked_wherever_they_appear() -> None:
    remember_secrets(["hunter2-long", "short", "whsec_abc123xyz"])
    assert mask_secrets("auth failed for hunter2-long (whsec_abc123xyz)") == (
        f"auth failed for {MASK} ({MASK})"
    )
    # shorter than MIN_SECRET_CHARS: not remembered (it would garble ordinary text)
    assert mask_secrets("a short line") == "a short line"
    assert redact_text("x hunter2-long y") == f"x {MASK} y"


def test_a_secret_containing_another_is_masked_whole() -> None:
    remember_secrets(["abcdef", "abcdefghij"])
    assert mask_secrets("abcdefghij") == MASK


def test_secret_values_finds_every_kind_of_secret_in_the_environment() -> None:
    env = {
        "LACUNA_WEBHOOK_SECRET": "whsec_one, whsec_two",
        "LACUNA_EMAIL_SMTP_URL": "smtp://mailer:p%40ss%3Aword@127.0.0.1:25?starttls=true",
        "LACUNA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/XYZSECRET",
        "LACUNA_DATABASE_URL": "postgresql://app:dbpass99@db/app?sslmode=require",
        "LACUNA_AMQP_URL": "amqp://guest:brokerpw1@127.0.0.1/?auth_token=tok123456",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "aws/secret+key",
        "AWS_SESSION_TOKEN": "sessiontoken",
        "LACUNA_STORAGE_URL": "file:///srv/audio",
        "LACUNA_LOG_LEVEL": "info",
        "HOME": "/root",
        "DB_PASSWORD": "not ours",
    }
    found = secret_values(env)
    for value in (
        "whsec_one",
        "whsec_two",
        "p%40ss%3Aword",
        "p@ss:word",
        "/services/T0/B0/XYZSECRET",
        "https://hooks.slack.com/services/T0/B0/XYZSECRET",
        "dbpass99",
        "brokerpw1",
        "tok123456",
        "AKIAEXAMPLE",
        "aws/secret+key",
        "sessiontoken",
    ):
        assert value in found, value
    for value in ("/srv/audio", "require", "true", "info", "/root", "not ours", "app"):
        assert value not in found, value


def test_secret_values_of_a_url_that_does_not_parse() -> None:
    """A URL ``urlsplit`` refuses (an unclosed IPv6 bracket) still gives its userinfo."""
    found = secret_values({"LACUNA_DATABASE_URL": "postgresql://u:pw-in-bad-url@[::1/db"})
    assert "pw-in-bad-url" in found


def test_secret_values_read_from_files(tmp_path: Path) -> None:
    """``LACUNA_WEBHOOK_SECRET_FILE`` and the like: the file's content is the secret."""
    (tmp_path / "secret").write_text("whsec_from_a_file\n")
    (tmp_path / "slack").write_text("https://hooks.slack.com/services/T/B/FromFileSecret\n")
    found = secret_values(
        {
            "LACUNA_WEBHOOK_SECRET_FILE": str(tmp_path / "secret"),
            "LACUNA_SLACK_WEBHOOK_URL_FILE": str(tmp_path / "slack"),
            "LACUNA_EMAIL_CA_FILE": str(tmp_path / "missing.pem"),
        }
    )
    assert "whsec_from_a_file" in found
    assert "/services/T/B/FromFileSecret" in found


def test_a_sqlite_url_keeps_its_path() -> None:
    """A SQLite URL holds no credentials: its path is what tells the operator which file
    (`dev` prints it; it was shown as `sqlite:///…`)."""
    assert redact_url("sqlite:///./lacuna-webhooks.db") == "sqlite:///./lacuna-webhooks.db"
    assert redact_url("sqlite:////var/lib/lacuna/w.db?x=1") == "sqlite:////var/lib/lacuna/w.db"


def test_a_url_password_gives_its_basic_authorization_token_too() -> None:
    """A client sends a URL's user and password as `Authorization: Basic base64(user:pw)`
    (decoded from the URL), which a peer may echo: masked like the password itself."""
    import base64

    from lacuna_webhooks.redact import secret_values

    found = secret_values({"LACUNA_HTTP_URL": "https://us%20er:p%40ssw0rd-x@hooks.example/in"})
    assert base64.b64encode(b"us er:p@ssw0rd-x").decode() in found
    assert "p@ssw0rd-x" in found


def test_printable_json_escapes_as_json_does_and_keeps_the_values() -> None:
    import json

    from lacuna_webhooks.redact import printable_json, printable_lines

    value = {"a": "\x1b\x9b\x7f\u2028\U000e0001 é", "b": [1, 2]}
    text = json.dumps(value, ensure_ascii=False, indent=2)
    shown = printable_json(text)
    assert shown.isprintable() is False  # the indentation's newlines stay
    assert all(c.isprintable() or c in "\n " for c in shown)
    assert json.loads(shown) == value
    assert printable_json('{"a":\r\n1}') == '{"a":\n\n1}'
    assert printable_lines("a\x1b\r\nb") == "a\\x1b\\r\nb"
