"""Broker handler settings are checked at start: one clear line naming the variable.

Also: the missing-extra line, instance names (``LACUNA_<NAME>_*``), and the pure
helpers each broker relies on (subject check, FIFO ids, Redis marker keys).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.handlers.base import HandlerContext
from lacuna_webhooks.handlers.brokers._shared import scrub
from lacuna_webhooks.handlers.brokers.nats import NatsHandler, subject_problem
from lacuna_webhooks.handlers.brokers.rabbitmq import RabbitMQHandler
from lacuna_webhooks.handlers.brokers.redis import RedisHandler, marker_key
from lacuna_webhooks.handlers.brokers.sqs import SQSHandler, fifo_id
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import build_handlers
from tests.conftest import make_event


def ctx(name: str, **settings: str) -> HandlerContext:
    return HandlerContext(
        name=name, environ={f"LACUNA_{name.upper()}_{k}": v for k, v in settings.items()}
    )


def config_error(factory: object, context: HandlerContext) -> str:
    with pytest.raises(ConfigError) as caught:
        factory(context)  # type: ignore[operator]
    assert len(caught.value.problems) == 1
    return caught.value.problems[0]


@pytest.mark.parametrize(
    ("factory", "key", "url"),
    [
        (NatsHandler, "URL", "http://127.0.0.1:4222"),
        (RabbitMQHandler, "URL", "redis://127.0.0.1"),
        (RedisHandler, "URL", "amqp://127.0.0.1"),
        (SQSHandler, "QUEUE_URL", "ftp://queue"),
    ],
)
def test_a_url_with_the_wrong_scheme_is_one_line_naming_the_variable(
    factory: object, key: str, url: str
) -> None:
    """Each broker accepts only its own schemes; the message names LACUNA_<NAME>_<KEY>."""
    message = config_error(factory, ctx("out", **{key: url, "REGION": "eu-west-1"}))
    assert message.startswith(f"LACUNA_OUT_{key} must start with")


@pytest.mark.parametrize("factory", [NatsHandler, RabbitMQHandler, RedisHandler])
def test_a_missing_url_is_required(factory: object) -> None:
    """No URL: one line saying the variable is required."""
    assert config_error(factory, ctx("bus")) == (
        "LACUNA_BUS_URL is required by the bus handler (or LACUNA_BUS_URL_FILE naming a file)"
    )


def test_a_password_in_a_bad_url_is_never_echoed() -> None:
    """The error for a bad URL shows it redacted (scheme and host), never the password."""
    message = config_error(RedisHandler, ctx("redis", URL="http://user:hunter2pw@cache:6379/0"))
    assert "hunter2pw" not in message
    assert "http://cache:6379/…" in message


def test_scrub_removes_passwords_and_full_urls() -> None:
    url = "amqp://app:s3cr3tpw@mq.internal:5672/prod"
    text = f"cannot connect to {url}; auth s3cr3tpw refused"
    assert "s3cr3tpw" not in scrub(text, url)


@pytest.mark.parametrize(
    ("factory", "key", "template", "shown"),
    [
        (NatsHandler, "SUBJECT", "lacuna.{event}", "{event}"),
        (RabbitMQHandler, "ROUTING_KEY", "lacuna.{type!r}", "{type!r}"),
        (RedisHandler, "STREAM", "lacuna:{task_id:>10}", "{task_id:>10}"),
        (RedisHandler, "STREAM", "lacuna:{0}", "{0}"),
    ],
)
def test_an_unknown_placeholder_is_one_line_naming_the_variable(
    factory: object, key: str, template: str, shown: str
) -> None:
    """Only {type} and {task_id} are replaced; anything else names the variable and the
    placeholder."""
    urls = {NatsHandler: "nats://h:4222", RabbitMQHandler: "amqp://h", RedisHandler: "redis://h"}
    message = config_error(factory, ctx("out", URL=urls[factory], **{key: template}))  # type: ignore[index]
    assert message.startswith(f"LACUNA_OUT_{key} has the placeholder {shown}")


def test_unbalanced_braces_are_a_config_error() -> None:
    message = config_error(NatsHandler, ctx("nats", URL="nats://h", SUBJECT="lacuna.{type"))
    assert message.startswith("LACUNA_NATS_SUBJECT is not a valid template")


def test_a_subject_template_that_can_never_be_valid_fails_at_start() -> None:
    """An empty token or a wildcard in the template itself is caught before any event."""
    message = config_error(NatsHandler, ctx("nats", URL="nats://h", SUBJECT="lacuna..{type}"))
    assert message.startswith("LACUNA_NATS_SUBJECT gives an invalid name")
    message = config_error(NatsHandler, ctx("nats", URL="nats://h", SUBJECT="lacuna.>"))
    assert "wildcard" in message


def test_nats_takes_a_comma_separated_cluster() -> None:
    """Several servers: each is checked; a bad one is named redacted."""
    handler = NatsHandler(ctx("nats", URL="nats://a:4222, nats://u:pw@b:4222"))
    assert handler.servers == ["nats://a:4222", "nats://u:pw@b:4222"]
    message = config_error(NatsHandler, ctx("nats", URL="nats://a:4222,http://u:pw@b:80"))
    assert message == "LACUNA_NATS_URL must start with nats:// or tls://, got http://b:80"


@pytest.mark.parametrize("url", [",", " , ,"])
def test_nats_urls_naming_no_server_are_refused(url: str) -> None:
    """`,` passed the start as an empty cluster, and every attempt then waited on an empty
    server pool until its timeout."""
    message = config_error(NatsHandler, ctx("nats", URL=url))
    assert message == "LACUNA_NATS_URL names no server"


def test_literal_braces_are_kept() -> None:
    handler = RedisHandler(ctx("redis", URL="redis://h", STREAM="{{app}}:{type}"))
    assert handler.stream.render_values("job.completed", "t") == "{app}:job.completed"


def test_sqs_without_any_region_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No REGION, none in the AWS configuration, none in the URL: one line naming REGION."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing"))
    message = config_error(SQSHandler, ctx("sqs", QUEUE_URL="http://127.0.0.1:9324/1/q"))
    assert message.startswith("LACUNA_SQS_REGION is required")
    handler = SQSHandler(
        ctx("sqs", QUEUE_URL="https://sqs.eu-west-3.amazonaws.com/123456789012/q.fifo")
    )
    assert handler.region == "eu-west-3"
    assert handler.fifo


def test_build_handlers_reads_the_instance_name_prefix() -> None:
    """The four are entry points; each reads LACUNA_<its name>_* (today name = kind)."""
    handlers = build_handlers(
        ["nats", "rabbitmq", "redis", "sqs"],
        {
            "LACUNA_NATS_URL": "nats://127.0.0.1:4222",
            "LACUNA_NATS_SUBJECT": "app.{task_id}",
            "LACUNA_RABBITMQ_URL": "amqp://127.0.0.1",
            "LACUNA_REDIS_URL": "redis://127.0.0.1",
            "LACUNA_SQS_QUEUE_URL": "http://127.0.0.1:1/1/q",
            "LACUNA_SQS_REGION": "eu-west-1",
        },
    )
    assert handlers.names == ["nats", "rabbitmq", "redis", "sqs"]
    nats_handler = handlers.handlers["nats"]
    assert isinstance(nats_handler, NatsHandler)
    assert nats_handler.subject.text == "app.{task_id}"


def test_a_missing_extra_is_one_line_with_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without nats-py installed, naming nats gives one line saying which extra to install."""
    monkeypatch.setitem(sys.modules, "nats", None)  # makes `import nats` fail like a missing one
    monkeypatch.delitem(sys.modules, "lacuna_webhooks.handlers.brokers.nats")
    with pytest.raises(ConfigError) as caught:
        build_handlers(["nats"], {"LACUNA_NATS_URL": "nats://127.0.0.1:4222"})
    assert caught.value.problems == [
        "the nats handler needs the nats-py library: pip install 'lacuna-webhooks[nats]' "
        "(or [brokers] for every broker handler)"
    ]


@pytest.mark.parametrize(
    ("subject", "ok"),
    [
        ("lacuna.job.completed", True),
        ("lacuna.job completed", False),
        ("lacuna.*", False),
        ("lacuna.a>b", False),
        ("lacuna..x", False),
        (".lacuna", False),
        ("lacuna.\x00", False),
    ],
)
def test_subject_problem(subject: str, ok: bool) -> None:
    assert (subject_problem(subject) is None) is ok


def test_fifo_ids_are_kept_when_valid_and_hashed_otherwise() -> None:
    """SQS allows 128 of A-Za-z0-9 and punctuation; anything else becomes a stable hash."""
    assert fifo_id("evt_01J9Z:abc-1") == "evt_01J9Z:abc-1"
    hashed = fifo_id("evt with spaces")
    assert hashed == fifo_id("evt with spaces")
    assert len(hashed) == 64
    assert fifo_id("x" * 129) != "x" * 129


@pytest.mark.parametrize(
    ("event_type", "sent"),
    [
        ("job.completed", "job.completed"),
        ("job.\u00e9t\u00e9 \U0001f3b5", "job.\u00e9t\u00e9 \U0001f3b5"),  # SQS takes these
        ("job.\x1b[31mcompleted", "job.%1B[31mcompleted"),
        ("job.\x08\x0bdone", "job.%08%0Bdone"),
        ("job.\uffffdone", "job.%EF%BF%BFdone"),
    ],
)
def test_sqs_attributes_hold_only_characters_sqs_takes(event_type: str, sent: str) -> None:
    """SendMessage refuses a String attribute value with a character outside #x9, #xA, #xD,
    #x20-#xD7FF, #xE000-#xFFFD, #x10000-#x10FFFF (as for the body). Intake takes any
    non-blank type without NUL: an ESC or U+FFFF in it made SQS refuse the message, and the
    accepted event ended dead. Such a value goes percent-encoded (header_text); the body is
    the event's bytes."""
    handler = SQSHandler(ctx("sqs", QUEUE_URL="https://sqs.eu-west-3.amazonaws.com/1/q.fifo"))
    # Written with escapes (ensure_ascii), as a sender may: the body is text SQS takes.
    event = Event.from_body(json.dumps(make_event("evt_sqs_\ufffe", event_type)).encode())
    assert event.raw.isascii()
    params = handler.request(event)
    attributes = params["MessageAttributes"]
    assert attributes["event_type"]["StringValue"] == sent
    assert attributes["event_id"]["StringValue"] == "evt_sqs_%EF%BF%BE"
    assert params["MessageBody"].encode() == event.raw
    assert params["MessageDeduplicationId"] == fifo_id(event.id)


def test_marker_keys_cannot_collide_across_streams() -> None:
    assert marker_key("a", "b:c") != marker_key("a:b", "c")
    assert marker_key("s", "e") == marker_key("s", "e")


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("DEDUPE_TTL", "1" + "0" * 15, "must be at most 316224000, got '1000000000000000'"),
        ("MAXLEN", "1" + "0" * 15, "must be at most 1000000000000, got '1000000000000000'"),
        ("DEDUPE_TTL", "1_000", "must be a whole number, got '1_000'"),
    ],
)
def test_redis_numbers_are_bounded(key: str, value: str, problem: str) -> None:
    """A DEDUPE_TTL past Redis's range used to start, then fail every publish."""
    message = config_error(RedisHandler, ctx("bus", URL="redis://127.0.0.1", **{key: value}))
    assert message == f"LACUNA_BUS_{key} {problem}"


@pytest.mark.parametrize(
    ("config", "profile"),
    [("LACUNA_WEBHOOK_SECRET=whsec_x\n[ broken\n", None), ("[default]\n", "nobody")],
    ids=["unparsable", "unknown-profile"],
)
def test_sqs_with_an_unreadable_aws_configuration_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: str, profile: str | None
) -> None:
    """An AWS_CONFIG_FILE that does not parse (a .env file given by mistake) or an
    AWS_PROFILE it does not hold: a ConfigError naming the handler, not botocore's
    exception (a traceback at start)."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    if profile is not None:
        monkeypatch.setenv("AWS_PROFILE", profile)
    message = config_error(SQSHandler, ctx("sqs", QUEUE_URL="http://127.0.0.1:9324/1/q"))
    assert message.startswith("the sqs handler cannot read the AWS configuration: ")
    assert "whsec_x" not in message


@pytest.mark.parametrize(
    ("factory", "settings", "variables"),
    [
        (
            NatsHandler,
            {"URL": "http://127.0.0.1:4222", "SUBJECT": "{bad}", "CONNECT_TIMEOUT": "x"},
            ["URL", "SUBJECT", "CONNECT_TIMEOUT"],
        ),
        (
            RabbitMQHandler,
            {
                "URL": "redis://127.0.0.1",
                "EXCHANGE": "e" * 256,
                "ROUTING_KEY": "{bad}",
                "READ_TIMEOUT": "x",
            },
            ["URL", "EXCHANGE", "ROUTING_KEY", "READ_TIMEOUT"],
        ),
        (
            RedisHandler,
            {
                "URL": "amqp://127.0.0.1",
                "STREAM": "{bad}",
                "MAXLEN": "x",
                "DEDUPE_TTL": "0",
                "CONNECT_TIMEOUT": "x",
            },
            ["URL", "STREAM", "MAXLEN", "DEDUPE_TTL", "CONNECT_TIMEOUT"],
        ),
        (
            SQSHandler,
            {
                "QUEUE_URL": "ftp://queue",
                "ENDPOINT": "ftp://sqs",
                "REGION": "eu-west-1",
                "READ_TIMEOUT": "x",
            },
            ["QUEUE_URL", "ENDPOINT", "READ_TIMEOUT"],
        ),
    ],
    ids=["nats", "rabbitmq", "redis", "sqs"],
)
def test_every_bad_setting_is_reported_at_once(
    factory: object, settings: dict[str, str], variables: list[str]
) -> None:
    """docs/configuration.md: every bad value of a handler's own settings is reported at
    start, one line each; the broker handlers used to stop at the first."""
    with pytest.raises(ConfigError) as caught:
        factory(ctx("bus", **settings))  # type: ignore[operator]
    named = [line.split()[0].rstrip(":") for line in caught.value.problems]
    assert named == [f"LACUNA_BUS_{key}" for key in variables], caught.value.problems
