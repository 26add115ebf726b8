"""When tracing is on (tracing_config.trace_exporters): the standard OTEL_* variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.tracing_config import trace_exporters

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
