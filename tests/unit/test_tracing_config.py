"""When tracing is on (tracing_config.trace_exporters): the standard OTEL_* variables."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.tracing_config import SdkSettings, load_tracing, sdk_settings, trace_exporters

ENDPOINT = "http://collector:4318"


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, ()),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/v1/traces"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),  # the SDK's default endpoint
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "console, otlp,console"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ()),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "zipkin"}, ()),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ("otlp",)),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            ("otlp",),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",  # for the other signals
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            ("otlp",),
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("console",)),
    ],
)
def test_which_exporters(env: dict[str, str], exporters: tuple[str, ...]) -> None:
    assert trace_exporters(env) == exporters


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: zipkin is not available"),
        ({"OTEL_TRACES_EXPORTER": "otlp,jaeger"}, "OTEL_TRACES_EXPORTER: jaeger"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: grpc is not available",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: http/json",
        ),
        # A malformed endpoint started tracing, and every export logged "Invalid URL".
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "nan"}, "OTEL_EXPORTER_OTLP_ENDPOINT must be an http"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:99999/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT has a port that is not a number",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a b"},
            "OTEL_EXPORTER_OTLP_ENDPOINT holds a space",
        ),
        # Anything but "true" is false to the SDK: a typo left tracing on, silently.
        (
            {"OTEL_SDK_DISABLED": "yes", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT},
            "OTEL_SDK_DISABLED must be true or false",
        ),
    ],
)
def test_what_cannot_be_honoured_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trace_exporters(env)


@pytest.mark.parametrize("variable", ["CERTIFICATE", "TRACES_CLIENT_KEY", "CLIENT_CERTIFICATE"])
def test_certificate_files_must_be_readable_regular_files(tmp_path: Path, variable: str) -> None:
    """A FIFO named as the collector's certificate hung the start (the SDK opens it); a
    missing file ended it with a traceback. Each is now one line naming the variable."""
    name = f"OTEL_EXPORTER_OTLP_{variable}"
    fifo = tmp_path / "cert.fifo"
    os.mkfifo(fifo)
    good = tmp_path / "ca.pem"
    good.write_text("-----BEGIN CERTIFICATE-----\n")
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}
    assert trace_exporters({**base, name: str(good)}) == ("otlp",)
    for path, reason in [
        (fifo, "is not a regular file"),
        (tmp_path, "is not a regular file"),
        (tmp_path / "missing.pem", "cannot read"),
    ]:
        with pytest.raises(ConfigError) as err:
            trace_exporters({**base, name: str(path)})
        assert str(err.value).startswith(f"{name}: "), err.value
        assert reason in str(err.value)
    assert trace_exporters({"OTEL_SDK_DISABLED": "true", name: str(fifo)}) == ()
    assert trace_exporters({name: str(fifo)}) == ()  # tracing off: not the exporter's file


HUGE = "9" * 5000  # int() of it raises past Python's 4300 digits
# Non-numbers, out of range, and what int()/float() accept but a setting must not.
HOSTILE_WHOLE = ["abc", "-1", HUGE, "1\x00", "\u0663", "1_0", "1.5", "0x10"]


@pytest.mark.parametrize("value", [*HOSTILE_WHOLE, "0", "3600001"])
@pytest.mark.parametrize(
    "name", ["OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]
)
def test_batch_numbers_are_whole_numbers_in_range(name: str, value: str) -> None:
    """The SDK answered a non-number with a logged traceback and its default, a zero or a
    negative one with a traceback at start, and took "1_0" as 10 and "\u0663" as 3."""
    with pytest.raises(ConfigError) as err:
        trace_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, name: value})
    assert str(err.value).startswith(f"{name} must be a whole number of "), err.value
    assert "\n" not in str(err.value)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("value", [*HOSTILE_WHOLE, "3600001"])
def test_the_batch_export_timeout_is_a_whole_number_from_0(value: str) -> None:
    with pytest.raises(ConfigError, match="OTEL_BSP_EXPORT_TIMEOUT must be a whole number"):
        trace_exporters({"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_EXPORT_TIMEOUT": value})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # The SDK's own default batch (512) over a smaller queue: a traceback at start.
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "100"}, r"BATCH_SIZE \(512 when unset\) must be at most"),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "11"},
            r"OTEL_BSP_MAX_EXPORT_BATCH_SIZE \(11\) must be at most OTEL_BSP_MAX_QUEUE_SIZE \(10\)",
        ),
    ],
)
def test_the_batch_is_at_most_the_queue(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trace_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, **env})


def test_batch_numbers_reach_the_sdk_as_given_and_blank_is_the_default() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        "OTEL_BSP_SCHEDULE_DELAY": " 250 ",
        "OTEL_BSP_MAX_QUEUE_SIZE": "+0100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100",
        "OTEL_BSP_EXPORT_TIMEOUT": " ",  # blank: unset (the SDK logged a traceback for it)
    }
    settings, problems = sdk_settings(env, ("otlp",))
    assert problems == []
    assert settings == SdkSettings(
        schedule_delay_millis=250,
        max_queue_size=100,
        max_export_batch_size=100,
        export_timeout_millis=30_000,
    )
    assert sdk_settings({}, ("otlp",)) == (SdkSettings(), [])


@pytest.mark.parametrize("value", [*HOSTILE_WHOLE, "1000000001"])
@pytest.mark.parametrize(
    "name", ["OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"]
)
def test_span_limits_are_whole_numbers(name: str, value: str) -> None:
    """The SDK raised at import (a traceback) for a non-number or a negative limit."""
    with pytest.raises(ConfigError, match=f"{name} must be a whole number from 0 to "):
        trace_exporters({"OTEL_TRACES_EXPORTER": "console", name: value})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # The SDK warned and sampled everything instead.
        ({"OTEL_TRACES_SAMPLER": "bogus"}, "OTEL_TRACES_SAMPLER must be one of always_on, "),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "abc"},
            "OTEL_TRACES_SAMPLER_ARG must be a ratio",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
            "OTEL_TRACES_SAMPLER_ARG must be a ratio",
        ),
        (
            # float() reads Arabic-Indic digits: "\u0660.\u0665" was 0.5.
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "\u0660.\u0665"},
            "OTEL_TRACES_SAMPLER_ARG must be a ratio",
        ),
        # Ignored by the SDK, silently: a ratio asked for, every request traced.
        ({"OTEL_TRACES_SAMPLER_ARG": "0.1"}, "the sampler parentbased_always_on takes no ratio"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "abc"}, "OTEL_EXPORTER_OTLP_TIMEOUT must be a number of"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TIMEOUT must be a number of"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"}, "OTEL_EXPORTER_OTLP_TIMEOUT must be"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "inf"}, "OTEL_EXPORTER_OTLP_TIMEOUT must be"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "1_0"}, "OTEL_EXPORTER_OTLP_TIMEOUT must be"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": HUGE}, "OTEL_EXPORTER_OTLP_TIMEOUT must be"),
        # Milliseconds, as the specification has them: hours to this SDK, which reads seconds.
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "10000"}, "_TRACES_TIMEOUT must be a number of"),
        (
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "5", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "x"},
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT must be",
        ),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, "_COMPRESSION must be one of none, gzip"),
        ({"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zip"}, "_TRACES_COMPRESSION must be one of"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key"}, "_HEADERS: item 1 is not key=value"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=b,=c"}, "_HEADERS: item 2 is not key=value"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a b=c"}, "_HEADERS: item 1 is not key=value"),
        # Decoded, a line break or a character beyond Latin-1 failed every export.
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "k=x%0Ay"}, "the value of k must be printable"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "k=%E2%82%AC"}, "the value of k must be printable"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=b,novalue"}, "OTEL_RESOURCE_ATTRIBUTES: item 2 "),
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=b,"}, "OTEL_RESOURCE_ATTRIBUTES: item 2 "),
        ({"OTEL_RESOURCE_ATTRIBUTES": "=x"}, "OTEL_RESOURCE_ATTRIBUTES: item 1 "),
        # The SDK logged a traceback and went on without it.
        ({"OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "bogus"}, "'bogus' is not an installed"),
        ({"OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED": "yes"}, "must be true or false"),
        ({"OTEL_SERVICE_NAME": "bad\udcff"}, "OTEL_SERVICE_NAME is not valid UTF-8"),
    ],
)
def test_what_the_sdk_would_mangle_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        trace_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, **env})
    assert "\n" not in str(err.value)


def test_header_values_are_not_shown() -> None:
    """They are usually credentials."""
    with pytest.raises(ConfigError) as err:
        trace_exporters(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_HEADERS": "k=s3cr%0At"}
        )
    assert "s3cr" not in str(err.value)


def test_the_otlp_variables_count_only_for_the_otlp_exporter() -> None:
    otlp_only = {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "abc",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli",
        "OTEL_EXPORTER_OTLP_HEADERS": "junk",
    }
    assert trace_exporters({"OTEL_TRACES_EXPORTER": "console", **otlp_only}) == ("console",)
    assert trace_exporters({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}) == ()  # tracing off: unread


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
        {"OTEL_TRACES_SAMPLER": " TraceIdRatio ", "OTEL_TRACES_SAMPLER_ARG": "1"},
        {"OTEL_TRACES_SAMPLER": "always_off"},
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "2.5", "OTEL_EXPORTER_OTLP_COMPRESSION": " GZIP"},
        {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc%20def, x-tenant = a b ,"},
        {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%2Cb"},
        {"OTEL_ATTRIBUTE_COUNT_LIMIT": "0", "OTEL_SPAN_LINK_COUNT_LIMIT": ""},
        {"OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "host,*"},
        {"OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED": "False"},
    ],
)
def test_what_is_allowed_passes(env: dict[str, str]) -> None:
    assert trace_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, **env}) == ("otlp",)


def test_the_sampler_reaches_the_sdk() -> None:
    env = {"OTEL_TRACES_SAMPLER": " TraceIdRatio ", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    settings, _ = sdk_settings(env, ("console",))
    assert (settings.sampler, settings.sampler_ratio) == ("traceidratio", 0.25)


def test_allowed_values_build_the_sdk_without_a_word(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the check lets through, the SDK takes as given: no warning, no default instead."""
    env = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32",
        "OTEL_BSP_EXPORT_TIMEOUT": "",
        "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "16",
        "OTEL_RESOURCE_ATTRIBUTES": "team=a%2Cb",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING):
        tracing = load_tracing(env)
    assert tracing is not None
    try:
        assert caplog.records == []
        sampler = tracing.provider.sampler.get_description()
        assert "TraceIdRatioBased{0.5}" in sampler, sampler
        assert tracing.provider.resource.attributes["team"] == "a,b"
    finally:
        tracing.shutdown()


def test_whatever_the_sdk_raises_while_built_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort, for what the checks do not foresee (here a credential provider that is
    not installed, which the SDK raises for): one line naming OTEL_*, not a traceback."""
    from lacuna_webhooks import tracing

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Requested component 'x' not found\nsecond line")

    monkeypatch.setattr(tracing.Tracing, "from_env", explode)
    with pytest.raises(ConfigError) as err:
        load_tracing({"OTEL_TRACES_EXPORTER": "console"})
    assert str(err.value) == (
        "the OpenTelemetry SDK could not start tracing from the OTEL_* variables: "
        "RuntimeError: Requested component 'x' not found"
    )
