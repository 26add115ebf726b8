"""No secret in any log line or stored error of a real ``serve`` (issue 10, part 3).

``serve`` runs every built-in handler (``storage`` to S3 on moto and, as ``archive``,
to a folder; ``slack`` to a local server at a secret path; ``email`` through aiosmtpd
logging in with a password, and, as ``mail2``, with a wrong one; ``log``), on
PostgreSQL with a password in its URL, at the default log level and at DEBUG.
Events succeed and fail (audio answering 500 and 401, Slack answering 500, 429 and
403, a refused SMTP login, an unsigned request), then every line ``serve`` wrote
(stdout and stderr) and every stored error (``events show --json``, ``deliveries list
--json``) is searched for every secret value, as written and URL-encoded.

Then the start-up failures: a bad database URL, an unreachable database, a malformed
S3 endpoint, a malformed SMTP URL each end ``serve`` with exactly one line, naming the
variable, with neither the secret nor a traceback.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import make_event, signed
from tests.e2e.conftest import CLI, Serve, free_port, wait_until
from tests.integration.servers import (  # noqa: F401 - fixtures
    SMTP_PASSWORD,
    SMTP_USER,
    S3Server,
    SMTPServer,
    TLSAuthority,
    moto_endpoint_fixture,
    smtp_starttls_fixture,
    tls_ca_fixture,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

WEBHOOK_SECRET = "whsec_e2eWebhookSecret0001"
SLACK_PATH = "/services/T0E2E/B0E2E/SlackPathSecret0001"
AUDIO_TOKEN = "AudioTokenSecret0001"
S3_KEY_ID = "AKIAE2ES3KEYID0001"
S3_SECRET_KEY = "e2e/S3SecretAccessKey+0001"
DB_PASSWORD = "DbPassSecret0001"
WRONG_SMTP_PASSWORD = "WrongSmtpPassword0001"
SECRETS = (
    WEBHOOK_SECRET,
    SLACK_PATH,
    "SlackPathSecret0001",
    AUDIO_TOKEN,
    S3_KEY_ID,
    S3_SECRET_KEY,
    DB_PASSWORD,
    SMTP_PASSWORD,
    WRONG_SMTP_PASSWORD,
)
AUDIO = b"ID3" + bytes(range(256)) * 64


def assert_no_secret(text: str, where: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            assert form not in text, f"{form!r} appears in {where}"


def slack_peer(request: Request) -> Response:
    """Slack's answers by the event the message is about (its id is in the context block)."""
    body = request.get_data(as_text=True)
    if "evt_slack500" in body:
        return Response("internal_error", status=500)
    if "evt_slack429" in body:
        return Response("rate_limited", status=429, headers={"Retry-After": "1"})
    if "evt_slack403" in body:
        return Response("invalid_token", status=403)
    return Response("ok")


def audio_peer(request: Request) -> Response:
    """Audio behind a signed-URL token: 401 without it; ``/audio/boom.mp3`` answers 500."""
    if request.args.get("token") != AUDIO_TOKEN or request.path == "/audio/denied.mp3":
        return Response("bad token", status=401)
    if request.path == "/audio/boom.mp3":
        return Response("boom", status=500)
    return Response(AUDIO, content_type="audio/mpeg")


def cli(env: Mapping[str, str], *args: str) -> str:
    done = subprocess.run(
        [CLI, *args], env=dict(env), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("log_level", ["default", "debug"])
def test_no_secret_in_any_log_line_or_stored_error(
    serve_factory: type[Serve],
    tmp_path: Path,
    httpserver: HTTPServer,
    moto_endpoint: str,
    smtp_starttls: SMTPServer,
    tls_ca: TLSAuthority,
    postgres_dsn: str,
    log_level: str,
) -> None:
    """Successes and failures of every handler leave no secret value in the output."""
    s3 = S3Server(moto_endpoint, f"secrets-{log_level}", S3_KEY_ID, S3_SECRET_KEY)
    s3.client().create_bucket(Bucket=s3.bucket)
    httpserver.expect_request(SLACK_PATH, method="POST").respond_with_handler(slack_peer)
    for name in ("ok", "boom", "denied"):
        httpserver.expect_request(f"/audio/{name}.mp3").respond_with_handler(audio_peer)
    user, _, rest = postgres_dsn.partition("://")[2].partition("@")
    db_url = f"postgresql://{user.split(':')[0] or 'postgres'}:{DB_PASSWORD}@{rest}"
    env = {
        "LACUNA_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LACUNA_DATABASE_URL": db_url,
        "LACUNA_HANDLERS": (
            "log,storage,slack,email,"
            "tests.e2e.second_handlers:ArchiveStorage,tests.e2e.second_handlers:SecondEmail"
        ),
        "LACUNA_ALLOW_PRIVATE_URLS": "true",  # every peer lives on 127.0.0.1
        "LACUNA_RETRY_MAX_ATTEMPTS": "2",
        "LACUNA_RETRY_BASE_DELAY": "0.2",
        "LACUNA_RETRY_MAX_DELAY": "1",
        **s3.env("e2e"),
        "LACUNA_ARCHIVE_URL": (tmp_path / "archive").as_uri(),
        "LACUNA_SLACK_WEBHOOK_URL": httpserver.url_for(SLACK_PATH),
        "LACUNA_EMAIL_SMTP_URL": smtp_starttls.url(),
        "LACUNA_EMAIL_CA_FILE": tls_ca.ca_file,
        "LACUNA_EMAIL_FROM": "Lacuna <lacuna@example.com>",
        "LACUNA_EMAIL_TO": "team@example.com",
        "LACUNA_MAIL2_SMTP_URL": smtp_starttls.url(user=SMTP_USER, password=WRONG_SMTP_PASSWORD),
        "LACUNA_MAIL2_CA_FILE": tls_ca.ca_file,
        "LACUNA_MAIL2_FROM": "Lacuna <lacuna@example.com>",
        "LACUNA_MAIL2_TO": "team@example.com",
        **({"LACUNA_LOG_LEVEL": "debug"} if log_level == "debug" else {}),
    }
    assert (
        SMTP_PASSWORD in env["LACUNA_EMAIL_SMTP_URL"]
        or quote(SMTP_PASSWORD, safe="") in (env["LACUNA_EMAIL_SMTP_URL"])
    )
    serve = serve_factory(env).start()

    def audio(name: str) -> str:
        return httpserver.url_for(f"/audio/{name}.mp3") + f"?token={AUDIO_TOKEN}"

    events: list[dict[str, Any]] = []
    for event_id, track in (
        ("evt_allgood", "ok"),
        ("evt_slack500", "boom"),
        ("evt_slack429", "denied"),
    ):
        event = make_event(event_id, task_id=f"cm_{event_id}")
        event["data"]["tracks"][0]["audio_url"] = audio(track)
        events.append(event)
    events.append(make_event("evt_slack403", "job.failed", task_id="cm_failed"))
    for event in events:
        body, headers = signed(event, WEBHOOK_SECRET)
        response = httpx.post(serve.webhook_url, content=body, headers=headers)
        assert response.status_code == 200, response.text
    body, headers = signed(make_event("evt_forged"), "whsec_not_the_right_one")
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 401

    cli_env = {**serve.env}

    def settled() -> bool:
        listed = json.loads(cli(cli_env, "deliveries", "list", "--json", "--limit", "100"))
        # log, slack, email, mail2: every event; storage, archive: the three job.completed
        return len(listed) == 4 * 4 + 3 * 2 and all(d["status"] in {"done", "dead"} for d in listed)

    wait_until(settled, timeout=60, what="every delivery done or dead")
    deliveries = json.loads(cli(cli_env, "deliveries", "list", "--json", "--limit", "100"))
    by_key = {(d["event_id"], d["handler"]): d for d in deliveries}
    # The failures this test is about did happen, and were recorded with an error.
    expected = {
        ("evt_allgood", "storage"): "done",
        ("evt_allgood", "archive"): "done",
        ("evt_allgood", "slack"): "done",
        ("evt_allgood", "email"): "done",
        ("evt_allgood", "mail2"): "dead",  # the wrong password
        ("evt_slack500", "slack"): "dead",
        ("evt_slack500", "storage"): "dead",  # audio 500
        ("evt_slack429", "slack"): "dead",
        ("evt_slack429", "archive"): "dead",  # audio 401
        ("evt_slack403", "slack"): "dead",
        ("evt_slack403", "email"): "done",
    }
    for key, status in expected.items():
        assert by_key[key]["status"] == status, by_key[key]
        assert (by_key[key]["last_error"] is None) == (status == "done"), by_key[key]
    assert s3.read("e2e/cm_evt_allgood/trk_01.mp3") == AUDIO
    assert (tmp_path / "archive" / "cm_evt_allgood" / "trk_01.mp3").read_bytes() == AUDIO

    stored = cli(cli_env, "deliveries", "list", "--json", "--limit", "100")
    stored += cli(cli_env, "deliveries", "list", "--limit", "100")
    for event in events:
        shown = json.loads(cli(cli_env, "events", "show", event["id"], "--json"))
        # The payload is the sender's own (its audio URL carries the token Lacuna gave it);
        # what we wrote is everything else.
        shown.pop("payload")
        stored += json.dumps(shown)
        text = cli(cli_env, "events", "show", event["id"])
        stored += text.partition("\npayload\n")[0]
    assert "HTTP 500" in stored
    assert "HTTP 429" in stored
    assert "HTTP 403" in stored
    assert "535" in stored  # the SMTP server refused the login
    assert_no_secret(stored, "the stored errors")

    serve.stop()
    log = serve.log()
    assert "handler.slack.refused" in log
    assert "delivery" in log
    if log_level == "debug":
        assert '"level":"debug"' in log
    assert "Traceback" not in log
    assert_no_secret(log, f"serve's output at log level {log_level}")


# --- start-up failures ---------------------------------------------------------------------

STARTUP_SECRET = "StartupSecret0001"


def unreachable_db() -> str:
    return f"postgresql://app:{STARTUP_SECRET}@127.0.0.1:{free_port()}/app"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {"LACUNA_DATABASE_URL": f"postgress://u:{STARTUP_SECRET}@db.internal/app"},
            "LACUNA_DATABASE_URL",
        ),
        (
            {"LACUNA_DATABASE_URL": f"postgresql://u:x/{STARTUP_SECRET}@127.0.0.1/app"},
            "LACUNA_DATABASE_URL",
        ),
        (
            {"LACUNA_DATABASE_URL": f"postgresql://u:{STARTUP_SECRET}@127.0.0.1:port/app"},
            "LACUNA_DATABASE_URL",
        ),
        ({"LACUNA_DATABASE_URL": unreachable_db()}, "LACUNA_DATABASE_URL"),
        (
            {
                "LACUNA_HANDLERS": "storage",
                "LACUNA_STORAGE_URL": "s3://bucket/prefix",
                "LACUNA_STORAGE_S3_ENDPOINT": "http://[::1",
                "AWS_ACCESS_KEY_ID": "AKIASTARTUP0001",
                "AWS_SECRET_ACCESS_KEY": STARTUP_SECRET,
            },
            "LACUNA_STORAGE_S3_ENDPOINT",
        ),
        (
            {
                "LACUNA_HANDLERS": "storage",
                "LACUNA_STORAGE_URL": "s3://bucket/prefix",
                "AWS_ENDPOINT_URL": f"http://minio:{STARTUP_SECRET}@127.0.0.1:99999",
            },
            "AWS_ENDPOINT_URL",
        ),
        (
            {
                "LACUNA_HANDLERS": "email",
                "LACUNA_EMAIL_SMTP_URL": f"smtp://u:{STARTUP_SECRET}@[::1:25",
                "LACUNA_EMAIL_FROM": "a@example.com",
                "LACUNA_EMAIL_TO": "b@example.com",
            },
            "LACUNA_EMAIL_SMTP_URL",
        ),
        (
            {
                "LACUNA_HANDLERS": "slack",
                "LACUNA_SLACK_WEBHOOK_URL": f"ftp://hooks.example/services/{STARTUP_SECRET}",
            },
            "LACUNA_SLACK_WEBHOOK_URL",
        ),
    ],
    ids=[
        "mistyped-db-scheme",
        "slash-in-db-password",
        "bad-db-port",
        "unreachable-db",
        "s3-endpoint-unclosed-bracket",
        "s3-endpoint-credentials-bad-port",
        "smtp-url-unclosed-bracket",
        "slack-url-wrong-scheme",
    ],
)
def test_a_startup_failure_is_one_line_without_the_secret(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    full_env = {
        **Serve(tmp_path, {}).env,
        "LACUNA_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        **env,
    }
    done = subprocess.run(
        [CLI, "serve"], env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode in (1, 2), output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("lacuna-webhooks: error: "), output
    assert variable in output
    assert "Traceback" not in output
    assert_no_secret(output, "the error line", (STARTUP_SECRET, WEBHOOK_SECRET))
